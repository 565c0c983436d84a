"""Delta `seq` numbers never repeat for a session: not after `kill -9` and a restart on the same
--state-dir, not after the replica holding it fails behind the --ray front door, not after a hand-off.
A state file written before files reserved numbers still loads."""

from __future__ import annotations

import asyncio
import json

import torch
from websockets.asyncio.client import connect

from apps.server.state_dir import StateDir, conversation_of
from cache import state as cache_state
from tests.test_front_door import LONG, _cluster, _run, _stop, _url, checkpoint  # noqa: F401 (fixture)
from tests.test_server import create, done_of, send, until
from tests.test_server_restart import Server, _create, _recv


async def _reply_seqs(ws, sid: str, text: str) -> list[int]:
    """The seq of every delta of one greedy reply, and of its `done`, last."""
    await send(ws, type="message", session=sid, text=text, sampling={"temperature": 0.0, "max_new_tokens": 6})
    events = await until(ws, done_of(sid))
    return [e["seq"] for e in events if e.get("session") == sid and e["type"] in ("delta", "done")]


def test_seq_goes_on_past_what_a_killed_server_sent(checkpoint, tmp_path):  # noqa: F811
    state_dir = tmp_path / "state"
    first = Server(checkpoint, state_dir)
    try:
        async def before_kill():
            async with connect(first.url) as ws:
                sid = (await _create(ws))["session"]
                seen = await _reply_seqs(ws, sid, "Name a river.")
                await ws.send(json.dumps({"type": "message", "session": sid, "text": "Tell me more.",
                                          "sampling": {"max_new_tokens": 100000, "temperature": 1.0}}))
                deltas = 0
                while deltas < 5:  # the second reply is running: its deltas are past the last file
                    ev = await _recv(ws)
                    if ev["type"] == "delta":
                        seen.append(ev["seq"])
                        deltas += 1
                first.kill()
                return sid, seen

        sid, seen = asyncio.run(before_kill())
    finally:
        if first.proc.poll() is None:
            first.kill()
    second = Server(checkpoint, state_dir)
    try:
        async def after_restart():
            async with connect(second.url) as ws:
                await _create(ws, resume=sid)
                return await _reply_seqs(ws, sid, "And a mountain?")

        after = asyncio.run(after_restart())
    finally:
        second.stop()
    assert seen == sorted(seen) and len(after) > 1
    assert min(after) > max(seen), (seen, after)
    assert after == sorted(after) and len(set(after[:-1])) == len(after) - 1  # (done repeats the last delta's)


def test_seq_goes_on_past_what_a_failed_replica_sent(checkpoint, tmp_path):  # noqa: F811
    async def main():
        door, servers, backends = _cluster(checkpoint, tmp_path)
        await door.start()
        try:
            async with connect(_url(door)) as ws:
                sid = await create(ws)
                seen = await _reply_seqs(ws, sid, "Hello there.")
                victim = next(b for b in backends if sid in door.replica(b.name).sessions)
                await send(ws, type="message", session=sid, text="Go on forever.", sampling=LONG)
                events = await until(ws, lambda e: e["type"] == "delta" and e["seq"] >= seen[-1] + 5)
                victim.kill()
                events += await until(ws, done_of(sid))
                seen += [e["seq"] for e in events if e.get("session") == sid and e["type"] in ("delta", "done")]
                after = await _reply_seqs(ws, sid, "Tell me more.")
                return seen, after
        finally:
            await _stop(door, servers)

    seen, after = _run(main())
    assert len(after) > 1 and min(after) > max(seen), (seen, after)


def test_a_handed_off_session_numbers_on_without_a_gap(checkpoint, tmp_path):  # noqa: F811
    async def main():
        door, servers, _ = _cluster(checkpoint, tmp_path)
        await door.start()
        try:
            async with connect(_url(door)) as ws:
                sid = await create(ws)
                before = await _reply_seqs(ws, sid, "Hello there.")
                holder = next(r for r in door.table.replicas if sid in r.sessions)
                await door.drain(holder.name)
                moved = sid not in holder.sessions
                return before, await _reply_seqs(ws, sid, "Tell me more."), moved
        finally:
            await _stop(door, servers)

    before, after, moved = _run(main())
    assert moved and after[0] == before[-1] + 1  # a drain is clean: nothing was sent past the file


def test_a_state_file_without_a_seq_reservation_still_loads(tmp_path):
    store = StateDir(tmp_path)
    tensors = {"keys.0": torch.zeros(1, 2, 3, 4), "length": torch.tensor([3])}
    snapshot = (tensors, {"format": cache_state.FORMAT, "kind": "sink_window"}, {"model": "m"})
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    old, new = "old-session-abcdefgh", "new-session-abcdefgh"
    store.write(old, snapshot, conversation_of(history, {}, 7))
    store.write(new, snapshot, conversation_of(history, {}, 7, 7 + 101))
    assert "seq_high" not in cache_state.load(store.file(old))[2]["server"]
    assert store.load(old, lambda *a: None).seq == 7
    assert store.load(new, lambda *a: None).seq == 108
