"""`serve --state-dir` when its files cannot be written (a full or read-only disk): every reply still
ends with `done`, the failure is logged, the last good file stays, rows go back to the pool, and a
session whose state could not be written stays parked in memory, resumable as if it never left."""

from __future__ import annotations

import asyncio
import gc
import time

from safetensors import SafetensorError
from websockets.asyncio.client import connect

from apps.server.sessions import ON_DISK
from apps.server.state_dir import StateDir
from tests.test_server import LIMITS, create, done_of, recv, rt, run, send, serve, until, ws_url  # noqa: F401

GREEDY = {"temperature": 0.0, "max_new_tokens": 12}


async def _say(ws, sid, text):
    await send(ws, type="message", session=sid, text=text, sampling=GREEDY)
    events = await until(ws, done_of(sid), timeout=20)
    return "".join(e["text"] for e in events if e["type"] == "delta" and e["session"] == sid)


async def _parked(app, sid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while app.sessions.by_id[sid].parked is None:
        assert time.monotonic() < deadline, "the detached session was not parked"
        await asyncio.sleep(0.01)


def _disk(monkeypatch, error):
    """StateDir writes fail with `error` while `full["on"]` (what every write path calls)."""
    full = {"on": False}
    real = StateDir._write_temp

    def write_temp(self, *args):
        if full["on"]:
            raise error
        return real(self, *args)

    monkeypatch.setattr(StateDir, "_write_temp", write_temp)
    return full


def test_a_full_disk_still_ends_replies_frees_rows_and_keeps_the_last_file(rt, tmp_path, monkeypatch, caplog):
    """The file format library's own error (not an OSError) on a full disk."""
    full = _disk(monkeypatch, SafetensorError("No space left on device (os error 28)"))
    path = tmp_path / "state"

    async def main():
        async with serve(rt, state_dir=str(path)) as app:
            async with connect(ws_url(app)) as ws:
                sid = await create(ws)
                await _say(ws, sid, "Name a river.")
                before = (path / f"{sid}.session.safetensors").read_bytes()
                full["on"] = True
                reply = await _say(ws, sid, "And a mountain?")  # `done` arrives
                other = await create(ws)
                await _say(ws, other, "Hello.")
            await _parked(app, sid)
            await _parked(app, other)
            health, free = app.health(), await app.engine.free_rows()
            after = (path / f"{sid}.session.safetensors").read_bytes()
            return reply, before, after, health, free

    with caplog.at_level("ERROR"):
        reply, before, after, health, free = run(main())
        gc.collect()  # (a task whose exception nobody retrieved says so when collected)
    assert reply
    assert after == before  # the last good file stays
    assert health["active_sessions"] == 0 and health["parked_sessions"] == 2
    assert free == LIMITS.max_sessions  # every row went back
    assert "could not save session" in caplog.text and "No space left" in caplog.text
    assert "never retrieved" not in caplog.text


def test_a_session_whose_state_could_not_be_written_stays_resumable(rt, tmp_path, monkeypatch):
    """The disk is full from the start: no file is ever written. The left session's state stays in
    host memory (its row freed) and it goes on exactly as a session that never left."""
    full = _disk(monkeypatch, OSError(28, "No space left on device"))
    full["on"] = True

    async def main():
        async with serve(rt, state_dir=str(tmp_path / "state")) as app:
            async with connect(ws_url(app)) as ws:
                stay = await create(ws, system="You are terse.")
                stayed = [await _say(ws, stay, "Name a river."), await _say(ws, stay, "And a mountain?")]
            async with connect(ws_url(app)) as ws:
                leave = await create(ws, system="You are terse.")
                first = await _say(ws, leave, "Name a river.")
            await _parked(app, stay)
            await _parked(app, leave)
            in_memory = app.sessions.by_id[leave].parked is not ON_DISK
            active = app.sessions.active
            async with connect(ws_url(app)) as ws:
                await send(ws, type="session.create", resume=leave)
                created = await recv(ws)
                second = await _say(ws, leave, "And a mountain?")
            return stayed, [first, second], created, in_memory, active

    stayed, left, created, in_memory, active = run(main())
    assert in_memory and active == 0  # parked in host memory, its row given back
    assert created["type"] == "session.created" and created["resumed"] and created["messages"] == 3
    assert left == stayed


def test_a_hand_off_whose_write_failed_keeps_the_session(rt, tmp_path, monkeypatch):
    """Another server would resume it from an older file: it stays here, and is handed off once the
    disk takes writes again."""
    full = _disk(monkeypatch, OSError(28, "No space left on device"))
    path = tmp_path / "state"

    async def main():
        async with serve(rt, state_dir=str(path)) as app:
            async with connect(ws_url(app)) as ws:
                sid = await create(ws)
                full["on"] = True
                await _say(ws, sid, "Name a river.")
                refused = await app.hand_off(sid)
                kept = sid in app.sessions.by_id and app.sessions.by_id[sid].session is not None
                reply = await _say(ws, sid, "And a mountain?")  # still served here
                full["on"] = False
                handed = await app.hand_off(sid)
                return refused, kept, reply, handed, sid in app.sessions.by_id, sid

    refused, kept, reply, handed, still_here, sid = run(main())
    assert refused is False and kept and reply
    assert handed is True and not still_here
    from cache import state as cache_state

    assert len(cache_state.load(path / f"{sid}.session.safetensors")[2]["server"]["history"]) == 4


def test_a_file_damaged_while_its_session_is_parked_is_skipped_on_resume(rt, tmp_path, caplog):
    """As at start: logged, and the resume answered `unknown_session` (the file is kept)."""
    path = tmp_path / "state"

    async def main():
        async with serve(rt, state_dir=str(path)) as app:
            async with connect(ws_url(app)) as ws:
                sid = await create(ws)
                await _say(ws, sid, "Name a river.")
            await _parked(app, sid)
            file = path / f"{sid}.session.safetensors"
            blob = bytearray(file.read_bytes())
            blob[-300:-236] = bytes(b ^ 0xFF for b in blob[-300:-236])  # inside the tensor data
            file.write_bytes(bytes(blob))
            async with connect(ws_url(app)) as ws:
                await send(ws, type="session.create", resume=sid, id=3)
                answer = await recv(ws)
            return answer, sid in app.sessions.by_id, file.exists()

    with caplog.at_level("WARNING", logger="sinkstream.server"):
        answer, known, kept = run(main())
    assert answer["type"] == "error" and answer["code"] == "unknown_session" and answer["id"] == 3, answer
    assert "skipping saved session" in caplog.text and "checksum" in caplog.text
    assert not known and kept


def test_a_parked_session_whose_file_another_server_rewrote_resumes_what_the_file_holds(rt, tmp_path):
    """Servers sharing a directory: a stale copy of a session may write the file after this server
    parked the session on disk. The resume then takes the file's cache state with the transcript it was
    written with (never the cache of one conversation with the transcript of another), and the reply
    equals that of a session that held the file's conversation all along."""
    path = tmp_path / "state"

    async def main():
        async with serve(rt, state_dir=str(path)) as app:
            async with connect(ws_url(app)) as ws:
                sid = await create(ws)
                await _say(ws, sid, "Name a river.")
                older = (path / f"{sid}.session.safetensors").read_bytes()  # what the stale copy holds
                await _say(ws, sid, "And a mountain?")
            await _parked(app, sid)
            assert app.sessions.by_id[sid].parked is ON_DISK
            (path / f"{sid}.session.safetensors").write_bytes(older)
            async with connect(ws_url(app)) as ws:
                await create(ws, resume=sid)
                resumed = await _say(ws, sid, "Hello.")
                reference = await create(ws)
                await _say(ws, reference, "Name a river.")
                expected = await _say(ws, reference, "Hello.")
            return resumed, expected, len(app.sessions.by_id[sid].history)

    resumed, expected, messages = run(main())
    assert resumed and resumed == expected
    assert messages == 4  # the file's two turns, then this one
