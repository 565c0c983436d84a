"""Detached sessions leave their cache rows (parked in host memory) and come back exactly on resume,
so disconnected users never lock others out (issue 10: four connect -> create -> disconnect cycles
used to fill a 4-session server for the 15-minute idle timeout)."""

from __future__ import annotations

import asyncio
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
