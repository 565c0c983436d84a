"""Aggregate streaming rate of the websocket server with N concurrent sessions vs the same N replies
one after another (same server, same process), on the bundled model unless --model is given.

    PYTHONPATH=. python benchmarks/server_streams.py --streams 1 4 16 --new-tokens 48 [--device cuda]
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


async def reply(ws, sid, new_tokens):
    await ws.send(json.dumps({"type": "message", "session": sid, "text": "Tell me a story.",
                              "sampling": {"max_new_tokens": new_tokens, "temperature": 0.8, "seed": 1}}))
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "done":
            return event["usage"]["completion_tokens"]
        if event["type"] == "error":
            raise RuntimeError(event)


async def measure(app, streams, new_tokens, concurrent):
    url = f"ws://127.0.0.1:{app.port}/ws"
    conns = [await connect(url) for _ in range(streams)]
    sids = []
    for ws in conns:
        await ws.send(json.dumps({"type": "session.create"}))
        sids.append(json.loads(await ws.recv())["session"])
    await asyncio.gather(*(reply(ws, sid, 4) for ws, sid in zip(conns, sids)))  # warm-up
    t0 = time.perf_counter()
    if concurrent:
        tokens = sum(await asyncio.gather(*(reply(ws, sid, new_tokens) for ws, sid in zip(conns, sids))))
    else:
        tokens = 0
        for ws, sid in zip(conns, sids):
            tokens += await reply(ws, sid, new_tokens)
    elapsed = time.perf_counter() - t0
    for ws, sid in zip(conns, sids):
        await ws.send(json.dumps({"type": "session.close", "session": sid}))
        await ws.close()
    return tokens / elapsed


async def main_async(args):
    rt = streaming.load(args.model, device=args.device)
    limits = Limits(max_sessions=max(args.streams) * 2, max_new_tokens_cap=4096,
                    max_sessions_per_connection=max(args.streams) * 2, max_requests_per_minute=10**9)
    rows = []
    async with running(rt, ServerConfig(port=0, limits=limits, model_name="bench")) as app:
        for streams in args.streams:
            one_by_one = await measure(app, streams, args.new_tokens, concurrent=False)
            together = await measure(app, streams, args.new_tokens, concurrent=True)
            rows.append((streams, one_by_one, together))
            print(rows[-1], flush=True)
    print(f"{rt.device}, {rt.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} tokens per reply")
    print("| concurrent sessions | replies one after another, tok/s | replies at once (batched steps), tok/s |")
    print("|---|---|---|")
    for streams, a, b in rows:
        print(f"| {streams} | {a:,.1f} | {b:,.1f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=48)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
