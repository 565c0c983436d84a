"""`serve --ray` on a local Ray cluster: two Ray Serve replicas of the bundled model on CPU behind the
front door. Ray and both replicas start once for the module (about 20 s). tests/test_front_door.py
covers the same logic with in-process replicas."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install -e \".[ray]\")")

from websockets.asyncio.client import connect  # noqa: E402

from apps.protocol import Limits  # noqa: E402
from apps.server import ServerConfig, running  # noqa: E402
from tests.test_server import create, done_of, recv, send, until  # noqa: E402

LIMITS = Limits(max_message_bytes=4096, max_prompt_tokens=300, max_new_tokens=10, max_new_tokens_cap=100_000,
                max_sessions=8, idle_timeout_s=120, sinks=4, window=124)
GREEDY = {"temperature": 0.0, "max_new_tokens": 10}
LONG = {"max_new_tokens": 100_000, "temperature": 1.0, "seed": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(deployer, backends): Ray, Serve and two replicas, for every test of the module."""
    import ray
    from ray import serve

    from apps.cluster.ray_backend import Deployer, Placement, start_ray
    from apps.cluster.replica import ReplicaSpec

    started = start_ray(None, num_cpus=2)
    spec = ReplicaSpec(model=None, device="cpu", dtype="float32", limits=LIMITS.__dict__.copy(),
                       state_dir=str(tmp_path_factory.mktemp("state")), token=secrets.token_urlsafe(16), chunk=64)
    deployer = Deployer(spec, Placement(gpus=0, cpus=1))
    backends = [deployer.deploy(), deployer.deploy()]
    yield deployer, backends
    serve.shutdown()
    if started:
        ray.shutdown()


def _door(cluster):
    from apps.cluster.front_door import FrontDoor

    deployer, backends = cluster
    return FrontDoor(backends, ServerConfig(host="127.0.0.1", port=0, limits=LIMITS, model_name="bundled"),
                     deployer.spec.token)


async def _say(ws, sid, text):
    await send(ws, type="message", session=sid, text=text, sampling=GREEDY)
    events = await until(ws, done_of(sid), timeout=120)
    return "".join(e["text"] for e in events if e["type"] == "delta")


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 400))


def _reference(conversations: list[list[str]]) -> list[list[str]]:
    """The single-process server's greedy replies, same model and limits."""
    import streaming

    async def main():
        rt = streaming.load(None, device="cpu", dtype="float32")
        out = []
        async with running(rt, ServerConfig(host="127.0.0.1", port=0, limits=LIMITS, chunk=64)) as app:
            async with connect(f"ws://127.0.0.1:{app.port}/ws") as ws:
                for turns in conversations:
                    sid = await create(ws)
                    out.append([await _say(ws, sid, text) for text in turns])
        return out
    return _run(main())


def test_eight_sessions_spread_over_two_replicas_equal_the_single_server(cluster):
    conversations = [[f"Tell me about the number {i}.", "Why?"] for i in range(8)]

    async def main():
        door = _door(cluster)
        await door.start()
        try:
            async def user(pair):
                async with connect(f"ws://127.0.0.1:{door.port}/ws") as ws:
                    sids = [await create(ws) for _ in pair]
                    return await asyncio.gather(*(_talk(ws, sid, turns) for sid, turns in zip(sids, pair)))

            async def _talk(ws, sid, turns):
                return [await _say_shared(ws, sid, text) for text in turns]

            replies = await asyncio.gather(*(user(conversations[i:i + 2]) for i in range(0, 8, 2)))
            placed = {r.name: len(r.sessions) for r in door.table.replicas}
            return [r for pair in replies for r in pair], placed, door.health()
        finally:
            await door.stop()

    replies, placed, health = _run(main())
    assert len(placed) == 2 and all(n > 0 for n in placed.values()) and sum(placed.values()) == 8
    assert len(health["replicas"]) == 2 and all(r["alive"] for r in health["replicas"])
    assert replies == _reference(conversations)


# Two sessions on one connection reply at once: each reader takes only its own session's events.
_queues: dict = {}


async def _say_shared(ws, sid, text):
    queues = _queues.setdefault(ws, {})
    if not queues:  # the first user of the connection starts its reader
        queues["__reader__"] = asyncio.create_task(_read_into(ws, queues))
    queue = queues.setdefault(sid, asyncio.Queue())
    await send(ws, type="message", session=sid, text=text, sampling=GREEDY)
    parts = []
    while True:
        event = await asyncio.wait_for(queue.get(), 120)
        if event["type"] == "delta":
            parts.append(event["text"])
        elif event["type"] == "done":
            return "".join(parts)
        else:
            raise AssertionError(event)


async def _read_into(ws, queues):
    while True:
        event = await recv(ws, timeout=300)
        queues.setdefault(event.get("session"), asyncio.Queue()).put_nowait(event)


def test_drain_moves_sessions_and_their_next_replies_are_unchanged(cluster):
    conversations = [[f"A story about a {animal}.", "What happened next?"] for animal in ("cat", "dog", "fox", "owl")]

    async def main():
        door = _door(cluster)
        await door.start()
        try:
            async with connect(f"ws://127.0.0.1:{door.port}/ws") as ws:
                sids = [await create(ws) for _ in conversations]
                replies = [[await _say(ws, sid, turns[0])] for sid, turns in zip(sids, conversations)]
                name = max(door.table.replicas, key=lambda r: len(r.sessions)).name
                before = set(door.replica(name).sessions)
                moved = await door.drain(name)
                left = set(door.replica(name).sessions)
                for sid, turns, got in zip(sids, conversations, replies):
                    got.append(await _say(ws, sid, turns[1]))
                door.undrain(name)
                return replies, before, moved, left
        finally:
            await door.stop()

    replies, before, moved, left = _run(main())
    assert before and moved == len(before) and not left
    assert replies == _reference(conversations)


def test_a_killed_replica_ends_its_reply_and_its_sessions_resume_on_the_other(cluster):
    async def main():
        door = _door(cluster)
        await door.start()
        try:
            async with connect(f"ws://127.0.0.1:{door.port}/ws") as ws:
                sids = [await create(ws) for _ in range(4)]
                first = [await _say(ws, sid, "Hello there.") for sid in sids]
                victim = next(r for r in door.table.replicas if r.sessions)
                on_victim = set(victim.sessions)
                doomed = next(iter(on_victim))
                await send(ws, type="message", session=doomed, text="Go on forever.", sampling=LONG)
                await until(ws, lambda e: e["type"] == "delta" and e["session"] == doomed, timeout=120)
                os.kill(await victim.backend.pid(), signal.SIGKILL)
                events = await until(ws, done_of(doomed), timeout=120)
                second = [await _say(ws, sid, "Tell me more.") for sid in sids]
                where = {sid: next((r.name for r in door.table.replicas if sid in r.sessions), None) for sid in sids}
                return first, second, events, victim.name, on_victim, where
        finally:
            await door.stop()

    first, second, events, victim, on_victim, where = _run(main())
    errors = [e for e in events if e["type"] == "error"]
    assert events[-1]["finish_reason"] == "error" and errors and errors[0]["code"] == "replica_failed"
    assert all(where[sid] not in (None, victim) for sid in on_victim)  # moved to the other replica
    reference = _reference([["Hello there.", "Tell me more."]])[0]
    assert first == [reference[0]] * 4 and second == [reference[1]] * 4  # from the last completed reply
