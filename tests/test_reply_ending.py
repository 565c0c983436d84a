"""Ending a reply: exactly once whoever ends it (two threads at once, an abandoned `agenerate`), and a
chat turn stopped before its prompt was in (the transcript and the cache stay in step)."""

import asyncio
import threading
import time

import pytest

import streaming
from streaming.session import OpenReply
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return streaming.load(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "lckv"))


class _Watched(OpenReply):
    """An OpenReply that tells when a second thread reaches its end (reads `ended`, or takes `ending`)."""

    arrived: threading.Event
    first: threading.Thread

    @property
    def ended(self):
        if threading.current_thread() is not self.first:
            self.arrived.set()
        return self.__dict__["_ended"]

    @ended.setter
    def ended(self, value):
        self.__dict__["_ended"] = value


class _SignallingLock:
    """The reply's `ending` lock, telling when a thread other than the first is about to take it."""

    def __init__(self, reply):
        self.reply, self.lock = reply, threading.Lock()

    def __enter__(self):
        if threading.current_thread() is not self.reply.first:
            self.reply.arrived.set()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def test_two_threads_ending_one_reply_free_the_session_once(runtime, monkeypatch):
    # The ordering is forced: the first end waits inside (its engine wait) until the second has
    # reached the reply's end too. Both return without error, and the session is freed once: a newer
    # operation's hold on it is never released by the late end.
    s = runtime.session(window=64, seed=0)
    reply = s.begin_reply(s.prepare_reply("Hi", max_new_tokens=None))
    reply.__dict__["_ended"] = reply.__dict__.pop("ended")
    reply.__class__ = _Watched
    reply.arrived = threading.Event()
    if "ending" in reply.__dict__:
        reply.ending = _SignallingLock(reply)
    wait = s.engine.wait

    def wait_for_the_second(job, **kw):
        assert reply.arrived.wait(5)
        time.sleep(0.05)  # (it is blocked on the reply's lock, or past the `ended` check)
        wait(job, **kw)

    monkeypatch.setattr(s.engine, "wait", wait_for_the_second)
    errors = []

    def end():
        try:
            s.end_reply(reply)
        except BaseException as exc:  # noqa: BLE001 (the test reports it)
            errors.append(exc)

    reply.first = threading.Thread(target=end)
    second = threading.Thread(target=end)
    reply.first.start()
    second.start()
    reply.first.join(10)
    second.join(10)
    assert errors == [] and reply.ended
    monkeypatch.undo()
    s._acquire()  # a newer operation holds the session...
    s.end_reply(reply)  # ...and a late end of the old reply leaves it held
    assert s._lock.locked()
    s._lock.release()
    assert s.generate_text("more", max_new_tokens=2) is not None


def test_an_abandoned_agenerate_and_the_next_operation_in_a_thread_end_it_once(runtime):
    # A consumer breaks out of `async for`; Python closes the iterator later (its `finally` ends the
    # reply in a worker thread) while the session's next operation, in another worker thread, ends
    # it first. Another thread keeps the pool's engine busy. Bounded: a few seconds of trials.
    pool = runtime.pool(2, window=64)
    s, other = pool.session(seed=0), pool.session(seed=1)
    stop = threading.Event()

    def keep_busy():
        while not stop.is_set():
            other.generate_text([7, 8], max_new_tokens=20)

    async def trial():
        async for _ in s.agenerate([1, 5, 6, 7], max_new_tokens=None):
            break
        return await asyncio.to_thread(s.generate_text, [5], max_new_tokens=3)

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        deadline, trials = time.monotonic() + 3, 0
        while time.monotonic() < deadline:
            asyncio.run(trial())
            trials += 1
            s.reset()
    finally:
        stop.set()
        busy.join(30)
    assert trials > 0 and not s._lock.locked()


SYSTEM = {"role": "system", "content": "You answer in one word."}
LONG_MESSAGE = " ".join(f"word{i}" for i in range(60))  # several chunks of 16 tokens


def _turns(message):
    first = [SYSTEM, {"role": "user", "content": message}]
    return first, first + [{"role": "assistant", "content": ""}, {"role": "user", "content": "Name a river."}]


def _reference_stream(runtime, message):
    """The ids a session holds after the first turn with an empty reply, then the second turn's prompt."""
    first, second = _turns(message)
    r = runtime.session(window=512)
    list(r.chat(first, max_new_tokens=0))
    list(r.chat(second, max_new_tokens=0))
    return r.recent_ids()


@pytest.mark.parametrize("how", ["pool at once", "pool mid-prompt", "standalone at once"])
def test_a_chat_turn_stopped_before_its_prompt_was_in_still_feeds_its_messages(runtime, how):
    # A cancel right after the message (begin, then end at once) or between its prompt's chunks:
    # the turn is recorded, so its messages (the system prompt included) must be in the stream, and
    # the next turn then feeds only its own; the stream equals that of the turn run with an empty reply.
    message = LONG_MESSAGE if "mid-prompt" in how else "Tell me a story."
    first, second = _turns(message)
    if how.startswith("pool"):
        pool = runtime.pool(2, window=512, chunk=16)
        s = pool.session()
        reply = pool.begin_chat(s, first, max_new_tokens=20)
        if "mid-prompt" in how:
            while reply.job.ingested < 16:
                pool.engine.step()
            assert reply.job.prefilling
        pool.end(reply)
    else:
        s = runtime.session(window=512)
        turn = s.chat_turn(first)
        reply = s.begin_reply(s.prepare_reply(turn.prompt, stop=turn.stop, max_new_tokens=20), turn)
        s.end_reply(reply)
    assert reply.job.cancelled and reply.job.generated == []
    list(s.chat(second, max_new_tokens=0))
    stream = s.recent_ids()
    assert runtime.tokenizer.decode(stream).startswith(runtime.tokenizer.render_chat(first, add_generation_prompt=True))
    assert stream == _reference_stream(runtime, message)
    assert s.stats().tokens_seen == len(stream)
