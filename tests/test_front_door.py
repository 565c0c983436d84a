"""The front door of `serve --ray` with two in-process replicas (the Ray-free part of the cluster):
routing and affinity, drain, a replica's failure, health. tests/test_ray_serve.py runs the same
front door over real Ray Serve replicas of the bundled model."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
from websockets.asyncio.client import connect

from apps.cluster.front_door import FrontDoor
from apps.cluster.replica import LocalBackend, ReplicaServer, ReplicaSpec
from apps.protocol import Limits
from apps.server import ServerConfig, running
from tests.test_server import create, done_of, recv, send, until

LIMITS = Limits(max_message_bytes=4096, max_prompt_tokens=300, max_new_tokens=12, max_new_tokens_cap=100_000,
                max_sessions=6, idle_timeout_s=60, sinks=4, window=60)
GREEDY = {"temperature": 0.0, "max_new_tokens": 12}
LONG = {"max_new_tokens": 100_000, "temperature": 1.0, "seed": 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "lckv"))


class Dying(LocalBackend):
    """A local replica that can fail like a killed process: its connections drop, its calls fail."""
    dead = False

    async def _alive(self):
        if self.dead:
            raise ConnectionError("replica process is gone")

    async def stats(self):
        await self._alive()
        return await super().stats()

    async def ident(self):
        await self._alive()
        return await super().ident()

    def kill(self) -> None:
        self.dead = True
        server = self.server

        async def drop():
            server.app.server.close()  # no new connections; every open one aborted, no close frame
            for connection in list(server.app.server.connections):
                connection.transport.abort()
        asyncio.run_coroutine_threadsafe(drop(), server.loop).result(10)


async def _stop(door, servers) -> None:
    """Stop the front door, then every replica server behind it."""
    await door.stop()
    for server in servers:
        server.shutdown()


def _cluster(checkpoint, state_dir, names=("a", "b"), engine_process=None):
    token = secrets.token_urlsafe(16)
    spec = ReplicaSpec(model=checkpoint, device="cpu", dtype="float32", limits=LIMITS.__dict__.copy(),
                       state_dir=str(state_dir), token=token, chunk=32, model_name="tiny",
                       engine_process=engine_process)
    servers = [ReplicaServer(spec) for _ in names]
    backends = [Dying(name, server) for name, server in zip(names, servers)]
    door = FrontDoor(backends, ServerConfig(host="127.0.0.1", port=0, limits=LIMITS, model_name="tiny"), token)
    return door, servers, backends


def _url(door) -> str:
    return f"ws://127.0.0.1:{door.port}/ws"


async def _say(ws, sid, text, sampling=GREEDY):
    await send(ws, type="message", session=sid, text=text, sampling=sampling)
    events = await until(ws, done_of(sid))
    return "".join(e["text"] for e in events if e["type"] == "delta" and e["session"] == sid), events[-1]


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


async def _single_server_replies(checkpoint, prompts: list[list[str]]) -> list[list[str]]:
    """Each conversation's greedy replies from one ordinary server (the reference)."""
    import streaming

    rt = streaming.load(checkpoint, device="cpu", dtype="float32")
    out = []
    async with running(rt, ServerConfig(host="127.0.0.1", port=0, limits=LIMITS, chunk=32, model_name="tiny")) as app:
        async with connect(f"ws://127.0.0.1:{app.port}/ws") as ws:
            for turns in prompts:
                sid = await create(ws)
                out.append([(await _say(ws, sid, text))[0] for text in turns])
                await send(ws, type="session.close", session=sid)
                await until(ws, lambda e: e["type"] == "session.closed")
    return out


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-in-replica", "engine-apart"])
def test_sessions_spread_over_replicas_and_equal_the_single_server(checkpoint, tmp_path, engine_process):
    conversations = [[f"Hello number {i}.", "Tell me more."] for i in range(8)]

    async def main():
        door, servers, _ = _cluster(checkpoint, tmp_path, engine_process=engine_process)
        await door.start()
        try:
            async def user(turns):
                async with connect(_url(door)) as ws:
                    sid = await create(ws)
                    return [(await _say(ws, sid, text))[0] for text in turns]
            replies = await asyncio.gather(*(user(turns) for turns in conversations))
            await door.refresh()
            health = door.health()
            placed = {r.name: len(r.sessions) for r in door.table.replicas}
            return replies, health, placed
        finally:
            await _stop(door, servers)

    replies, health, placed = _run(main())
    assert placed["a"] > 0 and placed["b"] > 0 and sum(placed.values()) == 8  # both replicas used
    assert [r["name"] for r in health["replicas"]] == ["a", "b"] and all(r["alive"] for r in health["replicas"])
    assert all(r["engine"]["steps"] > 0 for r in health["replicas"])  # each replica's engine stepped
    assert replies == _run(_single_server_replies(checkpoint, conversations))


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine-in-replica", "engine-apart"])
def test_drain_moves_sessions_and_their_replies_are_unchanged(checkpoint, tmp_path, engine_process):
    conversations = [[f"Story {i}.", "And then?", "The end."] for i in range(4)]

    async def main():
        door, servers, _ = _cluster(checkpoint, tmp_path, engine_process=engine_process)
        await door.start()
        try:
            async with connect(_url(door)) as ws:
                sids = [await create(ws) for _ in conversations]
                replies = [[(await _say(ws, sid, turns[0]))[0]] for sid, turns in zip(sids, conversations)]
                on_a = set(door.replica("a").sessions)
                assert on_a, "no session went to replica a"
                moved = await door.drain("a")
                after = {r.name: set(r.sessions) for r in door.table.replicas}
                for sid, turns, got in zip(sids, conversations, replies):
                    for text in turns[1:]:
                        got.append((await _say(ws, sid, text))[0])
                async with connect(_url(door)) as other:  # a new session avoids the draining replica
                    fresh = await create(other)
                return replies, on_a, moved, after, door.replica("b").sessions, fresh, servers[0].app.health()
        finally:
            await _stop(door, servers)

    replies, on_a, moved, after, on_b, fresh, a_health = _run(main())
    assert moved == len(on_a) and not after["a"] and on_a <= after["b"]
    assert fresh in on_b and a_health["sessions"] == 0  # replica a forgot every session
    assert replies == _run(_single_server_replies(checkpoint, conversations))


def test_a_failed_replica_ends_its_reply_with_an_error_and_its_sessions_resume_elsewhere(checkpoint, tmp_path):
    async def main():
        door, servers, backends = _cluster(checkpoint, tmp_path)
        await door.start()
        try:
            async with connect(_url(door)) as ws:
                sids = [await create(ws) for _ in range(4)]
                first = {sid: (await _say(ws, sid, "Hello there."))[0] for sid in sids}
                victim = next(b for b in backends if door.replica(b.name).sessions)
                doomed = next(iter(door.replica(victim.name).sessions))
                await send(ws, type="message", session=doomed, text="Go on forever.", sampling=LONG)
                await until(ws, lambda e: e["type"] == "delta" and e["session"] == doomed)
                victim.kill()
                events = await until(ws, done_of(doomed))
                errors = [e for e in events if e["type"] == "error" and e.get("session") == doomed]
                t0 = time.monotonic()
                second = {sid: (await _say(ws, sid, "Tell me more."))[0] for sid in sids}
                took = time.monotonic() - t0
                survivors = {r.name: set(r.sessions) for r in door.table.replicas}
                health = door.health()
                return first, second, events[-1], errors, victim.name, survivors, health, took
        finally:
            await _stop(door, servers)

    first, second, done, errors, victim, survivors, health, took = _run(main())
    assert done["finish_reason"] == "error" and errors and errors[0]["code"] == "replica_failed"
    assert not survivors[victim] and len(next(v for k, v in survivors.items() if k != victim)) == 4
    assert [r["alive"] for r in health["replicas"] if r["name"] == victim] == [False]
    # Every session went on from its last completed reply: the failed reply is not in its history.
    reference = _run(_single_server_replies(checkpoint, [["Hello there.", "Tell me more."]]))[0]
    assert all(first[sid] == reference[0] and second[sid] == reference[1] for sid in first)


def test_drain_over_http_needs_the_token_and_names_a_replica(checkpoint, tmp_path):
    import json
    import urllib.error
    import urllib.request

    def get(url):
        try:
            with urllib.request.urlopen(url, timeout=20) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = error.read().decode()
            return error.code, json.loads(body) if body.startswith("{") else body

    async def main():
        door, servers, _ = _cluster(checkpoint, tmp_path)
        door.cfg = ServerConfig(host="127.0.0.1", port=0, limits=LIMITS, model_name="tiny", token="s3cret")
        await door.start()
        try:
            async with connect(_url(door) + "?token=s3cret") as ws:
                sid = await create(ws)
                await _say(ws, sid, "Hello.")
                holder = next(r.name for r in door.table.replicas if sid in r.sessions)
                base = f"http://127.0.0.1:{door.port}"
                no_token = await asyncio.to_thread(get, f"{base}/drain?replica={holder}")
                unknown = await asyncio.to_thread(get, f"{base}/drain?replica=nope&token=s3cret")
                started = await asyncio.to_thread(get, f"{base}/drain?replica={holder}&token=s3cret")
                for _ in range(200):  # the drain runs in the background; /healthz shows it
                    health = (await asyncio.to_thread(get, f"{base}/healthz?token=s3cret"))[1]
                    if [r["sessions"] for r in health["replicas"] if r["name"] == holder] == [0]:
                        break
                    await asyncio.sleep(0.05)
                reply, _ = await _say(ws, sid, "Still there?")
                return no_token, unknown, started, health, holder, reply
        finally:
            await _stop(door, servers)

    no_token, unknown, started, health, holder, reply = _run(main())
    assert no_token[0] == 401 and unknown[0] == 404 and unknown[1]["replicas"] == ["a", "b"]
    assert started == (202, {"draining": holder, "sessions": 1})
    drained = next(r for r in health["replicas"] if r["name"] == holder)
    assert drained["draining"] and drained["sessions"] == 0 and health["sessions"] == 1
    assert reply  # the session went on, on the other replica


def test_replica_counts_and_scaling_policy():
    import argparse

    from apps.cluster.cli import replica_counts
    from apps.cluster.ray_backend import Scaler

    def ns(**kw):
        return argparse.Namespace(**{"replicas": None, "min_replicas": None, "max_replicas": None, **kw})

    assert replica_counts(ns()) == (1, 1)
    assert replica_counts(ns(replicas=3)) == (3, 3)
    assert replica_counts(ns(min_replicas=1, max_replicas=4)) == (1, 4)
    for bad in (ns(replicas=2, max_replicas=3), ns(min_replicas=3, max_replicas=2), ns(replicas=0)):
        with pytest.raises(SystemExit):
            replica_counts(bad)
    scaler = Scaler(door=None, deployer=None, least=1, most=4, target=0.75)
    assert [scaler.wanted(active, 100) for active in (0, 75, 76, 150, 151, 1000)] == [1, 1, 2, 2, 3, 4]


def test_scaler_adds_a_replica_under_load_and_drains_one_when_quiet(checkpoint, tmp_path):
    """The scaler of `serve --ray --min-replicas 1 --max-replicas 2`, with in-process replicas."""
    from apps.cluster.ray_backend import Scaler

    token = secrets.token_urlsafe(16)
    spec = ReplicaSpec(model=checkpoint, device="cpu", dtype="float32", limits=LIMITS.__dict__.copy(),
                       state_dir=str(tmp_path), token=token, chunk=32, model_name="tiny")

    class LocalDeployer:  # what ray_backend.Deployer does, in this process
        def __init__(self):
            self.spec, self.servers, self.count = spec, {}, 0

        def deploy(self):
            name = f"r{self.count}"
            self.count += 1
            self.servers[name] = ReplicaServer(spec)
            return LocalBackend(name, self.servers[name])

        def delete(self, name):
            self.servers.pop(name).shutdown()

    async def main():
        deployer = LocalDeployer()
        door = FrontDoor([deployer.deploy()], ServerConfig(host="127.0.0.1", port=0, limits=LIMITS), token)
        await door.start()
        scaler = asyncio.create_task(Scaler(door, deployer, 1, 2, period_s=0.2, quiet_s=0.5).run())
        try:
            async with connect(_url(door)) as ws:
                sids = [await create(ws) for _ in range(5)]  # 5 of 6 rows: over 75 %
                for _ in range(300):
                    if len(door.table.replicas) == 2 and all(r.alive for r in door.table.replicas):
                        break
                    await asyncio.sleep(0.05)
                grown = [r.name for r in door.table.replicas]
                newcomer = await create(ws)  # goes to the new, emptier replica
                on_new = newcomer in door.replica("r1").sessions
                for sid in sids[:4] + [newcomer]:
                    await send(ws, type="session.close", session=sid)
                    await until(ws, lambda e: e["type"] == "session.closed" and e["session"] == sid)
                for _ in range(400):
                    if len(door.table.replicas) == 1:
                        break
                    await asyncio.sleep(0.05)
                shrunk = [r.name for r in door.table.replicas]
                reply, _ = await _say(ws, sids[4], "Are you still there?")  # the survivor went on
                return grown, on_new, shrunk, reply, sorted(deployer.servers)
        finally:
            scaler.cancel()
            await _stop(door, deployer.servers.values())

    grown, on_new, shrunk, reply, left = _run(main())
    assert grown == ["r0", "r1"] and on_new
    assert len(shrunk) == 1 and left == shrunk and reply


class StaleStats:
    """A replica whose health still counts every row free (creates sent to it are not answered yet)."""

    def __init__(self, name: str, rows: int) -> None:
        self.name, self.rows = name, rows

    async def address(self) -> str:
        return "ws://127.0.0.1:9/ws"

    async def stats(self) -> dict:
        return {"active_sessions": 0, "free_rows": self.rows, "max_sessions": self.rows}

    async def ident(self) -> str:
        return self.name

    async def hand_off(self, sids):
        return [False] * len(sids)

    async def session_ids(self):
        return []


def test_creates_in_flight_count_against_a_replicas_free_rows_across_polls():
    """A burst of creates spreads by free rows even when a poll lands before the replicas answer
    (a 2 x 500-row run once sent 502 creates to one replica: two too_many_sessions errors)."""
    async def main():
        door = FrontDoor([StaleStats("a", 2), StaleStats("b", 2)], ServerConfig(port=0, limits=Limits()), "t")
        await door.refresh()
        picks = []
        for _ in range(4):
            picks.append(door._pick(None).name)
            await door.refresh()  # a poll between creates: the answers have not come yet
        return picks
    assert sorted(asyncio.run(main())) == ["a", "a", "b", "b"]


class Boasting(Dying):
    """A replica whose health always claims every row free (as a stale poll would)."""

    async def stats(self):
        return {**await super().stats(), "free_rows": 10**6, "creates_handled": 10**6}


def test_a_create_refused_for_want_of_rows_goes_to_another_replica(checkpoint, tmp_path):
    """The front door's count of a replica's free rows can be wrong (another front door, a resume);
    a replica that refuses a create as full is passed over, and the client never sees it."""
    async def main():
        door, servers, backends = _cluster(checkpoint, tmp_path)
        backends[0] = Boasting("a", servers[0])
        door.table.replicas[0].backend = backends[0]
        await door.start()
        try:
            async with connect(_url(door)) as ws:
                answers = []
                for i in range(2 * LIMITS.max_sessions):  # every row of both replicas
                    await send(ws, type="session.create", id=f"c{i}")
                    answers.append(await recv(ws))
            placed = [len(r.sessions) for r in door.table.replicas]
        finally:
            await _stop(door, servers)
        return answers, placed

    answers, placed = _run(main())
    assert [a["type"] for a in answers] == ["session.created"] * (2 * LIMITS.max_sessions), answers
    assert [a["id"] for a in answers] == [f"c{i}" for i in range(2 * LIMITS.max_sessions)]
    assert placed == [LIMITS.max_sessions, LIMITS.max_sessions]


def test_a_restarted_front_door_sends_each_resume_to_the_replica_that_holds_the_session(checkpoint, tmp_path):
    """The route table lives in the front door: a new one learns from the replicas which sessions
    each holds, so a resume never makes a second replica read a live session from its file (two
    copies of one conversation, and the idle one's expiry would delete the file the other uses)."""
    conversations = [[f"Hello number {i}.", "Tell me more."] for i in range(6)]

    async def main():
        door, servers, backends = _cluster(checkpoint, tmp_path)
        await door.start()
        try:
            async with connect(_url(door)) as ws:
                sids = [await create(ws) for _ in conversations]
                replies = [[(await _say(ws, sid, turns[0]))[0]] for sid, turns in zip(sids, conversations)]
            placed = {sid: route.replica.name for sid, route in door.table.routes.items()}
            await door.stop()
            door = FrontDoor(backends, door.cfg, door.internal_token)  # the front door restarted
            await door.start()
            order = sorted(range(len(sids)), key=lambda i: placed[sids[i]], reverse=True)  # b's first
            async with connect(_url(door)) as ws:
                for sid, turns, got in [(sids[i], conversations[i], replies[i]) for i in order]:
                    await send(ws, type="session.create", resume=sid)
                    assert (await recv(ws))["type"] == "session.created"
                    got.append((await _say(ws, sid, turns[1]))[0])
            holders = {sid: [name for name, s in zip("ab", servers) if sid in s.app.sessions.by_id] for sid in sids}
            return replies, placed, holders
        finally:
            await _stop(door, servers)

    replies, placed, holders = _run(main())
    assert set(placed.values()) == {"a", "b"}  # the sessions were on both replicas
    assert holders == {sid: [name] for sid, name in placed.items()}  # each on its own replica only
    assert replies == _run(_single_server_replies(checkpoint, conversations))
