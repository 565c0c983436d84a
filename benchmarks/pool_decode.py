"""Aggregate decode throughput of many streams: one batched step (SessionPool) vs sessions one by one.

    PYTHONPATH=. python benchmarks/pool_decode.py --device cuda --streams 1 8 32

TinyLlama-1.1B-shaped random checkpoints (plain and LCKV w=2), bf16, 4 + 1020 cache slots per stream,
each stream fed its own 128-token prompt, then 64 greedy tokens per stream.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import streaming
from benchmarks.decode_speed import TINY, TINYLLAMA, random_checkpoint, sync


def aggregate(rt, streams, new_tokens, batched):
    prompts = [torch.randint(3, rt.config.vocab_size, (128,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(streams)]
    pool = rt.pool(streams, sinks=4, window=1020, chunk=128)
    sessions = [pool.session(seed=0) for _ in range(streams)]
    for s, p in zip(sessions, prompts):
        s.feed(p)
    list(pool.generate([(s, None) for s in sessions], max_new_tokens=2))  # warm-up / graph capture
    for s in sessions:
        list(s.generate(max_new_tokens=2))
    sync(rt.device)
    t0 = time.perf_counter()
    if batched:
        n = sum(len(r.token_ids) for _, r in pool.generate([(s, None) for s in sessions], max_new_tokens=new_tokens))
    else:
        n = sum(len(r.token_ids) for s in sessions for r in s.generate(max_new_tokens=new_tokens))
    sync(rt.device)
    return n / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    base = TINY if args.tiny else TINYLLAMA
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("plain", "lckv"):
            rt = streaming.load(random_checkpoint(Path(tmp) / kind, kind, shape=base), device=args.device,
                                dtype=args.dtype)
            for streams in args.streams:
                one_by_one = aggregate(rt, streams, args.new_tokens, batched=False)
                batched = aggregate(rt, streams, args.new_tokens, batched=True)
                rows.append((kind, streams, one_by_one, batched))
                print(rows[-1], flush=True)
            del rt
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {args.new_tokens} new tokens per stream")
    print("| model | streams | one by one, tok/s (all streams) | batched pool, tok/s (all streams) |")
    print("|---|---|---|---|")
    for kind, streams, a, b in rows:
        print(f"| {kind} | {streams} | {a:,.0f} | {b:,.0f} |")


if __name__ == "__main__":
    main()
