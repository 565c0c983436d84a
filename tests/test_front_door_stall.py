"""The --ray front door closes a client that stops reading (ServerConfig.write_stall_s), as the single
server does: the replica then parks the client's sessions, whose rows go back, and they resume."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from websockets.asyncio.client import connect

from tests.test_front_door import LONG, _cluster, _run, _say, _stop, _url, checkpoint  # noqa: F401 (fixture)
from tests.test_server import create, send, until


def test_a_front_door_client_that_stops_reading_has_its_sessions_parked(checkpoint, tmp_path):  # noqa: F811
    async def main():
        door, servers, _ = _cluster(checkpoint, tmp_path)
        door.cfg = dataclasses.replace(door.cfg, write_stall_s=1.0)
        await door.start()
        try:
            frozen = await connect(_url(door))
            sid = await create(frozen)
            await send(frozen, type="message", session=sid, text="Talk.", sampling=LONG)
            await until(frozen, lambda e: e["type"] == "delta")
            frozen.transport.pause_reading()  # as a SIGSTOPped client
            for conn in door.server.connections:
                conn.pause_writing()  # (the front door's socket buffers to it are full)
            holder = next(s for s in servers if sid in s.app.sessions.by_id)
            t0 = time.monotonic()
            while holder.app.sessions.by_id[sid].parked is None:
                assert time.monotonic() - t0 < 15, "the frozen client's session was not parked"
                await asyncio.sleep(0.02)
            took, active = time.monotonic() - t0, holder.app.sessions.active
            frozen.transport.abort()
            async with connect(_url(door)) as ws:
                await send(ws, type="session.create", resume=sid)
                created = (await until(ws, lambda e: e["type"] in ("session.created", "error")))[-1]
                reply = (await _say(ws, sid, "Still there?"))[0]
            return took, active, created, reply
        finally:
            await _stop(door, servers)

    took, active, created, reply = _run(main())
    assert active == 0 and took < 10
    assert created["type"] == "session.created" and reply
