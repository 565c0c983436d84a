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


def test_a_stale_copy_never_writes_or_deletes_the_file_of_the_server_that_took_the_session_over(checkpoint, tmp_path):  # noqa: F811
    """Two replicas sharing a state directory, reached directly (no front door to reconcile them): the
    session moves from a to b by its file while a still holds it. a's park and a's expiry leave b's
    file alone."""
    import json

    from cache import state as cache_state

    def saved():
        return cache_state.load(tmp_path / (sid + SUFFIX))[2]["server"]

    async def main():
        nonlocal sid
        door, servers, _ = _cluster(checkpoint, tmp_path)
        a, b = servers
        url = "ws://127.0.0.1:{}/ws?token=" + door.internal_token
        try:
            ws_a = await connect(url.format(a.app.port))
            sid = await create(ws_a)
            await _say(ws_a, sid, "Hello there.")
            async with connect(url.format(b.app.port)) as ws_b:  # b takes it over from its file
                await send(ws_b, type="session.create", resume=sid)
                assert (await recv(ws_b))["type"] == "session.created"
                await _say(ws_b, sid, "Tell me more.")
            await _wait(lambda: b.app.sessions.by_id[sid].parked is ON_DISK)
            b_file = saved()
            await ws_a.close()  # a parks its stale copy: it must not write it over b's file
            await _wait(lambda: a.app.sessions.by_id[sid].parked is not None or a.app.sessions.by_id[sid].disowned)
            after_park = saved()
            await _on(a, a.app.drop(a.app.sessions.by_id[sid]))  # a's copy expires: the file stays
            exists = (tmp_path / (sid + SUFFIX)).exists()
            async with connect(url.format(b.app.port)) as ws_b:
                await send(ws_b, type="session.create", resume=sid)
                resumed = await recv(ws_b)
            return b_file, after_park, exists, resumed
        finally:
            await _stop(door, servers)

    sid = None
    b_file, after_park, exists, resumed = _run(main())
    assert len(b_file["history"]) == 4 and json.dumps(after_park) == json.dumps(b_file)
    assert exists and resumed["type"] == "session.created" and resumed["messages"] == 4
