"""The StreamingLLM sink + window cache against independent references.

- Window semantics at the cache level: which tokens, at which positions, each new token sees.
- Token-by-token streaming past many evictions equals tests/reference_model.py (raw keys per held
  token, rotated by their index among the held tokens), for plain and LCKV models, with and without
  sinks; for one plain layer it equals a transformers forward over just the held tokens.
- Chunked ingestion (evict-for-space before each chunk) equals the reference fed the same chunks.
- The public Session.feed (chunk 1, chunk C, iterative and sequential prefill) equals the reference.
- After >100k tokens: positions are still 0..S+W-1 and the stored keys are those of the held tokens
  recomputed from scratch (no drift).
"""

from __future__ import annotations

import pytest
import torch

import streaming
from cache.sink_window import SinkWindowCache
from streaming.forward import forward_step, forward_tokens
from tests.reference_model import Reference, held_tokens, rel_err
from tests.runtime_helpers import build, sink_cache
from tests.tiny_checkpoint import lckv_config, plain_config, random_weights, write_checkpoint

TOL = 1e-4


def _ids(n: int, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- cache level ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sinks,window", [(4, 16), (0, 16), (3, 5), (1, 1), (0, 1)])
def test_window_semantics_exact(sinks, window):
    """Each new token t sees exactly: held tokens j <= t, where held = first S + last W up to the
    step's end; positions are indices among the held tokens, and the query's is its own index."""
    cache = SinkWindowCache([0], 1, 1, 2, sinks=sinks, window=window, dtype=torch.float32, device="cpu")
    steps = [1, 2, window, 1, 3, window, 1, 1, 2, window, 5, 1] * 3
    steps = [n for n in steps if n <= window]
    start = 0
    for n in steps:
        plan = cache.plan(n)
        tokens = torch.arange(start, start + n, dtype=torch.float32)
        values = tokens.view(1, 1, n, 1).expand(1, 1, n, 2)  # a token's value = its stream index
        cache.write(0, plan, values, values)
        _, stored = cache.read(0, plan)
        slot_token = stored[0, 0, :, 0].round().long().tolist()

        end = start + n
        held = sorted(held_tokens(end, sinks, window))
        assert len(held) == min(end, sinks + window)
        for r, t in enumerate(range(start, end)):
            q = int(plan.query_positions[0, r])
            assert q == held.index(t)
            seen = {
                (slot_token[s], int(plan.slot_positions[0, s]))
                for s in range(plan.visible)
                if plan.slot_valid[0, s] and plan.slot_positions[0, s] <= q
            }
            assert seen == {(j, held.index(j)) for j in held if j <= t}, (start, n, t)
        if end > sinks + window:
            # The window counts the new tokens: they see the sinks, the W - n most recent older
            # tokens, and each other causally.
            older = {j for j in held if j < start}
            assert older == set(range(sinks)) | set(range(start - (window - n), start))
        cache.advance(plan)
        start = end
    assert cache.evictions() == start - sinks - window
    assert cache.tokens_in_cache() == sinks + window


def test_step_larger_than_window_is_refused():
    from cache.errors import CacheConfigError

    cache = SinkWindowCache([0], 1, 1, 2, sinks=2, window=8, dtype=torch.float32, device="cpu")
    with pytest.raises(CacheConfigError, match="window"):
        cache.plan(9)


def test_cpu_plan_reads_only_filled_slots_until_the_window_wraps():
    """On CPU a step reads slots 0..max(total)-1 while no addressed row has wrapped, S+W after; the
    trimmed plan is the full plan's prefix, and every slot it drops is empty (invalid)."""
    S, W = 2, 8
    cache = SinkWindowCache([0], 3, 1, 2, sinks=S, window=W, dtype=torch.float32, device="cpu")
    cache.lengths.copy_(torch.tensor([0, 3, 12]))
    for rows, n, visible in (([0], 1, 1), ([0, 1], 2, 5), ([1], 5, 8), ([1, 2], 1, S + W), ([0], W, W)):
        plan = cache.plan(n, torch.tensor(rows))
        assert plan.visible == visible
        full = _untrimmed_plan(cache, n, torch.tensor(rows))
        assert torch.equal(plan.slot_positions, full.slot_positions[:, :visible])
        assert torch.equal(plan.slot_valid, full.slot_valid[:, :visible])
        assert not full.slot_valid[:, visible:].any()


def _untrimmed_plan(cache, n, rows):
    """The plan as a CUDA step sees it (all S+W slots): the same method on a cache claiming a GPU."""
    view = object.__new__(SinkWindowCache)
    view.__dict__.update(cache.__dict__)
    view.device = torch.device("meta")  # only the device *type* is consulted; tensors stay on CPU
    return SinkWindowCache.plan(view, n, rows)


# ---- models --------------------------------------------------------------------------------------

MODELS = {
    "plain": plain_config(2),
    "lckv-nodiag": lckv_config(5, m=2, b=1),
    "lckv-diag": lckv_config(5, m=2, b=1, force_nodiag=False),
}


@pytest.mark.parametrize("name,sinks,window", [
    ("plain", 4, 16), ("plain", 0, 16), ("lckv-nodiag", 4, 16), ("lckv-nodiag", 0, 16), ("lckv-diag", 4, 16),
])
def test_token_by_token_streaming_matches_reference(tmp_path, name, sinks, window):
    config = MODELS[name]
    model, weights = build(tmp_path, config)
    n = 200
    ids = _ids(n)
    expected, _ = Reference(config, weights).stream(ids[0].tolist(), sinks=sinks, window=window)
    cache = sink_cache(model, sinks, window)
    got = torch.cat([forward_tokens(model, cache, ids[:, t : t + 1])[0] for t in range(n)])
    assert cache.evictions() == n - sinks - window
    assert rel_err(got, expected) < TOL
    for t in range(0, n, 20):
        assert rel_err(got[t], expected[t]) < TOL, t
    # The eviction matters: the same tokens with a full cache give other logits late in the stream.
    full, _ = Reference(config, weights).stream(ids[0, :40].tolist())
    assert rel_err(got[39], full[39]) > 1e-2


def _hf_from_tiny(config: dict, weights: dict):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


@pytest.mark.parametrize("sinks", [4, 0])
def test_one_plain_layer_equals_dense_forward_over_held_tokens(tmp_path, sinks):
    """With one layer a token's K,V depend on the token alone, so streaming = a dense forward over
    the held tokens (at positions 0..), computed here by transformers."""
    config = plain_config(1)
    model, weights = build(tmp_path, config)
    hf = _hf_from_tiny(config, weights)
    window, n = 12, 90
    ids = _ids(n, seed=2)
    cache = sink_cache(model, sinks, window)
    for t in range(n):
        got = forward_tokens(model, cache, ids[:, t : t + 1])[0, -1]
        held = sorted(held_tokens(t + 1, sinks, window))
        with torch.no_grad():
            expected = hf(ids[:, held]).logits[0, -1]
        assert rel_err(got, expected) < TOL, t


@pytest.mark.parametrize("sinks", [4, 0])
def test_chunked_ingestion_plain(tmp_path, sinks):
    """Chunks evict for space first: a chunk sees sinks + the W - C latest older tokens + itself."""
    config = MODELS["plain"]
    model, weights = build(tmp_path, config)
    window = 16
    chunks = [5, 16, 1, 7, 16, 3, 9, 16, 16, 2, 11, 1, 1, 13]
    ids = _ids(sum(chunks), seed=3)
    expected, _ = Reference(config, weights).stream(ids[0].tolist(), chunks, sinks=sinks, window=window)
    cache, got, a = sink_cache(model, sinks, window), [], 0
    for c in chunks:
        got.append(forward_tokens(model, cache, ids[:, a : a + c], all_logits=True)[0])
        a += c
    got = torch.cat(got)
    assert rel_err(got, expected) < TOL
    # Chunking changes what a token sees, so the chunked result differs from token by token.
    one_by_one, _ = Reference(config, weights).stream(ids[0].tolist(), sinks=sinks, window=window)
    assert rel_err(expected, one_by_one) > 1e-2


def test_chunk_of_one_equals_token_by_token(tmp_path):
    config = MODELS["plain"]
    model, weights = build(tmp_path, config)
    ids = _ids(60, seed=4)
    expected, _ = Reference(config, weights).stream(ids[0].tolist(), [1] * 60, sinks=4, window=16)
    cache = sink_cache(model, 4, 16)
    got = torch.cat([forward_tokens(model, cache, ids[:, t : t + 1], all_logits=True)[0] for t in range(60)])
    assert rel_err(got, expected) < TOL


@pytest.mark.parametrize("name", ["lckv-nodiag", "lckv-diag"])
def test_chunked_ingestion_lckv_converged_iteration(tmp_path, name):
    """LCKV chunks run the parallel iteration; with passes > chunk it equals the exact chunk
    semantics: the chunk's tokens one by one, all seeing the held tokens chosen before the chunk."""
    config = MODELS[name]
    model, weights = build(tmp_path, config)
    sinks, window = 4, 16
    chunks = [6, 6, 6, 6, 6, 6, 6]
    ids = _ids(sum(chunks), seed=5)
    expected, _ = Reference(config, weights).stream(ids[0].tolist(), chunks, sinks=sinks, window=window)
    cache, got, a = sink_cache(model, sinks, window), [], 0
    for c in chunks:
        got.append(forward_step(model, cache, ids[:, a : a + c], passes=c + 1, all_logits=True)[0])
        a += c
    assert rel_err(torch.cat(got), expected) < TOL


# ---- no drift after a long stream ----------------------------------------------------------------


def test_positions_and_keys_after_100k_tokens(tmp_path):
    config = plain_config(1)
    model, weights = build(tmp_path, config)
    sinks, window, chunk = 4, 64, 61
    total = 100_037
    ids = torch.randint(0, 512, (1, total), generator=torch.Generator().manual_seed(7))
    cache = sink_cache(model, sinks, window)
    for a in range(0, total, chunk):
        logits = forward_tokens(model, cache, ids[:, a : a + chunk])
    assert int(cache.lengths[0]) == total

    # The last token saw all held tokens: a dense forward over them gives the same logits.
    held = sorted(held_tokens(total, sinks, window))
    hf = _hf_from_tiny(config, weights)
    with torch.no_grad():
        assert rel_err(logits[0, -1], hf(ids[:, held]).logits[0, -1]) < TOL

    # Positions of the next step: still 0..S+W-1 whatever the stream length.
    plan = cache.plan(1)
    assert sorted(plan.slot_positions[0].tolist()) == list(range(sinks + window))
    assert plan.query_positions.tolist() == [[sinks + window - 1]]
    assert bool(plan.slot_valid.all())

    # Contents: every slot not about to be overwritten holds the raw K,V of the token at its position.
    w = {k: v.double() for k, v in weights.items()}
    x = w["model.embed_tokens.weight"][ids[0]]  # [total, hidden]
    x = w["model.layers.0.input_layernorm.weight"] * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    next_held = sorted(held_tokens(total + 1, sinks, window))
    write_slot = int(plan.write_slots[0, 0])
    checked = 0
    for slot in range(sinks + window):
        if slot == write_slot:
            continue
        token = next_held[int(plan.slot_positions[0, slot])]
        k = (w["model.layers.0.self_attn.k_proj.weight"] @ x[token]).view(2, 16)
        v = (w["model.layers.0.self_attn.v_proj.weight"] @ x[token]).view(2, 16)
        assert rel_err(cache.keys[0][0, :, slot], k) < 1e-5, (slot, token)
        assert rel_err(cache.values[0][0, :, slot], v) < 1e-5, (slot, token)
        checked += 1
    assert checked == sinks + window - 1


# ---- through the public Session API --------------------------------------------------------------


def _chunks(n: int, chunk: int) -> list[int]:
    return [min(chunk, n - a) for a in range(0, n, chunk)]


@pytest.mark.parametrize("name,chunk,prefill,ref_chunk", [
    ("plain", 1, "iterative", 1),  # chunk 1 is the paper's token-by-token streaming
    ("plain", 7, "iterative", 7),  # parallel chunks, evict-for-space before each
    ("lckv-nodiag", 3, "iterative", 1),  # chunks of at most m+b tokens go token by token
    ("lckv-nodiag", 9, "sequential", 1),  # exact mode: token by token whatever the chunk
    ("lckv-diag", 3, "iterative", 1),
])
def test_session_feed_matches_reference(tmp_path, name, chunk, prefill, ref_chunk):
    config = MODELS[name]
    weights = random_weights(config)
    rt = streaming.load(write_checkpoint(tmp_path, config, weights), device="cpu", dtype="float32")
    s = rt.session(sinks=4, window=16, chunk=chunk, prefill=prefill)
    n = 75
    ids = _ids(n, seed=11)
    got = s.feed(ids[0].tolist(), return_logits=True)
    expected, _ = Reference(config, weights).stream(ids[0].tolist(), _chunks(n, ref_chunk), sinks=4, window=16)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < TOL
    stats = s.stats()
    assert (stats.tokens_seen, stats.tokens_in_cache, stats.evictions) == (n, 20, n - 20)
