"""The engine: many streams on rows of one cache, advanced together, equal to each stream run alone.

References: the existing standalone `Session` (greedy, repetition penalty included: an independent
path through the runtime) and a plain token loop on a one-row cache with the same per-row sampler
(seeded sampling: the sampler itself is tested against the reference filters in test_row_sampling).
"""

import pytest
import torch

import streaming
from cache import SinkWindowCache
from cache.errors import CacheConfigError
from streaming.engine import Engine
from streaming.errors import PoolFullError
from streaming.forward import forward_tokens
from streaming.row_sampling import RowSampling
from streaming.sampling import SamplingParams
from tests.tiny_checkpoint import make_tiny_checkpoint

SINKS, WINDOW, CHUNK = 2, 30, 8


@pytest.fixture(scope="module", params=["lckv", "plain"])
def runtime(request, tmp_path_factory):
    return streaming.load(make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param))


def reference_tokens(runtime, prompt_ids, params, max_new_tokens):
    """One stream alone: chunked prompt, then sample -> ingest, on a one-row cache (no engine)."""
    config = runtime.config
    cache = SinkWindowCache(config.kv_layers, 1, config.num_key_value_heads, config.head_dim, sinks=SINKS,
                            window=WINDOW, dtype=runtime.dtype, device=runtime.device)
    sampling = RowSampling(1, config.vocab_size, device=runtime.device, history=SINKS + WINDOW)
    sampling.configure(0, params)
    device = runtime.device  # (ids and row indices live with the model: on CUDA too)
    row = torch.tensor([0], device=device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(prompt_ids), CHUNK):
            piece = torch.tensor([prompt_ids[start : start + CHUNK]], device=device)
            logits = forward_tokens(runtime.model, cache, piece)[:, -1]
            sampling.observe(row, piece)
        for _ in range(max_new_tokens):
            token = sampling.sample(row, logits)
            out.append(int(token))
            if int(token) in runtime.eos_ids:
                break
            sampling.observe(row, token[:, None])
            logits = forward_tokens(runtime.model, cache, token[:, None])[:, -1]
    return out


def _ids(runtime, text):
    return runtime.tokenizer.encode(text, add_bos=True)


PROMPTS = ["Once upon a time", "The", "A long time ago in a land far away there lived a king who had three sons"]
SETTINGS = [
    dict(temperature=0.9, top_k=20, seed=5),
    dict(temperature=0.7, top_p=0.8, seed=11),
    dict(temperature=0.0, repetition_penalty=1.3),
]


@pytest.mark.parametrize("pipelined", [False, True])
def test_batched_streams_equal_streams_alone_with_joins_and_leaves(runtime, pipelined):
    # Pipelined (tests/test_engine_pipelined.py): each decode step queued before the last one's ids are read.
    engine = Engine(runtime, 4, sinks=SINKS, window=WINDOW, chunk=CHUNK, pipelined=pipelined)
    lengths = [40, 12, 25]  # 40 tokens through a 32-slot row: every row evicts while batched
    jobs = {}
    # Stream 0 starts alone; stream 1 joins after 3 iterations; stream 2 after 10 (stream 1 leaves at 12 tokens).
    join_at = {0: 0, 1: 3, 2: 10}
    for iteration in range(200):
        for i, at in join_at.items():
            if at == iteration:
                row = engine.open_row()
                jobs[i] = engine.submit(row, _ids(runtime, PROMPTS[i]), params=SamplingParams(**SETTINGS[i]),
                                        max_new_tokens=lengths[i])
        if not engine.step() and len(jobs) == 3:
            break
    for i, job in jobs.items():
        assert job.finished and not job.cancelled
        want = reference_tokens(runtime, _ids(runtime, PROMPTS[i]), SamplingParams(**SETTINGS[i]), lengths[i])
        assert job.generated == want, f"stream {i}"
        reasons = [r.finish_reason for r in job.responses if r.finish_reason]
        assert reasons == ["eos" if want[-1] in runtime.eos_ids else "length"]
        assert engine.seen[job.row] == engine.cache.lengths[job.row].item()  # no queued step left in the row


def test_greedy_with_penalty_equals_standalone_session(runtime):
    """An independent path: Session.generate with its own sampler and cache."""
    engine = Engine(runtime, 3, sinks=SINKS, window=WINDOW, chunk=CHUNK)
    settings = dict(temperature=0.0, repetition_penalty=1.5)
    jobs = [engine.submit(engine.open_row(), _ids(runtime, p), params=SamplingParams(**settings), max_new_tokens=30)
            for p in PROMPTS]
    texts = ["".join(r.text for r in engine.responses(job)) for job in jobs]
    for prompt, job, text in zip(PROMPTS, jobs, texts):
        session = runtime.session(sinks=SINKS, window=WINDOW, chunk=CHUNK)
        alone = list(session.generate(prompt, max_new_tokens=30, **settings))
        assert job.generated == [t for r in alone for t in r.token_ids]
        assert text == "".join(r.text for r in alone)
        assert engine.seen[job.row] == session.stats().tokens_seen
        torch.testing.assert_close(engine.next_logits[job.row], session.next_logits, rtol=1e-4, atol=1e-4)


def test_decode_continues_while_a_long_prompt_is_ingested(runtime):
    engine = Engine(runtime, 2, sinks=SINKS, window=WINDOW, chunk=CHUNK)
    talker = engine.submit(engine.open_row(), _ids(runtime, "The"), params=SamplingParams(), max_new_tokens=None)
    engine.step()  # its prompt
    long_prompt = list(range(3, 200)) * 2  # 394 tokens: 50 chunks of 8
    reader = engine.submit(engine.open_row(), long_prompt, params=SamplingParams(), max_new_tokens=1)
    for iteration in range(1, 11):
        engine.step()
        assert len(talker.generated) == iteration  # one token per iteration, never held up by the prompt
        assert reader.ingested == min(len(long_prompt), CHUNK * iteration)  # one chunk per iteration
    engine.cancel(reader)  # takes effect before the next chunk
    engine.step()
    assert reader.finished and reader.cancelled and reader.ingested == 10 * CHUNK
    assert len(talker.generated) == 11
    engine.cancel(talker)
    assert not engine.step()


def test_prompts_of_many_streams_are_batched_round_robin(runtime):
    engine = Engine(runtime, 3, sinks=SINKS, window=WINDOW, chunk=CHUNK, prefill_budget=2 * CHUNK)
    prompts = [list(range(3 + 7 * j, 23 + 7 * j)) for j in range(3)]  # 20 tokens each, different
    jobs = [engine.submit(engine.open_row(), prompt, params=None) for prompt in prompts]
    engine.step()  # budget of two chunks: the first two streams
    assert [j.ingested for j in jobs] == [8, 8, 0]
    engine.step()  # the third stream's turn, then the first's
    assert [j.ingested for j in jobs] == [16, 8, 8]
    while engine.step():
        pass
    assert all(j.finished and j.ingested == 20 for j in jobs)
    for job, prompt in zip(jobs, prompts):  # chunked in another order and batched, each row equals it fed alone
        reference = runtime.session(sinks=SINKS, window=WINDOW, chunk=CHUNK)
        reference.feed(prompt)
        torch.testing.assert_close(engine.next_logits[job.row], reference.next_logits, rtol=1e-4, atol=1e-4)


def test_rows_are_reused_completely(runtime):
    engine = Engine(runtime, 2, sinks=SINKS, window=WINDOW, chunk=CHUNK)
    a, b = engine.open_row(), engine.open_row()
    with pytest.raises(PoolFullError):
        engine.open_row()
    settings = SamplingParams(temperature=0.8, seed=3, repetition_penalty=1.2)
    engine.wait(engine.submit(a, list(range(3, 60)), params=settings, max_new_tokens=20))
    engine.close_row(a)
    again = engine.open_row()
    assert again == a
    job = engine.submit(again, _ids(runtime, PROMPTS[0]), params=settings, max_new_tokens=20)
    engine.wait(job)
    assert job.generated == reference_tokens(runtime, _ids(runtime, PROMPTS[0]), settings, 20)
    engine.close_row(b)
    assert engine.free_rows == 1


def test_chunk_larger_than_window_is_refused_up_front(runtime):
    """Engine defect 3: such a chunk used to be accepted and then fail every session creation."""
    with pytest.raises(CacheConfigError, match="chunk"):
        Engine(runtime, 2, sinks=SINKS, window=WINDOW, chunk=WINDOW + 1)


def test_default_chunk_on_cpu_is_256_or_the_window(runtime):
    """On CPU every engine, one row or many, ingests 256 tokens per step, or the whole window when it is
    shorter (a chunk never exceeds the window); an unbounded session 256. (CUDA's one-row default:
    tests/test_engine_cuda.py.)"""
    assert runtime.session(sinks=4, window=1020).engine.chunk == 256
    assert runtime.session(sinks=SINKS, window=WINDOW).engine.chunk == WINDOW
    assert runtime.session(unbounded_cache=True).engine.chunk == 256
    assert Engine(runtime, 3, sinks=4, window=2044).chunk == 256


def test_submit_never_waits_for_a_running_step(runtime):
    """A server admits a burst of replies while the scheduler steps: each submit must return at once
    (queued, admitted at the next step), not wait for the step to end. Here a step is held inside
    a scoring callback while another thread submits."""
    import threading

    engine = Engine(runtime, 3, sinks=SINKS, window=WINDOW, chunk=CHUNK)
    scorer_row, *rows = engine.open_row(), engine.open_row(), engine.open_row()
    inside, release = threading.Event(), threading.Event()

    def hold(logits):
        inside.set()
        assert release.wait(10)

    engine.submit(scorer_row, list(range(3, 3 + CHUNK)), on_logits=hold)
    stepper = threading.Thread(target=engine.step)
    stepper.start()
    assert inside.wait(10)  # the step holds the engine's lock now
    submitted, errors = [], []

    def submit_all():
        submitted.extend(engine.submit(r, _ids(runtime, PROMPTS[0]), params=SamplingParams(), max_new_tokens=3)
                         for r in rows)
        for row, params in ((rows[0], SamplingParams()), (scorer_row, SamplingParams(top_k=-1))):
            try:
                engine.submit(row, [5], params=params)
            except Exception as error:  # refused at once: a queued job on the row; a bad setting
                errors.append(error)

    submitter = threading.Thread(target=submit_all)
    submitter.start()
    submitter.join(5)
    try:
        assert not submitter.is_alive(), "submit waited for the running step"
        assert len(submitted) == 2 and not any(job.generated for job in submitted)
        assert len(errors) == 2
        assert "already has a job" in str(errors[0]) and "top_k" in str(errors[1])
    finally:
        release.set()
        stepper.join(10)
    for job in submitted:  # admitted by the next step, and exact
        engine.wait(job)
        assert job.generated == reference_tokens(runtime, _ids(runtime, PROMPTS[0]), SamplingParams(), 3)
