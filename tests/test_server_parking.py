"""Detached sessions leave their cache rows (parked in host memory) and come back exactly on resume,
so disconnected users never lock others out (four connect -> create -> disconnect cycles must not fill
a 4-session server for the 15-minute idle timeout)."""

from __future__ import annotations

import asyncio
import json
import time

from websockets.asyncio.client import connect

from apps.protocol import Limits
from tests.test_server import LIMITS, create, done_of, recv, rt, run, send, serve, until, ws_url  # noqa: F401

GREEDY = {"temperature": 0.0, "max_new_tokens": 12}


async def _parked(app, sid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while app.sessions.by_id[sid].parked is None:
        assert time.monotonic() < deadline, "the detached session was not parked"
        await asyncio.sleep(0.01)


async def _say(ws, sid, text):
    await send(ws, type="message", session=sid, text=text, sampling=GREEDY)
    events = await until(ws, done_of(sid))
    return "".join(e["text"] for e in events if e["type"] == "delta" and e["session"] == sid)


def test_disconnects_never_lock_out_and_every_session_resumes(rt):
    async def main():
        async with serve(rt) as app:
            sessions = []
            for i in range(10):  # more than max_sessions (4) users come, talk and leave
                async with connect(ws_url(app)) as ws:
                    sid = await create(ws)
                    await _say(ws, sid, f"Hello number {i}.")
                    sessions.append(sid)
                await _parked(app, sid)
            health = app.health()
            async with connect(ws_url(app)) as ws:  # a newcomer still gets a session
                await create(ws)
            resumed = []
            for sid in sessions:  # and every earlier user can come back and go on
                async with connect(ws_url(app)) as ws:
                    await send(ws, type="session.create", resume=sid)
                    created = await recv(ws)
                    reply = await _say(ws, sid, "Welcome back.")
                    resumed.append((created, reply))
                await _parked(app, sid)
            return health, resumed

    health, resumed = run(main())
    assert health["active_sessions"] == 0 and health["parked_sessions"] == 10
    for created, reply in resumed:
        assert created["type"] == "session.created" and created["resumed"] and created["messages"] == 2
        assert reply


def test_a_parked_session_continues_exactly_as_if_never_left(rt):
    """Greedy replies of a session that left and came back between its two turns equal those of a
    session that stayed connected: the cache, logits, penalty history and transcript came back whole."""
    async def main():
        async with serve(rt) as app:
            async with connect(ws_url(app)) as ws:
                stay = await create(ws, system="You are terse.")
                stayed = [await _say(ws, stay, "Name a river."), await _say(ws, stay, "And a mountain?")]
            async with connect(ws_url(app)) as ws:
                leave = await create(ws, system="You are terse.")
                first = await _say(ws, leave, "Name a river.")
            await _parked(app, leave)
            async with connect(ws_url(app)) as ws:
                await send(ws, type="session.create", resume=leave)
                await recv(ws)
                second = await _say(ws, leave, "And a mountain?")
            return stayed, [first, second]

    stayed, left = run(main())
    assert left == stayed


def test_resume_when_every_row_is_taken_says_the_server_is_full(rt):
    limits = Limits(**{**LIMITS.as_dict(), "max_sessions": 1})

    async def main():
        async with serve(rt, limits=limits) as app:
            async with connect(ws_url(app)) as ws:
                away = await create(ws)
            await _parked(app, away)
            async with connect(ws_url(app)) as ws:
                await create(ws)  # takes the only row
                await send(ws, type="session.create", resume=away, id=5)
                full = await recv(ws)
            return full, app.sessions.by_id[away].parked is not None

    full, still_parked = run(main())
    assert full["code"] == "too_many_sessions" and full["id"] == 5 and "full" in full["message"]
    assert still_parked  # nothing lost: it can be resumed later


def test_delayed_close_is_called_off_by_a_resume_and_happens_without_one(rt):
    """What the page sends when its tab goes away (reload or close): session.close with after_s.
    A reload resumes in time and keeps the conversation; a closed tab's session is closed."""
    async def main():
        async with serve(rt) as app:
            async with connect(ws_url(app)) as ws:  # "reloaded": resumed within the delay
                kept = await create(ws)
                await _say(ws, kept, "Remember the river.")
                await send(ws, type="session.close", session=kept, after_s=0.5, id=7)
                closing = await recv(ws)
            async with connect(ws_url(app)) as ws:
                await send(ws, type="session.create", resume=kept)
                resumed = await recv(ws)
            async with connect(ws_url(app)) as ws:  # "closed tab": nobody comes back
                gone = await create(ws)
                await send(ws, type="session.close", session=gone, after_s=0.3)
                await recv(ws)
            async with connect(ws_url(app)) as ws:  # still attached and unused: closed too, and told
                idle = await create(ws)
                await send(ws, type="session.close", session=idle, after_s=0.3)
                await recv(ws)
                told = await asyncio.wait_for(recv(ws), timeout=5)
            await asyncio.sleep(1.6)  # past every delay and a reaper tick
            alive = set(app.sessions.by_id)
            async with connect(ws_url(app)) as ws:
                await send(ws, type="session.create", resume=gone)
                refused = await recv(ws)
                await send(ws, type="session.create", resume=kept)
                await recv(ws)
                again = await _say(ws, kept, "Go on.")
            return closing, resumed, told, alive, refused, again, kept, gone, idle

    closing, resumed, told, alive, refused, again, kept, gone, idle = run(main())
    assert closing == {"type": "session.closing", "session": kept, "after_s": 0.5, "id": 7}
    assert resumed["type"] == "session.created" and resumed["resumed"] and resumed["messages"] == 2
    assert told["type"] == "session.closed" and told["session"] == idle and "delayed" in told["reason"]
    assert kept in alive and gone not in alive and idle not in alive
    assert refused["type"] == "error" and refused["code"] == "unknown_session"
    assert again


def test_delayed_close_checks_its_delay(rt):
    async def main():
        async with serve(rt) as app:
            async with connect(ws_url(app)) as ws:
                sid = await create(ws)
                answers = []
                for bad in (0, -1, "10", True, 3601, float("nan")):
                    frame = '{"type":"session.close","session":"%s","after_s":%s}' % (
                        sid, "NaN" if bad != bad else json.dumps(bad))
                    await ws.send(frame)
                    answers.append(await recv(ws))
                return sid, answers, sid in app.sessions.by_id

    sid, answers, still_there = run(main())
    assert [a["code"] for a in answers] == ["bad_request"] * 6
    assert all("after_s" in a["message"] for a in answers)
    assert still_there


def test_a_client_that_stops_reading_has_its_sessions_parked(rt):  # noqa: F811
    """A frozen client (it reads nothing more) gives back its rows after ServerConfig.write_stall_s,
    not after the keepalive's tens of seconds; its session resumes and goes on."""
    async def main():
        async with serve(rt, write_stall_s=1.0) as app:
            frozen = await connect(ws_url(app))
            sid = await create(frozen)
            await send(frozen, type="message", session=sid, text="Talk.",
                       sampling={"max_new_tokens": 100_000, "temperature": 1.0, "seed": 3})
            await until(frozen, lambda e: e["type"] == "delta")
            # As a SIGSTOPped client: it reads nothing more, so the server's socket buffers fill and its
            # writes wait (websockets' flow control, here told at once that the buffers are full).
            frozen.transport.pause_reading()
            for conn in app.server.connections:
                conn.pause_writing()
            t0 = time.monotonic()
            await _parked(app, sid, timeout=15)
            took, active = time.monotonic() - t0, app.sessions.active
            frozen.transport.abort()
            async with connect(ws_url(app)) as ws:
                await send(ws, type="session.create", resume=sid)
                created = (await until(ws, lambda e: e["type"] in ("session.created", "error")))[-1]
                reply = await _say(ws, sid, "Still there?")
            return took, active, created, reply

    took, active, created, reply = run(main())
    assert active == 0 and took < 10  # (the keepalive would have taken 20 s and more)
    assert created["type"] == "session.created" and created["resumed"] and reply
