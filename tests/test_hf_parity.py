"""Plain Llama/Mistral checkpoints: our logits equal transformers' on the same random weights (fp32).

Checkpoints are built and saved by transformers itself (save_pretrained), with weights re-initialised
at std 0.2 so that a wrong RoPE, mask or head mapping cannot hide in near-zero activations, and loaded
through streaming.checkpoint.load_model. Prefill and cached decode (FullCache: a prefix, then one
token at a time) are both compared with the transformers full forward at every position.
"""

from __future__ import annotations

import json

import pytest
import torch

from streaming.checkpoint import load_model
from streaming.forward import forward_tokens
from tests.reference_model import Reference, rel_err
from tests.runtime_helpers import CPU, full_cache
from tests.tiny_checkpoint import write_checkpoint

transformers = pytest.importorskip("transformers")

TOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # head_dim 16, theta 1e4: wavelengths 6.3 (kept), 19.9 (interpolated), >= 62.8 (divided)
          "original_max_position_embeddings": 32}


def _hf_model(kind="llama", *, seed=0, **overrides):
    args = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=False, attn_implementation="eager")
    args.update(overrides)
    if "rope_scaling" in args:  # transformers writes rope_theta into the dict it is given
        args["rope_scaling"] = dict(args["rope_scaling"])
    if kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **args))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def _ids(batch, n, vocab=300, seed=1):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _expected(hf, ids):
    with torch.no_grad():
        return hf(ids).logits.float()


def _check_prefill_and_decode(model, hf, *, batch=2, n=40, prefix=7):
    ids = _ids(batch, n)
    expected = _expected(hf, ids)
    prefill = forward_tokens(model, full_cache(model, batch), ids, all_logits=True)
    assert rel_err(prefill, expected) < TOL

    cache = full_cache(model, batch, initial_slots=4)  # small, so decode also crosses cache growth
    got = [forward_tokens(model, cache, ids[:, :prefix], all_logits=True)]
    for t in range(prefix, n):
        got.append(forward_tokens(model, cache, ids[:, t : t + 1]))
    got = torch.cat(got, dim=1)
    assert got.shape == expected.shape
    for t in range(n):  # every position of the cached decode
        assert rel_err(got[:, t], expected[:, t]) < TOL, t


CASES = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "mqa-tied": {"num_key_value_heads": 1, "tie_word_embeddings": True},
    "tied": {"tie_word_embeddings": True},
    "head-dim-32": {"head_dim": 32},
    "llama3-rope": {"rope_scaling": LLAMA3, "rope_theta": 10000.0},
    "linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_theta": 500.0},
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_matches_transformers(tmp_path, case):
    hf = _hf_model(**CASES[case])
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    if "rope_scaling" in CASES[case]:
        assert written["rope_parameters"]["rope_type"] == CASES[case]["rope_scaling"]["rope_type"]
    model = load_model(tmp_path, device=CPU, dtype=torch.float32)
    _check_prefill_and_decode(model, hf)


@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_old_style_rope_scaling_config(tmp_path, key):
    """A hand-written transformers-4 config: top-level rope_theta plus rope_scaling."""
    hf = _hf_model(rope_scaling=LLAMA3, rope_theta=50000.0)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    scaling = {k: v for k, v in LLAMA3.items() if k != "rope_type"}
    scaling[key] = "llama3"
    config.update(rope_theta=50000.0, rope_scaling=scaling)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path, device=CPU, dtype=torch.float32)
    assert model.config.rope.rope_type == "llama3" and model.config.rope.theta == 50000.0
    _check_prefill_and_decode(model, hf)


def test_rope_scaling_is_not_ignored(tmp_path):
    """The llama3 case really depends on the scaling: the unscaled model differs."""
    hf = _hf_model(rope_scaling=LLAMA3)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path, device=CPU, dtype=torch.float32)
    ids = _ids(1, 40)
    got = forward_tokens(model, full_cache(model), ids, all_logits=True)
    assert rel_err(got, _expected(hf, ids)) > 1e-2


def test_sharded_checkpoint(tmp_path):
    hf = _hf_model(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    directory = write_checkpoint(tmp_path / "sharded", config, weights, shards=3)
    assert len(list(directory.glob("*.safetensors"))) == 3
    model = load_model(directory, device=CPU, dtype=torch.float32)
    _check_prefill_and_decode(model, hf, n=20)


def test_mistral_without_sliding_window(tmp_path):
    hf = _hf_model("mistral")
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "mistral" and written["sliding_window"] is None
    model = load_model(tmp_path, device=CPU, dtype=torch.float32)
    _check_prefill_and_decode(model, hf, n=24)


def test_reference_model_equals_transformers(tmp_path):
    """tests/reference_model.py is itself checked against transformers before it judges the LCKV code."""
    hf = _hf_model(num_hidden_layers=2)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    ids = _ids(1, 12)
    ref, _ = Reference(config, weights).stream(ids[0].tolist())
    assert rel_err(_expected(hf, ids)[0], ref) < 1e-5
