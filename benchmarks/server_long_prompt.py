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
import time

import torch
from websockets.asyncio.client import connect

import streaming
from apps.protocol import Limits
from apps.server.app import ServerConfig, running

STORY = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
         "of foolishness, it was the epoch of belief, it was the epoch of incredulity. ")


async def create(ws) -> str:
    await ws.send(json.dumps({"type": "session.create"}))
    return json.loads(await ws.recv())["session"]


def long_prompt(rt, tokens: int) -> str:
    text = STORY
    while len(rt.tokenizer.encode(text)) < tokens:
        text += STORY
    return text


async def round_trip(app, rt, prompt: str, cancel_after: float | None):
    async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:
        a, b = await create(ws), await create(ws)
        await ws.send(json.dumps({"type": "message", "session": a, "text": "Tell me a story.",
                                  "sampling": {"max_new_tokens": 100_000, "temperature": 0.8, "seed": 1}}))
        last, gaps_before = None, []
        while last is None:  # A's first token
            event = json.loads(await ws.recv())
            if event["type"] == "delta" and event["session"] == a:
                last = time.perf_counter()
        t_start = time.perf_counter()
        while time.perf_counter() - t_start < 2.0:  # A alone for 2 s
            event = json.loads(await ws.recv())
            now = time.perf_counter()
            if event["type"] == "delta" and event["session"] == a:
                if last is not None:
                    gaps_before.append(now - last)
                last = now
        t_b = time.perf_counter()
        await ws.send(json.dumps({"type": "message", "session": b, "text": prompt,
                                  "sampling": {"max_new_tokens": 8}}))
        gaps, cancelled_at, b_first, b_done = [], None, None, None
        while b_done is None:
            event = json.loads(await ws.recv())
            now = time.perf_counter()
            if cancel_after is not None and cancelled_at is None and now - t_b >= cancel_after:
                await ws.send(json.dumps({"type": "cancel", "session": b}))
                cancelled_at = time.perf_counter()
            if event.get("session") == a and event["type"] == "delta":
                if b_first is None:
                    gaps.append(now - last)
                last = now
            elif event.get("session") == b:
                if event["type"] == "delta" and b_first is None:
                    b_first = now - t_b
                if event["type"] == "done":
                    b_done = (now - cancelled_at) if cancelled_at else None
                    b_done = b_done if b_done is not None else 0.0
                    usage = event["usage"]
                if event["type"] == "error":
                    raise RuntimeError(event)
        await ws.send(json.dumps({"type": "cancel", "session": a}))
        return max(gaps_before), max(gaps) if gaps else 0.0, b_first, b_done if cancelled_at else None, usage


async def main_async(args):
    rt = streaming.load(args.model, device=args.device)
    prompt = long_prompt(rt, args.prompt_tokens)
    n = len(rt.tokenizer.encode(prompt))
    limits = Limits(max_sessions=4, max_prompt_tokens=n + 10, max_message_bytes=4 * len(prompt) + 1024,
                    max_new_tokens_cap=200_000)
    async with running(rt, ServerConfig(port=0, limits=limits, chunk=args.chunk, model_name="bench")) as app:
        chunk = app.pool.engine.chunk
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
