"""A burst of calls to the engine process from the server's event loop (a thousand replies ending in
one step each call `end`; here the same number of `session_stats` calls): wall time of the burst and
how late a 1 ms timer on the loop ran meanwhile (how long other streams' deltas would wait).

    PYTHONPATH=. python3 benchmarks/engine_calls.py --model PATH --calls 1000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from apps.server.engine_process import EngineProcess
from apps.server.engine_spec import EngineSettings, ModelSource


async def ticker(lags: list, period: float = 0.001) -> None:
    while True:
        due = time.perf_counter() + period
        await asyncio.sleep(period)
        lags.append(time.perf_counter() - due)


async def main_async(args) -> None:
    engine = EngineProcess(ModelSource(model=args.model, device="cpu", dtype="float32", threads=1, compile=False),
                           EngineSettings(rows=args.calls, sinks=4, window=60, chunk=16, prefill_budget=None))
    await engine.start()
    try:
        handles = await asyncio.gather(*(engine.open_row() for _ in range(args.calls)))
        walls, lates = [], []
        for _ in range(args.repeats):
            lags: list = []
            tick = asyncio.create_task(ticker(lags))
            await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            await asyncio.gather(*(engine.session_stats(h) for h in handles))
            walls.append(time.perf_counter() - t0)
            tick.cancel()
            lates.append(max(lags))
        print(f"{args.calls} calls at once: wall median {statistics.median(walls) * 1e3:.1f} ms "
              f"(min {min(walls) * 1e3:.1f}), loop late at most {statistics.median(lates) * 1e3:.1f} ms (median of "
              f"{args.repeats} bursts)")
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
