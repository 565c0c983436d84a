"""The server on a pipelined engine (`--pipelined`): concurrent multi-turn chats give the plain
server's transcripts. A chat reply usually ends on a stop string, which the host only sees after the
next step was queued: that step is taken back, so the next turn starts from exactly the text the
user saw. (The tiny random model never writes the chat markers: here a turn also stops at "e".)"""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect

from tests.test_server import create, done_of, rt, run, send, serve, until, ws_url  # noqa: F401

GREEDY = {"temperature": 0.0, "max_new_tokens": 20}
TURNS = [["Tell me about rivers.", "And the sea?", "Why?"], ["Count the stars.", "Go on.", "Stop now."]]


async def _chats(app) -> list[list[tuple[str, str]]]:
    """The two sessions' turns sent side by side: [(text, finish reason, tokens in cache)] per session."""
    async with connect(ws_url(app)) as ws:
        sids = [await create(ws), await create(ws, system="You are terse.")]
        out = [[], []]
        for turn in range(3):
            for sid, turns in zip(sids, TURNS):
                await send(ws, type="message", session=sid, text=turns[turn], sampling=GREEDY)
            events = {sid: [] for sid in sids}
            finished = set()
            while finished != set(sids):
                event = (await until(ws, lambda e: e["type"] in ("delta", "done", "error")))[-1]
                assert event["type"] != "error", event
                events[event["session"]].append(event)
                if event["type"] == "done":
                    finished.add(event["session"])
            for i, sid in enumerate(sids):
                text = "".join(e["text"] for e in events[sid] if e["type"] == "delta")
                out[i].append((text, events[sid][-1]["finish_reason"], events[sid][-1]["usage"]["tokens_in_cache"]))
        return out


def test_pipelined_server_gives_the_plain_servers_transcripts(rt, monkeypatch):
    stops = (*rt.tokenizer.chat_stop_strings, "e")
    monkeypatch.setattr(type(rt.tokenizer), "chat_stop_strings", property(lambda self: stops))

    async def both():
        results = {}
        for pipelined in (False, True):
            async with serve(rt, pipelined=pipelined) as app:
                assert app.engine.pool.engine.pipelined is pipelined
                results[pipelined] = await _chats(app)
        return results

    results = run(both())
    assert results[True] == results[False]
    reasons = [reason for session in results[False] for _, reason, _ in session]
    assert reasons.count("stop") >= 3, reasons  # the take-back ran, on several turns
