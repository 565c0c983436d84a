"""A session has one owner behind the --ray front door: a replica taken for failed by one missed health
call, whose sessions moved elsewhere meanwhile, forgets them when it answers again, and never writes or
deletes their files (its copy's expiry used to delete the file the new owner resumes from)."""

from __future__ import annotations

import asyncio
import time

from websockets.asyncio.client import connect

from apps.server.sessions import ON_DISK
from apps.server.state_dir import SUFFIX
from tests.test_front_door import Dying, _cluster, _run, _say, _stop, _url, checkpoint  # noqa: F401 (fixture)
from tests.test_server import create, recv, send


class Flaky(Dying):
    """A replica whose next health call fails once (a timeout under load), though it is alive."""
    miss = False

    async def ident(self):
        if self.miss:
            self.miss = False
            raise TimeoutError("health call timed out")
        return await super().ident()


async def _on(server, coro):
    """Run a coroutine on a replica server's own event loop."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, server.loop))


async def _wait(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_falsely_failed_replica_forgets_the_sessions_that_moved_and_keeps_their_files(checkpoint, tmp_path):  # noqa: F811
    async def main():
        door, servers, backends = _cluster(checkpoint, tmp_path)
        for backend in backends:
            backend.__class__ = Flaky
        await door.start()
        try:
            ws = await connect(_url(door))
            sid = await create(ws)
            first = (await _say(ws, sid, "Hello there."))[0]
            old = next(b for b in backends if sid in door.replica(b.name).sessions)
            new = next(b for b in backends if b is not old)
            old.miss = True
            await door.refresh()  # one missed health call: its sessions move to the other replica
            await _wait(lambda: sid in door.replica(new.name).sessions and door.table.routes[sid].moving is None)
            await door.refresh()  # it answers again
            old_holds = sid in old.server.app.sessions.by_id
            await ws.close()  # the user leaves: the new owner parks the session in its file
            await _wait(lambda: new.server.app.sessions.by_id[sid].parked is ON_DISK)
            stale = old.server.app.sessions.by_id.get(sid)
            if stale is not None:  # the old copy expires, as it would after the idle timeout
                await _on(old.server, old.server.app.drop(stale))
            on_disk = (tmp_path / (sid + SUFFIX)).exists()
            async with connect(_url(door)) as again:
                await send(again, type="session.create", resume=sid)
                resumed = await recv(again)
                second = (await _say(again, sid, "Tell me more."))[0] if resumed["type"] == "session.created" else None
            return first, old_holds, on_disk, resumed, second
        finally:
            await _stop(door, servers)

    first, old_holds, on_disk, resumed, second = _run(main())
    assert on_disk and resumed["type"] == "session.created" and resumed["messages"] == 2 and second
    assert first and not old_holds  # the old replica forgot the session when it answered again
