"""CUDA-graph replays (decode steps and full ingestion chunks) equal the eager steps (GPU only)."""

import pytest
import torch

import streaming
from tests.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: needs a CUDA GPU")


def _ids(n, seed, vocab):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _pair(tmp_path, kind, **session):
    path = make_tiny_checkpoint(tmp_path / kind, kind, with_tokenizer=False)
    rt = streaming.load(path, device="cuda", dtype="float32")
    graphed = rt.session(**session)
    rt.cuda_graphs = False
    eager = rt.session(**session)
    assert graphed.engine.graphs is not None and eager.engine.graphs is None
    return rt, graphed, eager


def _same_cache(a, b, rt):
    for layer in rt.config.kv_layers:
        torch.testing.assert_close(a.cache.keys[layer], b.cache.keys[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.cache.values[layer], b.cache.values[layer], rtol=1e-5, atol=1e-5)
    assert torch.equal(a.cache.lengths, b.cache.lengths)
    assert a.stats() == b.stats()


@pytest.mark.parametrize("kind", ["plain", "lckv"])
def test_decode_graph_matches_eager(tmp_path, kind):
    rt, graphed, eager = _pair(tmp_path, kind, sinks=2, window=24, chunk=8)
    for s in (graphed, eager):
        s.feed(_ids(20, 0, rt.config.vocab_size))
    # 60 greedy decode steps through a 26-slot cache: many evictions, every step a graph replay.
    ids = [[t for r in s.generate(max_new_tokens=60, temperature=0.0) for t in r.token_ids] for s in (graphed, eager)]
    assert ids[0] == ids[1] and len(ids[0]) == 60
    assert any(key[0] == "decode" for key in graphed.engine.graphs._graphs)
    torch.testing.assert_close(graphed.next_logits, eager.next_logits, rtol=1e-5, atol=1e-5)
    _same_cache(graphed, eager, rt)


@pytest.mark.parametrize("kind", ["plain", "lckv"])
def test_chunk_graph_matches_eager(tmp_path, kind):
    # chunk 16 > m+b = 5 passes: LCKV chunks really iterate; 200 tokens wrap the 2+40-slot ring often.
    rt, graphed, eager = _pair(tmp_path, kind, sinks=2, window=40, chunk=16)
    stream = _ids(200, 2, rt.config.vocab_size)
    for start in range(0, 200, 50):  # pieces of 50 = 3 full chunks (graph) + a 2-token tail (eager)
        piece = stream[start : start + 50]
        torch.testing.assert_close(graphed.feed(piece, return_logits=True), eager.feed(piece, return_logits=True),
                                   rtol=1e-5, atol=1e-5)
    graphed.feed(stream[:48])  # full chunks without logits use their own graph
    eager.feed(stream[:48])
    assert {key[:3] for key in graphed.engine.graphs._graphs} >= {("prefill", 1, True), ("prefill", 1, False)}
    _same_cache(graphed, eager, rt)


@pytest.mark.parametrize("kind", ["plain", "lckv"])
def test_batched_pool_graph_matches_eager(tmp_path, kind):
    path = make_tiny_checkpoint(tmp_path / kind, kind)
    rt = streaming.load(path, device="cuda", dtype="float32")
    results = []
    for graphs in (True, False):
        rt.cuda_graphs = graphs
        pool = rt.pool(3, sinks=2, window=24, chunk=8)
        sessions = [pool.session(seed=0) for _ in range(3)]
        got = {id(s): [] for s in sessions}
        requests = list(zip(sessions, ["Once upon a time", "The", "A"]))  # every row steps: the full graph
        for session, response in pool.generate(requests, max_new_tokens=40):
            got[id(session)].extend(response.token_ids)
        assert (pool.engine.graphs is not None) == graphs
        results.append([got[id(s)] for s in sessions])
    assert results[0] == results[1] and all(len(ids) == 40 for ids in results[0])
