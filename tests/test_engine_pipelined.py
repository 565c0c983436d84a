"""The pipelined engine: each decode step is queued before the previous step's ids are read.

A reply that ends (EOS, a stop string, a cancel) has already had one more token queued; that step is
taken back for its row (cache slot and length, logits, sampling state). References: each stream run
alone (`reference_tokens`, a standalone Session) and the plain engine loop on the same work.
Streams joining and leaving a pipelined engine: tests/test_engine.py (parametrized).
"""

import pytest
import torch

from streaming.engine import Engine
from streaming.errors import InvalidInputError
from streaming.sampling import SamplingParams
from tests.test_engine import CHUNK, PROMPTS, SETTINGS, SINKS, WINDOW, _ids, reference_tokens, runtime  # noqa: F401


def _engine(runtime, rows, pipelined):
    return Engine(runtime, rows, sinks=SINKS, window=WINDOW, chunk=CHUNK, pipelined=pipelined)


def _row_state(engine, row):
    """Everything a stream's row holds, copied: (exact parts, float parts)."""
    cache, sampling = engine.cache, engine.sampling
    exact = [cache.lengths[row].item(), engine.seen[row], sampling.counters[row].item(), sampling.head[row].item(),
             sampling.ring[row].tolist()]
    if sampling.counts is not None:
        exact.append(sampling.counts[row].tolist())
    floats = [engine.next_logits[row].clone()] + [t[row].clone() for t in (*cache.keys.values(), *cache.values.values())]
    return exact, floats


def _assert_same_row(a, row_a, b, row_b):
    exact_a, floats_a = _row_state(a, row_a)
    exact_b, floats_b = _row_state(b, row_b)
    assert exact_a == exact_b
    for x, y in zip(floats_a, floats_b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def _run(engine, jobs, limit=400):
    for _ in range(limit):
        if not engine.step() and all(job.finished for job in jobs):
            return
    raise AssertionError("the engine did not finish its jobs")


def test_a_step_is_queued_before_the_last_ones_ids_are_read(runtime):
    engine = _engine(runtime, 2, pipelined=True)
    row = engine.open_row()
    job = engine.submit(row, _ids(runtime, PROMPTS[0]), params=SamplingParams(), max_new_tokens=5)
    while job.prefilling:
        engine.step()
    prompt = engine.seen[row]
    engine.step()  # the first decode step: queued, its id not read yet
    assert job.generated == [] and job.launched == 1
    assert engine.cache.lengths[row].item() == prompt + 1
    engine.step()  # the second queued, the first read
    assert len(job.generated) == 1 and job.launched == 2
    _run(engine, [job])
    assert job.generated == reference_tokens(runtime, _ids(runtime, PROMPTS[0]), SamplingParams(), 5)
    assert engine.cache.lengths[row].item() == engine.seen[row] == prompt + 5  # no step left over


def _greedy_alone(runtime, prompt, n, **settings):
    session = runtime.session(sinks=SINKS, window=WINDOW, chunk=CHUNK)
    responses = list(session.generate(prompt, max_new_tokens=n, temperature=0.0, **settings))
    return [t for r in responses for t in r.token_ids], "".join(r.text for r in responses), session


@pytest.mark.parametrize("end", ["eos", "stop"])
def test_a_reply_that_ends_has_its_queued_step_taken_back(runtime, monkeypatch, end):
    # The reply ends after 12+ of its tokens; the prompt alone (39 tokens) wraps the 32-slot window, so the queued
    # step overwrote the oldest window token, which must come back. The stream then continues.
    prompt = PROMPTS[2]
    settings = dict(repetition_penalty=1.3)  # the penalty's counts and ring are undone too
    ids, text, _ = _greedy_alone(runtime, prompt, 40, **settings)
    if end == "eos":
        eos = next(t for i, t in enumerate(ids) if i >= 12 and t not in ids[:i])
        monkeypatch.setattr(runtime, "eos_ids", runtime.eos_ids | {eos})
        stop = None
    else:
        stop = [text[len(text) // 2 : len(text) // 2 + 3]]
    want, want_text, session = _greedy_alone(runtime, prompt, 40, stop=stop, **settings)
    assert 0 < len(want) < 40
    more, more_text = zip(*[(r.token_ids, r.text) for r in session.generate(max_new_tokens=12, temperature=0.0, **settings)])

    results = {}
    for pipelined in (False, True):
        engine = _engine(runtime, 3, pipelined=pipelined)
        other = engine.submit(engine.open_row(), _ids(runtime, PROMPTS[0]), params=SamplingParams(), max_new_tokens=60)
        row = engine.open_row()
        job = engine.submit(row, _ids(runtime, prompt), params=SamplingParams(temperature=0.0, **settings),
                            max_new_tokens=40, stop=stop)
        _run(engine, [job])
        assert job.generated == want and "".join(r.text for r in job.responses) == want_text
        assert job.responses[-1].finish_reason == end
        after = _row_state(engine, row)
        follow = engine.submit(row, [], params=SamplingParams(temperature=0.0, **settings), max_new_tokens=12)
        _run(engine, [follow, other])
        assert follow.generated == [t for ids in more for t in ids]
        assert "".join(r.text for r in follow.responses) == "".join(more_text)
        results[pipelined] = engine, row, after
    (plain, row_p, after_p), (piped, row_q, after_q) = results[False], results[True]
    # The row as the reply left it, exactly: the slot the taken-back token overwrote holds the oldest
    # window token again (no later step attends to it, but snapshots and inspection read it).
    assert after_p[0] == after_q[0]
    for x, y in zip(after_p[1], after_q[1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    _assert_same_row(plain, row_p, piped, row_q)


def test_cancel_keeps_the_token_on_its_way_and_takes_back_the_next(runtime):
    prompt, n = _ids(runtime, PROMPTS[1]), 20
    engine = _engine(runtime, 2, pipelined=True)
    row = engine.open_row()
    job = engine.submit(row, prompt, params=SamplingParams(**SETTINGS[0]), max_new_tokens=n)
    while len(job.generated) < 6:
        engine.step()
    engine.cancel(job)
    _run(engine, [job])
    assert job.cancelled and len(job.generated) == 7  # the token queued before the cancel is kept
    # The row holds exactly what was reported: the plain loop stopped at 7 tokens has the same row.
    plain = _engine(runtime, 2, pipelined=False)
    same = plain.submit(plain.open_row(), prompt, params=SamplingParams(**SETTINGS[0]), max_new_tokens=7)
    _run(plain, [same])
    assert same.generated == job.generated
    _assert_same_row(plain, same.row, engine, row)


def test_closing_a_row_with_a_step_on_its_way_frees_it_cleanly(runtime):
    engine = _engine(runtime, 2, pipelined=True)
    keep = engine.submit(engine.open_row(), _ids(runtime, PROMPTS[0]), params=SamplingParams(**SETTINGS[1]),
                         max_new_tokens=30)
    row = engine.open_row()
    job = engine.submit(row, _ids(runtime, PROMPTS[2]), params=SamplingParams(), max_new_tokens=30)
    while len(job.generated) < 3:
        engine.step()
    engine.close_row(row)  # its next token is queued on the device
    assert job.finished and job.cancelled
    reused = engine.open_row()
    assert reused == row
    fresh = engine.submit(reused, _ids(runtime, PROMPTS[1]), params=SamplingParams(**SETTINGS[2]), max_new_tokens=15)
    _run(engine, [keep, fresh])
    assert fresh.generated == reference_tokens(runtime, _ids(runtime, PROMPTS[1]), SamplingParams(**SETTINGS[2]), 15)
    assert keep.generated == reference_tokens(runtime, _ids(runtime, PROMPTS[0]), SamplingParams(**SETTINGS[1]), 30)


def test_pipelined_by_default_only_on_cuda(runtime):
    # None (the default everywhere: Engine, rt.session/pool/engine, serve): on for several rows on
    # CUDA; off on CPU and for one row (a standalone session).
    assert Engine(runtime, 2, sinks=SINKS, window=WINDOW, chunk=CHUNK).pipelined is (runtime.device.type == "cuda")
    assert Engine(runtime, 1, sinks=SINKS, window=WINDOW, chunk=CHUNK).pipelined is False
    with pytest.raises(InvalidInputError, match="several rows"):
        Engine(runtime, 1, sinks=SINKS, window=WINDOW, chunk=CHUNK, pipelined=True)
    assert runtime.pool(2, sinks=SINKS, window=WINDOW, chunk=CHUNK).engine.pipelined is (runtime.device.type == "cuda")
    assert runtime.pool(2, sinks=SINKS, window=WINDOW, chunk=CHUNK, pipelined=False).engine.pipelined is False
    assert runtime.pool(2, sinks=SINKS, window=WINDOW, chunk=CHUNK, pipelined=True).engine.pipelined is True


def _ending_on_eos(runtime, monkeypatch, prompt, at):
    """Greedy ids of `prompt` alone, and EOS made of a token it generates at index >= `at` (not earlier)."""
    ids, _, _ = _greedy_alone(runtime, prompt, 30)
    eos = next(t for i, t in enumerate(ids) if i >= at and t not in ids[:i])
    monkeypatch.setattr(runtime, "eos_ids", runtime.eos_ids | {eos})
    return eos


def test_a_job_is_finished_only_once_its_row_is_taken_back(runtime, monkeypatch):
    # A reader that sees `finished` without the engine's lock (end_reply, then a snapshot) must find
    # the row as the reply left it: the step queued after its last token already taken back. Each
    # job's row is looked at the very moment `finished` is set.
    _ending_on_eos(runtime, monkeypatch, PROMPTS[2], 6)
    engine = _engine(runtime, 3, pipelined=True)
    seen_at_finish = {}
    finish = Engine._finish

    def watching(self, job, **kw):
        finish(self, job, **kw)
        if job.finished and job not in seen_at_finish:
            seen_at_finish[job] = (self.cache.lengths[job.row].item(), self.seen[job.row], len(job.generated))

    monkeypatch.setattr(Engine, "_finish", watching)
    other = engine.submit(engine.open_row(), _ids(runtime, PROMPTS[0]), params=SamplingParams(), max_new_tokens=None)
    job = engine.submit(engine.open_row(), _ids(runtime, PROMPTS[2]), params=SamplingParams(temperature=0.0),
                        max_new_tokens=30)
    for _ in range(100):
        if job.finished:
            break
        engine.step()
    assert job.responses[-1].finish_reason == "eos" and not other.finished  # (its step was queued: taken back)
    length, seen, generated = seen_at_finish[job]
    assert length == seen == len(_ids(runtime, PROMPTS[2])) + generated


def _failing_after(calls, exc):
    """A callback that raises `exc` on its `calls`-th call."""
    count = [0]

    def callback(*_):
        count[0] += 1
        if count[0] == calls:
            raise exc
    return callback


@pytest.mark.parametrize("where", ["prompt", "reply"])
def test_a_failed_step_leaves_every_row_consistent(runtime, where):
    # A step fails after this iteration's decode step was queued (a prompt chunk's callback raises) or
    # while the previous step's ids are read (a reply's bookkeeping raises for the first row of the
    # batch). The jobs end with the error; every row still holds exactly the tokens it counts, equal
    # to the plain loop stopped at the same tokens, so the streams can go on.
    engine = _engine(runtime, 3, pipelined=True)
    prompts, settings = [_ids(runtime, PROMPTS[0]), _ids(runtime, PROMPTS[1])], [SETTINGS[0], SETTINGS[2]]
    jobs = [engine.submit(engine.open_row(), p, params=SamplingParams(**s), max_new_tokens=30)
            for p, s in zip(prompts, settings)]
    while len(jobs[0].generated) < 4:
        engine.step()
    if where == "prompt":
        engine.submit(engine.open_row(), list(range(3, 40)), on_logits=_failing_after(2, ValueError("callback")))
    else:
        push = jobs[0].reply.push
        failing = _failing_after(2, ValueError("callback"))
        jobs[0].reply.push = lambda token: (failing(), push(token))[1]
    with pytest.raises(ValueError, match="callback"):
        _run(engine, jobs)
    assert all(job.finished and isinstance(job.error, ValueError) for job in jobs)
    for row in engine._open:
        assert engine.cache.lengths[row].item() == engine.seen[row]
    plain = _engine(runtime, 3, pipelined=False)
    alike = [plain.submit(plain.open_row(), p, params=SamplingParams(**s), max_new_tokens=len(job.generated))
             for job, p, s in zip(jobs, prompts, settings)]
    _run(plain, alike)
    for job, same in zip(jobs, alike):
        assert same.generated == job.generated
        _assert_same_row(plain, same.row, engine, job.row)
    # and the streams go on
    more = engine.submit(jobs[1].row, [], params=SamplingParams(temperature=0.0), max_new_tokens=3)
    _run(engine, [more])
    assert len(more.generated) == 3 and engine.cache.lengths[more.row].item() == engine.seen[more.row]
