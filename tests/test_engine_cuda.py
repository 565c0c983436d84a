"""The engine's bucketed decode graphs equal its eager step (GPU only: skipped in CI)."""

import pytest
import torch

import streaming
from streaming.engine import Engine
from streaming.sampling import SamplingParams
from tests.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: needs a CUDA GPU")

SETTINGS = [dict(temperature=0.0), dict(temperature=0.9, top_k=20, seed=5), dict(temperature=0.7, top_p=0.8, seed=1),
            dict(temperature=0.0, repetition_penalty=1.3), dict(temperature=1.0, seed=9)]


def _run(rt, graphs: bool, pipelined: bool = False):
    rt.cuda_graphs = graphs
    engine = Engine(rt, 6, sinks=2, window=24, chunk=8, pipelined=pipelined)
    assert (engine.graphs is not None) == graphs
    jobs = []
    gen = torch.Generator().manual_seed(0)
    # Streams join at different iterations and leave at different lengths: batches of 1..5 rows,
    # replayed from the buckets 1, 2, 4, 6 padded with the scratch row.
    for i, settings in enumerate(SETTINGS):
        prompt = torch.randint(3, rt.config.vocab_size, (5 + 7 * i,), generator=gen).tolist()
        jobs.append(engine.submit(engine.open_row(), prompt, params=SamplingParams(**settings),
                                  max_new_tokens=30 + 10 * i))
        for _ in range(3):
            engine.step()
    while engine.step():
        pass
    return engine, jobs


@pytest.mark.parametrize("kind", ["plain", "lckv"])
def test_bucketed_decode_graphs_equal_eager_engine(tmp_path, kind):
    rt = streaming.load(make_tiny_checkpoint(tmp_path / kind, kind, with_tokenizer=False), device="cuda",
                        dtype="float32")
    graphed, graphed_jobs = _run(rt, True)
    eager, eager_jobs = _run(rt, False)
    assert len(graphed.graphs._graphs) >= 3  # several buckets were captured and replayed
    for a, b in zip(graphed_jobs, eager_jobs):
        assert a.generated == b.generated
    rows = list(range(graphed.rows))
    torch.testing.assert_close(graphed.next_logits[rows], eager.next_logits[rows], rtol=1e-4, atol=1e-4)
    for layer in rt.config.kv_layers:
        torch.testing.assert_close(graphed.cache.keys[layer][rows], eager.cache.keys[layer][rows], rtol=1e-4, atol=1e-4)
    assert torch.equal(graphed.cache.lengths[rows], eager.cache.lengths[rows])


@pytest.mark.parametrize("kind", ["plain", "lckv"])
def test_pipelined_graphs_equal_the_plain_eager_engine_with_replies_ending_early(tmp_path, kind, monkeypatch):
    # Replies end on an "EOS" the streams actually write (their speculative next step is taken back
    # inside the graphed engine: cache slot and length, logits, penalty ring and counts, draw counter).
    rt = streaming.load(make_tiny_checkpoint(tmp_path / kind, kind, with_tokenizer=False), device="cuda",
                        dtype="float32")
    _, first = _run(rt, False)
    made = first[0].generated
    monkeypatch.setattr(rt, "eos_ids", {next(t for i, t in enumerate(made) if i >= 8 and t not in made[:i])})
    eager, eager_jobs = _run(rt, False)
    piped, piped_jobs = _run(rt, True, pipelined=True)
    assert any(job.responses[-1].finish_reason == "eos" for job in eager_jobs)
    for a, b in zip(piped_jobs, eager_jobs):
        assert a.generated == b.generated
        assert [r.finish_reason for r in a.responses if r.finish_reason] == [r.finish_reason for r in b.responses if r.finish_reason]
    rows = list(range(eager.rows))
    torch.testing.assert_close(piped.next_logits[rows], eager.next_logits[rows], rtol=1e-4, atol=1e-4)
    for layer in rt.config.kv_layers:
        torch.testing.assert_close(piped.cache.keys[layer][rows], eager.cache.keys[layer][rows], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(piped.cache.values[layer][rows], eager.cache.values[layer][rows], rtol=1e-4, atol=1e-4)
    assert torch.equal(piped.cache.lengths[rows], eager.cache.lengths[rows])
    for name in ("counters", "ring", "head"):
        assert torch.equal(getattr(piped.sampling, name)[rows], getattr(eager.sampling, name)[rows]), name
    assert torch.equal(piped.sampling.counts[rows], eager.sampling.counts[rows])


def test_warm_up_captures_every_graph_the_steps_replay(tmp_path):
    """After warm_up (what the server does at start), streams with those settings, joining in a burst
    with full and partial prompt chunks, capture no graph; and the tokens equal the eager engine's."""
    rt = streaming.load(make_tiny_checkpoint(tmp_path / "plain", "plain", with_tokenizer=False), device="cuda",
                        dtype="float32")
    settings = [SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, seed=3), SamplingParams()]

    def burst(graphs: bool):
        rt.cuda_graphs = graphs
        engine = Engine(rt, 9, sinks=2, window=24, chunk=8, prefill_budget=32)
        captured = engine.warm_up(settings)
        gen = torch.Generator().manual_seed(1)
        jobs = [engine.submit(engine.open_row(), torch.randint(3, rt.config.vocab_size, (3 + 5 * i,), generator=gen).tolist(),
                              params=settings[i % 2], max_new_tokens=12 + i) for i in range(9)]
        while engine.step():
            pass
        return captured, (len(engine.graphs) if graphs else 0), jobs

    captured, after, jobs = burst(True)
    assert captured >= 5 and after == captured
    _, _, eager_jobs = burst(False)
    assert [j.generated for j in jobs] == [j.generated for j in eager_jobs]


@pytest.mark.parametrize("kind", ["plain", "lckv"])
def test_short_chunks_replay_padded_graphs_equal_eager_engine(tmp_path, kind):
    """Short prompt chunks (shorter than the chunk: a chat turn, a prompt's tail) replay padded
    graphs captured at warm-up, on any row (the padding writes nothing): on rows with room, on rows
    the chunk makes wrap, and the tail of a prompt longer than the window. An evicting LCKV chunk
    within the m+b passes replays the one-token graph per token. Tokens equal the eager engine's."""
    rt = streaming.load(make_tiny_checkpoint(tmp_path / kind, kind, with_tokenizer=False), device="cuda",
                        dtype="float32")
    settings = [SamplingParams(temperature=0.9, top_k=20, seed=5), SamplingParams()]

    def burst(graphs: bool):
        rt.cuda_graphs = graphs
        engine = Engine(rt, 10, sinks=2, window=58, chunk=32, prefill_budget=96)
        captured = engine.warm_up(settings)
        replays = []
        if graphs:
            replay = engine.graphs.prefill_padded
            engine.graphs.prefill_padded = lambda *args: replays.append(args[1].shape) or replay(*args)
        gen = torch.Generator().manual_seed(2)
        rows = [engine.open_row() for _ in range(10)]
        # Rows 0-8: short prompts; row 9: 117 tokens, past the 60 slots (3 chunks and a rest of 21).
        lengths = [2 + 4 * i for i in range(9)] + [117]
        jobs = [engine.submit(row, torch.randint(3, rt.config.vocab_size, (lengths[i],), generator=gen).tolist(),
                              params=settings[i % 2], max_new_tokens=9 + 2 * i) for i, row in enumerate(rows)]
        while engine.step():
            pass
        # Second turns: short prompts on rows holding 11..59 tokens of 60 (some wrap) and on row 9.
        again = [engine.submit(row, torch.randint(3, rt.config.vocab_size, (5,), generator=gen).tolist(),
                               params=settings[0], max_new_tokens=4) for row in rows]
        while engine.step():
            pass
        return captured, engine, jobs + again, replays

    captured, engine, jobs, replays = burst(True)
    assert len(engine.graphs) == captured  # nothing captured after warm-up
    lengths = {shape[1] for shape in replays}
    assert 5 in lengths and 21 in lengths  # second turns and the long prompt's rest on its wrapped row
    assert (1 in lengths) == (kind == "lckv")  # evicting LCKV chunks of 5: token by token (those rows only)
    _, eager, eager_jobs, _ = burst(False)
    assert [j.generated for j in jobs] == [j.generated for j in eager_jobs]
    assert torch.equal(engine.cache.lengths[:10], eager.cache.lengths[:10])  # (row 10: the graphs' scratch row)


def test_capture_survives_dead_engines_collected_at_every_allocation(tmp_path):
    """Dead pipelined engines (graphs and pinned host blocks, kept by their reference cycles) with the
    collector set to run at every allocation: a new engine's captures must not be broken by their
    freeing (a one-row LCKV capture failed so on the H200, 2026-12-03, cause suspected, not proven),
    and its streams equal the eager engine's."""
    import gc

    rt = streaming.load(make_tiny_checkpoint(tmp_path / "lckv", "lckv", with_tokenizer=False), device="cuda",
                        dtype="float32")
    eager, eager_jobs = _run(rt, False)
    for _ in range(3):
        _run(rt, True, pipelined=True)  # left for the collector: engine <-> graphs
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        piped, piped_jobs = _run(rt, True, pipelined=True)
    finally:
        gc.set_threshold(*thresholds)
    for a, b in zip(piped_jobs, eager_jobs):
        assert a.generated == b.generated


def test_default_chunk_is_longer_for_one_row_on_cuda(tmp_path):
    """A standalone session on CUDA ingests 1,024 tokens per step (or the window, when shorter): no
    other stream waits for its chunk; an engine of several rows keeps 256 so that none waits long."""
    rt = streaming.load(make_tiny_checkpoint(tmp_path / "lckv", "lckv", with_tokenizer=False), device="cuda")
    assert rt.session(sinks=4, window=2044).engine.chunk == 1024
    assert rt.session(sinks=4, window=1020).engine.chunk == 1020
    assert rt.session(unbounded_cache=True).engine.chunk == 1024
    assert rt.session(sinks=4, window=2044, chunk=64).engine.chunk == 64
    assert Engine(rt, 3, sinks=4, window=2044).chunk == 256
