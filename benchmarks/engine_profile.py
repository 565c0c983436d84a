"""Where an engine decode step spends its time: torch.profiler's top CUDA kernels for one batch.

    PYTHONPATH=. python benchmarks/engine_profile.py --streams 256 --kind plain [--steady] [--graphs] [--compiled]

TinyLlama-1.1B shape, random bf16 weights, 4 + 1020 slots (`--window`); eager steps by default so
kernels are attributed to ops (`--graphs`: the replayed graphs, as served); `--compiled` runs the
layers' arithmetic through torch.compile. Prints the kernels sorted by total CUDA time over `--steps`
steps, then kernels per step, their summed time per step and the step's wall time: the difference is
time the GPU sat between kernels.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import streaming
from benchmarks.decode_speed import random_checkpoint
from streaming.engine import Engine
from streaming.sampling import SamplingParams


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--kind", default="plain")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--steady", action="store_true",
                        help="profile with every window full (streams put at 10^6 tokens seen after the prompt)")
    parser.add_argument("--graphs", action="store_true", help="replay captured graphs (as served)")
    parser.add_argument("--compiled", action="store_true", help="layers through torch.compile")
    parser.add_argument("--window", type=int, default=1020)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rt = streaming.load(random_checkpoint(tmp, args.kind), device="cuda", dtype="bf16")
    rt.cuda_graphs = args.graphs
    rt.model.compile_layers(args.compiled)
    engine = Engine(rt, args.streams, sinks=4, window=args.window, chunk=128, prefill_budget=128 * 64)
    jobs = [engine.submit(engine.open_row(), list(range(3, 131)), params=SamplingParams(), max_new_tokens=None)
            for _ in range(args.streams)]
    while any(j.prefilling for j in jobs):
        engine.step()
    if args.steady:  # as benchmarks/engine_decode.py's "windows full": each step reads all slots
        for job in jobs:
            engine.seen[job.row] = 10**6
        engine.cache.lengths[[job.row for job in jobs]] = 10**6
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels) / args.steps
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) / args.steps * 1e6
    print(f"per step: {len(kernels) / args.steps:.0f} kernels, {busy_us:,.0f} us of kernel time, "
          f"{wall_us:,.0f} us wall ({busy_us / wall_us:.0%} busy)")


if __name__ == "__main__":
    main()
