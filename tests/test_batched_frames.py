"""Batched frames (`?frames=batched`, the --ray front door's links to replicas): the same events as
one per frame, several to a frame; and the front door's fast reading of delta events."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from websockets.asyncio.client import connect

from apps import protocol
from apps.cluster.front_door import _delta_fields
from tests.test_server import LIMITS, rt, serve  # noqa: F401

GREEDY = {"temperature": 0.0, "max_new_tokens": 16}


def test_batched_connection_gets_the_same_events_several_to_a_frame(rt):
    async def replies(app, batched: bool):
        query = "?frames=batched" if batched else ""
        async with connect(f"ws://127.0.0.1:{app.port}/ws{query}") as ws:
            frames, sids = [], []
            for _ in range(3):
                await ws.send(json.dumps({"type": "session.create"}))
                frame = await asyncio.wait_for(ws.recv(), 20)
                sids.append(json.loads(frame.split("\n")[0])["session"])
            for sid in sids:  # three replies at once: each engine step has news for all three
                await ws.send(json.dumps({"type": "message", "session": sid, "text": "Hello.", "sampling": GREEDY}))
            done = 0
            while done < 3:
                frame = await asyncio.wait_for(ws.recv(), 30)
                frames.append(frame)
                done += sum(json.loads(text)["type"] == "done" for text in frame.split("\n"))
            events = [json.loads(text) for frame in frames for text in frame.split("\n")]
            # Per session: its text, its deltas numbered 1..k, and how it ended (how many tokens
            # one delta carries depends on timing: deltas coalesce).
            by_session = {}
            for i, sid in enumerate(sids):
                mine = [e for e in events if e["session"] == sid]
                deltas = [e for e in mine if e["type"] == "delta"]
                assert [e["seq"] for e in deltas] == list(range(1, len(deltas) + 1))
                assert [e["type"] for e in mine[len(deltas):]] == ["done"]
                by_session[i] = ("".join(e["text"] for e in deltas), mine[-1]["finish_reason"])
            return frames, events, by_session

    async def main():
        # (room for both runs' sessions: the first run's park as its connection closes, not at once)
        async with serve(rt, limits=dataclasses.replace(LIMITS, max_sessions=8)) as app:
            plain = await replies(app, False)
            batched = await replies(app, True)
        return plain, batched

    (plain_frames, _, plain), (frames, events, batched) = asyncio.run(asyncio.wait_for(main(), 120))
    assert all("\n" not in frame for frame in plain_frames)  # ordinary clients: one event a frame
    assert len(frames) < len(events)  # several events shared a frame
    assert batched == plain  # the same replies, in order


def test_delta_fields_read_like_json():
    texts = ["", "plain", 'quo"tes', "new\nline", "ünïcödé ✓", '{"type":"delta","session":"x"}', "\\"]
    for i, text in enumerate(texts):
        event = protocol.delta(f"sid_{i}-AbC", 10 ** i, text)
        assert _delta_fields(protocol.dumps(event)) == {k: event[k] for k in ("type", "session", "seq")}
    for other in (protocol.done("sid", 3, "stop", {}), protocol.error("bad_json", "x"),
                  protocol.closed("sid", "closed by client")):
        assert _delta_fields(protocol.dumps(other)) is None
