"""The server with its engine in a process of its own (`ServerConfig.engine_process`, the default on
GPUs): the same replies as the engine in the server's process, the server's engine behaviours
(streams flow during a long prompt, cancels between chunks, rows given back, parking and resuming)
through the process boundary, and clean failures: a bad checkpoint, the engine process dying, the
server dying."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
from websockets.asyncio.client import connect

from apps.server import ServerConfig, running
from apps.server.engine_process import EngineProcess, EngineProcessError
from apps.server.engine_spec import ModelSource
from tests import test_server, test_server_engine, test_server_parking
from tests.test_server import LIMITS, LONG, create, done_of, recv, rt, run, send, until, ws_url  # noqa: F401

GREEDY = {"temperature": 0.0, "max_new_tokens": 12}
SAMPLED = {"temperature": 0.9, "top_k": 40, "seed": 7, "max_new_tokens": 12}


def serve_apart(rt, **changes):
    """tests/test_server.py's `serve`, with the engine in a process of its own (loading rt's checkpoint)."""
    limits = changes.pop("limits", LIMITS)
    return running(ModelSource.of(rt), ServerConfig(host="127.0.0.1", port=0, limits=limits, chunk=32,
                                                    model_name="tiny", engine_process=True, **changes))


async def conversation(app) -> list[tuple[str, str, int]]:
    """Two turns in each of three sessions (greedy, sampled with a seed, greedy with a system
    prompt), replies running at the same time: (text, finish reason, tokens) per reply."""
    async with connect(ws_url(app)) as ws:
        sids = [await create(ws, sampling=GREEDY), await create(ws, sampling=SAMPLED),
                await create(ws, system="You answer briefly.", sampling=GREEDY)]
        out = []
        for turn in ("Tell me about the sea.", "And about the mountains?"):
            for sid in sids:
                await send(ws, type="message", session=sid, text=f"{turn} ({sid[:0]})")
            pending, texts, done = set(sids), {sid: "" for sid in sids}, {}
            while pending:
                event = await recv(ws)
                if event["type"] == "delta":
                    texts[event["session"]] += event["text"]
                elif event["type"] == "done":
                    done[event["session"]] = event
                    pending.discard(event["session"])
                else:
                    raise AssertionError(event)
            out += [(texts[sid], done[sid]["finish_reason"], done[sid]["usage"]["completion_tokens"]) for sid in sids]
        return out


def test_replies_equal_those_of_the_engine_in_the_servers_process(rt):
    async def both():
        async with test_server.serve(rt) as here:
            expected = await conversation(here)
        async with serve_apart(rt) as apart:
            assert isinstance(apart.engine, EngineProcess)
            got = await conversation(apart)
            stats = await apart.engine.current_stats()
        return expected, got, stats

    expected, got, stats = run(both())
    assert got == expected
    assert all(text and tokens == 12 for text, _, tokens in got)
    assert stats["steps"] > 0 and stats["free_rows"] == LIMITS.max_sessions - 3


ENGINE_TESTS = [
    test_server.test_limits_sessions_prompt_length_idle_timeout,
    test_server.test_cancel_stops_generation_and_session_goes_on,
    test_server.test_disconnect_stops_generation_and_session_resumes,
    test_server.test_bad_frames_get_errors_and_other_sessions_keep_streaming,
    test_server_engine.test_a_stream_keeps_going_while_another_session_sends_a_long_prompt,
    test_server_engine.test_cancel_during_a_long_prompt_ends_the_reply_once_the_prompt_is_in,
    test_server_engine.test_close_while_the_reply_finishes_gives_the_row_back,
    test_server_parking.test_a_parked_session_continues_exactly_as_if_never_left,
    test_server_parking.test_resume_when_every_row_is_taken_says_the_server_is_full,
]


@pytest.mark.parametrize("test", ENGINE_TESTS, ids=lambda t: t.__name__.removeprefix("test_"))
def test_server_behaviour_holds_across_the_process_boundary(test, rt, monkeypatch):
    for module in (test_server, test_server_engine, test_server_parking):
        monkeypatch.setattr(module, "serve", serve_apart)
    test(rt)


def test_a_saved_session_resumes_through_the_engine_process(rt, tmp_path):
    """--state-dir: the state crosses the process boundary both ways (written after a reply, read on
    resume by a new server); the resumed session answers as the one that never stopped."""
    async def main():
        async with serve_apart(rt, state_dir=str(tmp_path)) as app:
            async with connect(ws_url(app)) as ws:
                away, twin = await create(ws, sampling=GREEDY), await create(ws, sampling=GREEDY)
                for sid in (away, twin):
                    await send(ws, type="message", session=sid, text="Remember the number four.")
                    await until(ws, done_of(sid))
                await send(ws, type="message", session=twin, text="What was the number?")
                expected = "".join(e.get("text", "") for e in await until(ws, done_of(twin)) if e["type"] == "delta")
        async with serve_apart(rt, state_dir=str(tmp_path)) as app:  # a new server, a new engine process
            async with connect(ws_url(app)) as ws:
                await send(ws, type="session.create", resume=away)
                assert (await recv(ws))["resumed"]
                await send(ws, type="message", session=away, text="What was the number?")
                got = "".join(e.get("text", "") for e in await until(ws, done_of(away)) if e["type"] == "delta")
        return expected, got

    expected, got = run(main())
    assert got == expected and got


def test_a_dead_engine_process_ends_the_running_reply_with_an_error(rt):
    async def main():
        async with serve_apart(rt) as app:
            async with connect(ws_url(app)) as ws:
                sid = await create(ws)
                await send(ws, type="message", session=sid, text="Go on.", sampling=LONG)
                await until(ws, lambda e: e["type"] == "delta")
                app.engine.process.kill()
                events = await until(ws, done_of(sid))
                await app.failed.wait()
                health = app.health()
                await send(ws, type="message", session=sid, text="Still there?")
                after = await until(ws, lambda e: e["type"] in ("error", "done"))
        return events, health, after

    events, health, after = run(main())
    errors = [e for e in events if e["type"] == "error"]
    assert errors and "EngineProcessError" in errors[0]["message"]
    assert events[-1]["finish_reason"] == "error"
    assert health["status"] == "engine failed"
    assert after[-1]["type"] in ("error", "done") and (after[-1]["type"] == "error" or after[-1]["finish_reason"] == "error")


def test_a_bad_checkpoint_fails_the_start_with_its_reason(tmp_path):
    async def main():
        cfg = ServerConfig(port=0, limits=LIMITS, engine_process=True)
        with pytest.raises(EngineProcessError, match="could not start: .*config.json not found"):
            async with running(ModelSource(model=str(tmp_path), device="cpu"), cfg):
                pass
    run(main())


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("victim", ["server", "engine"])
def test_the_cli_server_and_its_engine_process_never_outlive_each_other(rt, victim):
    """`serve --engine-process`: SIGKILL of the server -> its engine process exits (its pipe closed);
    the engine process killed -> the server stops with exit status 1 (a supervisor restarts it)."""
    server = subprocess.Popen([sys.executable, "-m", "apps", "serve", "--engine-process", "--device", "cpu",
                               "--model", str(rt.path), "--port", "0"],
                              stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        line = server.stderr.readline()
        assert "serving on" in line, line
        engines = _children(server.pid)
        assert len(engines) == 1, engines
        if victim == "server":
            server.kill()
            server.wait()
            assert _wait_gone(engines[0], 20), "the engine process outlived its server"
        else:
            os.kill(engines[0], signal.SIGKILL)
            assert server.wait(timeout=30) == 1
            assert "engine process" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_calls_given_up_by_their_callers_leave_the_engine_process_working(rt):
    """A call whose awaiting task is cancelled (a connection gone mid-request, a stopping server) is
    answered later by the engine process; that answer must be dropped, not end the thread that
    carries every reply."""
    async def main():
        async with serve_apart(rt) as app:
            for _ in range(5):
                task = asyncio.create_task(app.engine.current_stats())
                await asyncio.sleep(0)  # (sent)
                task.cancel()
            await asyncio.sleep(0.5)  # their answers come and go
            async with connect(ws_url(app)) as ws:
                sid = await create(ws, sampling=GREEDY)
                await send(ws, type="message", session=sid, text="Hello.")
                return await asyncio.wait_for(until(ws, done_of(sid)), 30)

    assert run(main())[-1]["finish_reason"] == "length"


def test_a_start_that_fails_to_listen_leaves_no_engine_process(rt):
    import socket

    from apps.server import ChatServer

    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            cfg = ServerConfig(host="127.0.0.1", port=taken.getsockname()[1], limits=LIMITS, engine_process=True)
            app = ChatServer(ModelSource.of(rt), cfg)
            with pytest.raises(OSError):
                await app.start()
            return app.engine.process.poll()

    assert run(main()) is not None  # the engine process has exited


@contextlib.asynccontextmanager
async def engine_recording_calls(rt, monkeypatch, calls: list):
    """An engine process of four rows for rt's checkpoint, each call it sends recorded as (op, args)."""
    from apps.server.engine_spec import EngineSettings

    engine = EngineProcess(ModelSource.of(rt), EngineSettings(rows=4, sinks=2, window=30, chunk=8, prefill_budget=None))
    await engine.start()
    try:
        real_call = engine.call
        monkeypatch.setattr(engine, "call", lambda op, *args: calls.append((op, args)) or real_call(op, *args))
        yield engine
    finally:
        await engine.stop()


def test_snapshots_asked_together_cross_as_one_call_and_equal_the_saved_states(rt, monkeypatch):
    from tests.test_snapshot_many import _same

    # States made in this process (different lengths: fresh, short, a wrapped window), restored into
    # rows of the engine process, then snapshotted all at once: the same states come back.
    pool = rt.pool(4, sinks=2, window=30, chunk=8)
    local = [pool.session() for _ in range(4)]
    for session, text in zip(local, ["", "A short one.", "x" * 200, "Name a river. " * 12]):
        if text:
            session.feed(text)
    states = [s.snapshot() for s in local]
    calls = []

    async def main():
        async with engine_recording_calls(rt, monkeypatch, calls) as engine:
            handles = [await engine.open_row() for _ in states]
            await asyncio.gather(*(engine.restore(h, s) for h, s in zip(handles, states)))
            calls.clear()
            return await asyncio.gather(*(engine.snapshot(h) for h in handles)), \
                await asyncio.gather(engine.snapshot(handles[0]), engine.snapshot(10**6), return_exceptions=True)

    together, with_unknown = asyncio.run(main())
    ops = [op for op, _ in calls]
    assert ops.count("snapshot_many") == 2 and "snapshot" not in ops
    for got, want in zip(together, states):  # (each comes as the bytes of its file)
        _same(got.unpack(), want)
    _same(with_unknown[0].unpack(), states[0])  # an unknown handle fails alone
    assert isinstance(with_unknown[1], Exception) and "no session" in str(with_unknown[1])


def test_calls_made_in_one_loop_iteration_cross_as_one_message_in_order(rt, monkeypatch):
    calls = []

    async def main():
        async with engine_recording_calls(rt, monkeypatch, calls) as engine:
            handles = await asyncio.gather(*(engine.open_row() for _ in range(4)))
            # Stats of every row, an unknown handle among them, and a release then stats of the same
            # row: the answers match the calls, the error stays with its call, the order holds.
            got = await asyncio.gather(*(engine.session_stats(h) for h in handles), engine.session_stats(10**6),
                                       engine.release(handles[3]), engine.session_stats(handles[3]),
                                       return_exceptions=True)
            return handles, got

    handles, got = asyncio.run(main())
    assert [op for op, _ in calls] == ["many", "many"]  # one message per loop iteration's calls
    assert [op for op, _ in calls[0][1][0]] == ["open"] * 4
    assert len(set(handles)) == 4
    assert all(s.tokens_seen == 0 and s.cache_bytes > 0 for s in got[:4])
    assert isinstance(got[4], KeyError)  # only the unknown handle's call failed
    assert got[5] is None and isinstance(got[6], KeyError)  # released before its stats were asked


def test_an_unreadable_message_from_the_engine_process_fails_what_waits_on_it():
    # A message that cannot be unpickled must not end the reader thread without a word: the calls and
    # replies waiting on the process fail with the reason, the server is told (on_death), and the
    # process, whose pipe can no longer be trusted, is stopped. (A stand-in process and pipe.)
    import multiprocessing
    import threading

    from apps.server.engine_process import RemoteJob

    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    deaths = []
    engine = EngineProcess(None, None, on_death=deaths.append)

    async def main():
        ours, theirs = multiprocessing.Pipe()
        engine._loop, engine.process, engine._conn = asyncio.get_running_loop(), stand_in, ours
        job = RemoteJob(1, asyncio.Event())
        engine._jobs[job.id] = job
        call = engine.call("session_stats", 0)
        assert theirs.recv()[0] == "call"
        threading.Thread(target=engine._read, daemon=True).start()
        theirs.send_bytes(b"not a pickle")
        await asyncio.wait_for(job.ready.wait(), 5)
        with pytest.raises(EngineProcessError, match="could not be read"):
            await asyncio.wait_for(asyncio.wrap_future(call), 5)
        await asyncio.sleep(0.05)  # (on_death is called on the loop)
        return job

    try:
        job = asyncio.run(main())
        stopped = stand_in.poll()  # (the reader waited for it to exit)
    finally:
        stand_in.kill()
    assert job.finished and isinstance(job.error, EngineProcessError)
    assert deaths and "could not be read" in deaths[0] and engine.dead == deaths[0]
    assert stopped is not None


def test_an_unreadable_message_from_the_server_stops_the_engine_process_cleanly():
    # The engine process's side: it logs and stops serving (closing its end, so the server's reader
    # sees the process go), instead of raising out of serve(). (A stand-in child, no model.)
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from apps.server.engine_child import EngineChild

    child = EngineChild.__new__(EngineChild)
    ours, theirs = multiprocessing.Pipe()
    child.conn, child.jobs = ours, {}
    child.worker, child.loop = ThreadPoolExecutor(max_workers=1), SimpleNamespace(stop=lambda: None)
    theirs.send_bytes(b"not a pickle")
    child.serve()
    with pytest.raises(EOFError):
        theirs.recv()
