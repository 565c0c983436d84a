"""Saving many sessions through the engine process: one snapshot call per session (awaited one after
another, as a server saving sessions in turn) against the same snapshots asked for together, which
cross as one call with shared device reads (apps/server/engine_process.py, snapshot_many).

    PYTHONPATH=. python benchmarks/snapshot_calls.py --sessions 1000 [--device cuda]

Each session holds `--tokens` tokens (a saved state restored into its row); the bundled model.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time

import torch

import streaming
from apps.server.engine_process import EngineProcess
from apps.server.engine_spec import EngineSettings, ModelSource


async def run(args) -> None:
    rt = streaming.load(device="cpu")  # makes the state the rows get (same model, same fingerprint)
    local = rt.session(sinks=4, window=args.window, chunk=64)
    local.feed(torch.randint(3, rt.config.vocab_size, (args.tokens,)).tolist())
    state = local.snapshot()
    engine = EngineProcess(ModelSource(device=args.device, dtype="float32"),
                           EngineSettings(rows=args.sessions, sinks=4, window=args.window, chunk=64, prefill_budget=None))
    await engine.start()
    try:
        handles = [await engine.open_row() for _ in range(args.sessions)]
        await asyncio.gather(*(engine.restore(h, state) for h in handles))
        for name in ("one call each", "asked together", "one call each", "asked together"):
            t0 = time.perf_counter()
            if name == "one call each":
                for handle in handles:
                    await engine.snapshot(handle)
            else:
                await asyncio.gather(*(engine.snapshot(h) for h in handles))
            elapsed = time.perf_counter() - t0
            print(f"| {name} | {elapsed * 1e3:,.0f} ms | {elapsed / len(handles) * 1e3:.3f} ms per session |", flush=True)
    finally:
        await engine.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=80)
    parser.add_argument("--window", type=int, default=124)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{platform.node()}, {args.device}, {args.sessions} sessions of {args.tokens} tokens, 4 + {args.window} slots")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
