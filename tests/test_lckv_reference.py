"""LCKV runtime vs the plain token-by-token reference of tests/reference_model.py (float32 vs float64).

Shows: exact decode (sequential mode and token-by-token calls) for several layer layouts; the zero
attention rule on the first token; iterative prefill exact on token i after i+1 passes and really
iterating; the ACL-2024 pass schedule (the target attends with the previous pass's KV); the opt-llama
format conversion.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streaming.config import ModelConfig
from streaming.forward import forward_step, forward_tokens
from tests.reference_model import Reference, rel_err
from tests.runtime_helpers import build, full_cache
from tests.tiny_checkpoint import lckv_config, plain_config

# float32 against the float64 reference: rounding alone measured 2e-6 to 1.1e-5 across these configs
# (it moves with the order of float32 operations); a wrong mask, position or pass is 1e-2 or more.
TOL = 2e-5


def _opt_llama(**overrides) -> dict:
    config = lckv_config(6)
    for key in ("layer_types", "forward_passes", "backward_passes", "force_nodiag"):
        del config[key]
    config.update(model_type="opt-llama", layer_types="0_1_1_1_2_0", target_layer=4,
                  num_encoders=4, num_trained_encoders=1)
    config.update(overrides)
    return config


CONFIGS = {
    "lckv-nodiag": lckv_config(6, m=3, b=2),
    "lckv-diag": lckv_config(6, m=3, b=2, force_nodiag=False),
    # two cyclic blocks, and a layer reading a lower layer (sees its diagonal)
    "lckv-two-blocks": lckv_config(6, layer_types="0_2_2_0_5_5", force_nodiag=False),
    "lckv-two-blocks-nodiag": lckv_config(6, layer_types="0_2_2_0_5_5", force_nodiag=True),
    "opt-llama": _opt_llama(),
    "plain": plain_config(3),
}


def _ids(n: int, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sequential_and_token_by_token_decode_match_reference(tmp_path, name):
    config = CONFIGS[name]
    model, weights = build(tmp_path, config)
    ids = _ids(20)
    expected, _ = Reference(config, weights).stream(ids[0].tolist())

    sequential = forward_tokens(model, full_cache(model), ids, sequential=True, all_logits=True)[0]
    assert rel_err(sequential, expected) < TOL

    cache = full_cache(model)
    one_by_one = torch.cat([forward_tokens(model, cache, ids[:, t : t + 1], all_logits=True)[0]
                            for t in range(ids.shape[1])])
    assert rel_err(one_by_one, expected) < TOL
    assert torch.equal(cache.lengths, torch.tensor([20]))


def test_first_token_gets_zero_attention(tmp_path):
    """With force_nodiag no layer sees any key on token 0: every attention output is exactly zero."""
    config = lckv_config(6)
    model, weights = build(tmp_path, config)
    ids = _ids(1)
    got = forward_tokens(model, full_cache(model), ids, all_logits=True)[0, 0]
    assert torch.isfinite(got).all()

    # By hand, float64: h += 0 for attention, h += MLP(RMSNorm(h)) per layer.
    w = {k: v.double() for k, v in weights.items()}

    def rms(x, g):
        return g * x / torch.sqrt(x.pow(2).mean() + 1e-6)

    h = w["model.embed_tokens.weight"][ids[0, 0]]
    for i in range(6):
        x = rms(h, w[f"model.layers.{i}.post_attention_layernorm.weight"])
        p = lambda n: w[f"model.layers.{i}.mlp.{n}.weight"]  # noqa: E731
        h = h + p("down_proj") @ (F.silu(p("gate_proj") @ x) * (p("up_proj") @ x))
    expected = w["model.embed_tokens.weight"] @ rms(h, w["model.norm.weight"])
    assert rel_err(got, expected) < TOL


@pytest.mark.parametrize("name", ["lckv-nodiag", "lckv-two-blocks-nodiag", "opt-llama"])
@pytest.mark.parametrize("prefix", [0, 5])
def test_iterative_prefill_token_i_exact_after_i_plus_1_passes(tmp_path, name, prefix):
    config = CONFIGS[name]
    model, weights = build(tmp_path, config)
    n = 10
    ids = _ids(prefix + n, seed=3)
    exact, _ = Reference(config, weights).stream(ids[0].tolist())
    exact = exact[prefix:]

    for passes in (1, 2, 4, 7):
        cache = full_cache(model)
        if prefix:
            forward_tokens(model, cache, ids[:, :prefix], sequential=True)
        got = forward_tokens(model, cache, ids[:, prefix:], passes=passes, all_logits=True)[0]
        assert rel_err(got[:passes], exact[:passes]) < TOL, passes
        # Too few passes: the last token is not converged (the iteration is real).
        assert rel_err(got[-1], exact[-1]) > 10 * TOL, passes

    # Enough passes: every token exact, and so is the cache the chunk leaves (decode continues exactly).
    cache = full_cache(model)
    if prefix:
        forward_tokens(model, cache, ids[:, :prefix], sequential=True)
    got = forward_tokens(model, cache, ids[:, prefix:], passes=n, all_logits=True)[0]
    assert rel_err(got, exact) < TOL
    more = _ids(4, seed=9)
    after, _ = Reference(config, weights).stream(torch.cat([ids, more], 1)[0].tolist())
    cont = forward_tokens(model, cache, more, sequential=True, all_logits=True)[0]
    assert rel_err(cont, after[-4:]) < TOL


def test_forward_step_on_chunk_shorter_than_passes_is_exact(tmp_path):
    """forward_tokens would go token by token here; forward_step really runs the parallel iteration."""
    config = CONFIGS["lckv-nodiag"]
    model, weights = build(tmp_path, config)
    ids = _ids(4, seed=4)
    exact, _ = Reference(config, weights).stream(ids[0].tolist())
    got = forward_step(model, full_cache(model), ids, passes=model.config.prefill_passes, all_logits=True)[0]
    assert model.config.prefill_passes == 5
    assert rel_err(got, exact) < TOL


@pytest.mark.parametrize("name", ["lckv-diag", "lckv-two-blocks"])
def test_iterative_prefill_without_force_nodiag_converges(tmp_path, name):
    """force_nodiag=False: the converged iteration still equals exact sequential decode."""
    config = CONFIGS[name]
    model, weights = build(tmp_path, config)
    n = 8
    ids = _ids(n, seed=5)
    exact, _ = Reference(config, weights).stream(ids[0].tolist())
    got = forward_step(model, full_cache(model), ids, passes=n + 1, all_logits=True)[0]
    assert rel_err(got, exact) < TOL
    got = forward_step(model, full_cache(model), ids, passes=2, all_logits=True)[0]
    assert rel_err(got[-1], exact[-1]) > 1e-3


@pytest.mark.parametrize("name", ["lckv-diag", "lckv-two-blocks"])
def test_iterative_prefill_without_force_nodiag_exact_after_i_plus_1_passes(tmp_path, name):
    """DESIGN.md: token i is exact after i+1 passes, also when the target sees its own diagonal."""
    config = CONFIGS[name]
    model, weights = build(tmp_path, config)
    n = 8
    ids = _ids(n, seed=5)
    exact, _ = Reference(config, weights).stream(ids[0].tolist())
    got = forward_step(model, full_cache(model), ids, passes=n, all_logits=True)[0]
    assert rel_err(got, exact) < TOL


@pytest.mark.parametrize("name", ["lckv-nodiag", "lckv-diag", "lckv-two-blocks", "opt-llama"])
def test_pass_schedule_is_acl2024(tmp_path, name):
    """With too few passes the runtime equals the explicit ACL-2024 schedule, not the NAACL one."""
    config = CONFIGS[name]
    model, weights = build(tmp_path, config)
    prefix, n, passes = 4, 9, 3
    ids = _ids(prefix + n, seed=6)
    ref = Reference(config, weights)
    results = {}
    for variant in ("acl", "naacl"):
        _, store = ref.stream(ids[0, :prefix].tolist())
        results[variant] = ref.iterate_chunk(store, ids[0, prefix:].tolist(), prefix, passes, variant=variant)

    cache = full_cache(model)
    forward_tokens(model, cache, ids[:, :prefix], sequential=True)
    got = forward_step(model, cache, ids[:, prefix:], passes=passes, all_logits=True)[0]
    assert rel_err(got, results["acl"]) < TOL
    assert rel_err(results["naacl"], results["acl"]) > 1e-3  # the check can tell the two apart


def test_opt_llama_conversion(tmp_path):
    config = ModelConfig.from_dict(_opt_llama())
    assert config.kv_sources == [0, 4, 4, 4, 4, 5]
    assert config.nodiag == [True] * 6
    assert (config.forward_passes, config.backward_passes, config.prefill_passes) == (3, 2, 5)
    assert config.kv_layers == [0, 4, 5]
    # negative target_layer counts from the top, as in Python
    config = ModelConfig.from_dict(_opt_llama(target_layer=-2, num_encoders=7, num_trained_encoders=0))
    assert config.kv_sources == [0, 4, 4, 4, 4, 5]
    assert (config.forward_passes, config.backward_passes) == (7, 1)
    # code 0 layers own KV and still mask the diagonal: the model has no k_proj on layers 1..3
    model, _ = build(tmp_path, _opt_llama())
    assert [hasattr(layer.self_attn, "k_proj") for layer in model.model.layers] == [
        True, False, False, False, True, True]


def test_lckv_layer_types_conversion():
    config = ModelConfig.from_dict(lckv_config(6, force_nodiag=False))
    assert config.kv_sources == [0, 4, 4, 4, 4, 5]
    assert config.nodiag == [False, True, True, True, False, False]
    assert config.segments == [(0, 0), (1, 4), (5, 5)]
    config = ModelConfig.from_dict(lckv_config(6, layer_types="0_2_2_0_5_5"))
    assert config.kv_sources == [0, 2, 2, 0, 5, 5]
    assert config.nodiag == [True] * 6
    assert config.segments == [(0, 0), (1, 2), (3, 3), (4, 5)]


def test_bundled_default_model_matches_reference():
    """The trained bundled model (real attention patterns, bf16 weights read as float32)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from streaming.checkpoint import load_model

    directory = Path(__file__).resolve().parents[1] / "streaming" / "models" / "default"
    if not (directory / "config.json").exists():
        pytest.skip("no bundled default model")
    config = json.loads((directory / "config.json").read_text())
    weights = {}
    for shard in sorted(directory.glob("*.safetensors")):
        weights.update({k: v.float() for k, v in load_file(str(shard)).items()})
    model = load_model(directory, device=torch.device("cpu"), dtype=torch.float32)
    ref = Reference(config, weights)
    ids = _ids(12, seed=12, vocab=config["vocab_size"])
    exact, _ = ref.stream(ids[0].tolist())
    got = forward_tokens(model, full_cache(model), ids, sequential=True, all_logits=True)[0]
    assert rel_err(got, exact) < TOL
    # the default prefill (m+b = 9 passes) on a 12-token chunk: the first 9 tokens exact
    got = forward_tokens(model, full_cache(model), ids, all_logits=True)[0]
    assert rel_err(got[:9], exact[:9]) < TOL
