"""A live stream while another session sends a long prompt: the stream's worst pause, and how long a
cancel of that prompt takes to be answered. The websocket server on the bundled model (CPU by default).

    PYTHONPATH=. python benchmarks/server_long_prompt.py --prompt-tokens 3000 [--device cuda] [--chunk N]

Session A streams an unbounded sampled reply; session B sends a prompt of about `--prompt-tokens`
tokens. Reported: A's largest gap between deltas while B's prompt is ingested (until B's first
delta), the same gap before B arrived, B's time to first token, and, in a second round, the time
from B's `cancel` (sent 0.5 s into its prompt) to its `done`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

import torch
from websockets.asyncio.client import connect

import streaming
from apps.protocol import Limits
from apps.server.app import ServerConfig, running

STORY = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
         "of foolishness, it was the epoch of belief, it was the epoch of incredulity. ")


def progress(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


async def create(ws) -> str:
    await ws.send(json.dumps({"type": "session.create"}))
    return json.loads(await ws.recv())["session"]


def long_prompt(rt, tokens: int) -> str:
    text = STORY
    while len(rt.tokenizer.encode(text)) < tokens:
        text += STORY
    return text


A_MESSAGE = {"type": "message", "text": "Tell me a story.",
             "sampling": {"max_new_tokens": 100_000, "temperature": 0.8, "seed": 1}}


async def round_trip(app, rt, prompt: str, cancel_after: float | None):
    async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:
        a, b = await create(ws), await create(ws)
        await ws.send(json.dumps({**A_MESSAGE, "session": a}))
        state = {"last": None}

        async def next_event():
            """The next event; A is kept streaming: when its reply ends (the model may end it), the
            next message goes out at once and no gap is counted across the two replies."""
            event = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if event.get("session") == a and event["type"] == "done":
                state["last"] = None
                await ws.send(json.dumps({**A_MESSAGE, "session": a}))
            return event, time.perf_counter()

        def a_gap(event, now):
            """The gap since A's previous delta, if this is one of A's deltas within one reply."""
            if event.get("session") != a or event["type"] != "delta":
                return None
            gap = None if state["last"] is None else now - state["last"]
            state["last"] = now
            return gap

        while state["last"] is None:  # A's first token
            a_gap(*await next_event())
        progress("A's first token")
        gaps_before, t_start = [], time.perf_counter()
        while time.perf_counter() - t_start < 2.0:  # A alone for 2 s
            gap = a_gap(*await next_event())
            if gap is not None:
                gaps_before.append(gap)
        t_b = time.perf_counter()
        await ws.send(json.dumps({"type": "message", "session": b, "text": prompt,
                                  "sampling": {"max_new_tokens": 8}}))
        progress("B's prompt sent")
        gaps, cancelled_at, b_first, b_done = [], None, None, None
        while b_done is None:
            event, now = await next_event()
            if cancel_after is not None and cancelled_at is None and now - t_b >= cancel_after:
                await ws.send(json.dumps({"type": "cancel", "session": b}))
                cancelled_at = time.perf_counter()
            gap = a_gap(event, now)
            if gap is not None and b_first is None:
                gaps.append(gap)
            elif event.get("session") == b:
                if event["type"] == "delta" and b_first is None:
                    b_first = now - t_b
                if event["type"] == "done":
                    b_done = (now - cancelled_at) if cancelled_at else 0.0
                    usage = event["usage"]
                if event["type"] == "error":
                    raise RuntimeError(event)
        progress("B done")
        await ws.send(json.dumps({"type": "cancel", "session": a}))
        return max(gaps_before), max(gaps) if gaps else 0.0, b_first, b_done if cancelled_at else None, usage


async def main_async(args):
    rt = streaming.load(args.model, device=args.device)
    prompt = long_prompt(rt, args.prompt_tokens)
    n = len(rt.tokenizer.encode(prompt))
    limits = Limits(max_sessions=4, max_prompt_tokens=n + 10, max_message_bytes=4 * len(prompt) + 1024,
                    max_new_tokens_cap=200_000)
    async with running(rt, ServerConfig(port=0, limits=limits, chunk=args.chunk, model_name="bench")) as app:
        chunk = app.engine.settings.chunk
        before, during, ttft, _, usage = await round_trip(app, rt, prompt, None)
        _, _, _, cancel_s, cancel_usage = await round_trip(app, rt, prompt, 0.5)
    print(f"{rt.device}, {rt.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"prompt {n} tokens, chunk {chunk}")
    print("| A's worst gap alone | A's worst gap during B's prompt | B's time to first token | "
          "B's prompt tok/s | cancel answered after | tokens B's cancelled prompt ingested |")
    print("|---|---|---|---|---|---|")
    print(f"| {before:.3f} s | {during:.3f} s | {ttft:.2f} s | {usage['prompt_tokens_per_second']:,.0f} | "
          f"{cancel_s:.3f} s | {cancel_usage['tokens_seen']} of {n} |")


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
