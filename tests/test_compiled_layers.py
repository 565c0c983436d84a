"""Layers compiled with torch.compile equal the eager reference layers.

CPU (float32): logits to float32 rounding and identical greedy tokens. GPU (bf16, skipped in CI): the
compiled step under CUDA graphs against the eager reference path (plain attention, no graphs, no
decode kernel), for a plain model, LCKV w=2 and a GQA layout: logits to bf16 tolerance, the same 256
greedy tokens.
"""

import pytest
import torch

import streaming
from tests.tiny_checkpoint import make_tiny_checkpoint


def _ids(n, seed, vocab):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(rt, prompt, new_tokens, **session):
    s = rt.session(**session)
    logits = s.feed(prompt, return_logits=True)
    ids = [t for r in s.generate(max_new_tokens=new_tokens, temperature=0.0) for t in r.token_ids]
    return logits, ids, s.next_logits.clone()


def test_compiled_layers_match_eager_on_cpu(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "lckv", "lckv", with_tokenizer=False, std=0.5)
    rt = streaming.load(path, device="cpu", dtype="float32")
    prompt = _ids(40, 0, rt.config.vocab_size)
    # chunk 16 > m+b = 5: the prompt runs the LCKV iteration; 40 + 30 tokens wrap the 2+32-slot ring.
    session = dict(sinks=2, window=32, chunk=16)
    eager = _run(rt, prompt, 30, **session)
    rt.model.compile_layers()
    assert rt.model.layers_compiled
    compiled = _run(rt, prompt, 30, **session)
    rt.model.compile_layers(False)
    # Fused reductions round differently; the LCKV iteration amplifies that (measured: 4e-5 of the
    # largest logit). A wrong op would differ by the logits' own scale.
    scale = eager[0].abs().max()
    assert (compiled[0] - eager[0]).abs().max() <= 1e-4 * scale
    assert compiled[1] == eager[1] and len(eager[1]) == 30
    assert (compiled[2] - eager[2]).abs().max() <= 1e-4 * scale


LAYOUTS = {  # head_dim 64: the decode kernel's shape
    "plain": dict(kind="plain", layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=4),
    "lckv": dict(kind="lckv", layers=6, hidden_size=256, num_attention_heads=4, num_key_value_heads=2),
    "gqa": dict(kind="plain", layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=2),
}
# Float32 reassociation only, relative to the largest logit. The LCKV prompt iteration (m+b passes
# that feed each other) amplifies it: measured 5.7e-4 on CPU and 1.2e-3 on the H200 for LCKV against
# 5e-5 plain. A wrong op or a wrong row differs by the logits' own scale.
REASSOCIATION = {"plain": 1e-3, "gqa": 1e-3, "lckv": 1e-2}
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: needs a CUDA GPU")


def _reference_path(rt, on: bool):
    """Eager steps, the plain softmax, the gather-and-rotate attention, index_put_ writes (on) or
    everything fast: CUDA graphs, the decode and store kernels, compiled layers and, at one row, the
    GEMV layer kernels (off)."""
    rt.cuda_graphs, rt.model.decode_kernel, rt.model.one_row_kernels = not on, not on, not on
    rt.model.attention_impl = "plain" if on else "sdpa"
    rt.model.compile_layers(not on)


def _run_path(rt, reference: bool, prompt, new_tokens, **session):
    _reference_path(rt, reference)
    s = rt.session(**session)
    s.engine.cache.store_kernel = s.engine.cache.store_kernel and not reference
    assert (s.engine.graphs is None) == reference
    logits = s.feed(prompt, return_logits=True)
    ids = [t for r in s.generate(max_new_tokens=new_tokens, temperature=0.0) for t in r.token_ids]
    out = logits, ids, s.next_logits.clone()
    _reference_path(rt, True)
    return out


def _greedy_margins(rt, prompt, new_tokens, **session):
    """The reference path one token at a time: its greedy ids and, before each, the gap between its
    two largest logits (how close that choice was to a tie)."""
    _reference_path(rt, True)
    s = rt.session(**session)
    s.feed(prompt)
    ids, margins = [], []
    for _ in range(new_tokens):
        top = s.next_logits.float().topk(2).values
        margins.append((top[0] - top[1]).item())
        ids += [t for r in s.generate(max_new_tokens=1, temperature=0.0) for t in r.token_ids]
    return ids, margins


@GPU
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fast_step_matches_reference_in_float32(tmp_path, layout):
    spec = dict(LAYOUTS[layout])
    kind = spec.pop("kind")
    path = make_tiny_checkpoint(tmp_path / layout, kind, with_tokenizer=False, std=0.5, vocab_size=2048,
                                head_dim=64, intermediate_size=512, **spec)
    rt = streaming.load(path, device="cuda", dtype="float32")
    rt.eos_ids = set()  # random weights: EOS is any other token, so both paths run all 256 steps
    prompt = _ids(300, 1, rt.config.vocab_size)
    session = dict(sinks=4, window=124, chunk=64)  # 300 prompt + 256 new tokens: the window wraps often
    reference = _run_path(rt, True, prompt, 256, **session)
    fast = _run_path(rt, False, prompt, 256, **session)
    scale = reference[0].abs().max()
    tolerance = REASSOCIATION[layout] * scale
    assert (fast[0] - reference[0]).abs().max() <= tolerance
    assert len(fast[1]) == 256
    if _part_only_at_a_tie(rt, fast, reference, prompt, tolerance, session):
        assert (fast[2] - reference[2]).abs().max() <= tolerance


def _part_only_at_a_tie(rt, fast, reference, prompt, tolerance, session) -> bool:
    """True when both paths chose the same greedy ids. Otherwise they may part only where the
    reference's two best logits are closer than the paths' rounding differences (random weights make
    near-ties; so does bf16, whose logits tie exactly); a wrong op parts them where the choice is clear."""
    if fast[1] == reference[1]:
        return True
    ids, margins = _greedy_margins(rt, prompt, len(reference[1]), **session)
    assert ids == reference[1]
    first = next(i for i, (a, b) in enumerate(zip(fast[1], ids)) if a != b)
    assert margins[first] <= tolerance, f"paths part at token {first}, margin {margins[first]:.4f}"
    return False


@GPU
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-3), ("bfloat16", 0.03)])
def test_fast_step_matches_reference_on_the_bundled_model(dtype, tolerance):
    # A trained model (LCKV w=2, GQA 6/2 heads): its greedy choices are rarely near-ties, but not never:
    # in bf16 the reference's two best logits tie exactly at token 59 of this prompt (measured on CPU;
    # float32 margin 0.014), where the H200's fast path took float32's choice. So the same greedy ids
    # up to the first tie, which must be one (and at least 16 tokens agree before any parting).
    # Logits: float32 reassociation; bf16 (measured on CPU: bf16 vs float32 0.6 % of the largest logit).
    rt = streaming.load(device="cuda", dtype=dtype)
    rt.eos_ids = set()  # both paths run all 256 steps, so their ids line up
    prompt = rt.tokenizer.encode("The old house at the end of the lane had been empty for years, and the "
                                 "children of the village said") * 3
    session = dict(sinks=4, window=124, chunk=64)
    reference = _run_path(rt, True, prompt, 256, **session)
    fast = _run_path(rt, False, prompt, 256, **session)
    scale = reference[0].abs().max()
    assert (fast[0] - reference[0]).abs().max() <= tolerance * scale
    assert len(fast[1]) == len(reference[1]) == 256 and fast[1][:16] == reference[1][:16]
    _part_only_at_a_tie(rt, fast, reference, prompt, tolerance * scale, session)


@GPU
def test_stacking_at_load_frees_each_layers_originals_as_it_goes(tmp_path):
    # q/k/v and gate/up are most of a layer: holding every original until the load returned would
    # peak at ~1.6x the weights on the GPU; freed layer by layer it stays within one layer of them.
    path = make_tiny_checkpoint(tmp_path / "m", "plain", with_tokenizer=False, layers=8, hidden_size=512,
                                intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8,
                                head_dim=64, vocab_size=2048)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    rt = streaming.load(path, device="cuda", dtype="float32")
    weights = sum(p.numel() * p.element_size() for p in rt.model.parameters())
    peak = torch.cuda.max_memory_allocated() - start
    assert peak <= weights * (1 + 1.5 / 8), (peak, weights)  # one layer's stacked copy at most, and slack
