"""Where an engine decode step spends its time: torch.profiler's top CUDA kernels for one batch.

    PYTHONPATH=. python benchmarks/engine_profile.py --streams 256 --kind plain [--steady]

TinyLlama-1.1B shape, random bf16 weights, 4 + 1020 slots; eager steps (no graph) so kernels are
attributed; prints the kernels sorted by total CUDA time over `--steps` steps.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import streaming
from benchmarks.decode_speed import TINYLLAMA
from streaming.engine import Engine
from streaming.sampling import SamplingParams
from tests.tiny_checkpoint import lckv_config, plain_config, random_weights, write_checkpoint


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--kind", default="plain")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--steady", action="store_true",
                        help="profile with every window full (streams put at 10^6 tokens seen after the prompt)")
    args = parser.parse_args()
    config = (plain_config(layers=22, **TINYLLAMA) if args.kind == "plain"
              else lckv_config(layers=22, m=7, b=2, **TINYLLAMA))
    with tempfile.TemporaryDirectory() as tmp:
        weights = {k: (v * 0.1 if v.dim() > 1 else v).to(torch.bfloat16) for k, v in random_weights(config).items()}
        rt = streaming.load(write_checkpoint(Path(tmp), config, weights), device="cuda", dtype="bf16")
    rt.cuda_graphs = False
    engine = Engine(rt, args.streams, sinks=4, window=1020, chunk=128, prefill_budget=128 * 64)
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
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
