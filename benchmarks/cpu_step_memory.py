"""Peak memory of the engine's decode steps on CPU with every window full: what a CPU server with
many long conversations reaches and then stays at.

    PYTHONPATH=. python benchmarks/cpu_step_memory.py --rows 200

The bundled model (float32), an engine of `--rows` rows (4 + 1020 slots), every row positioned as a
long-running stream (10**6 tokens seen: each step reads all 1,024 slots of every row), `--steps`
greedy decode steps of all rows. Reported: resident memory after loading and allocating the cache,
and the process's peak resident memory (getrusage) after the steps; the difference is what the
steps' temporaries add. On CPU a step gathers each KV source's keys and values of the addressed rows
and rotates the keys: [rows, kv heads, 1,024, head dim] float32 per copy.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

import streaming


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rt = streaming.load(device="cpu")
    engine = rt.engine(args.rows)
    rows = torch.arange(args.rows)
    engine.cache.lengths[:args.rows] = 10**6
    for row in range(args.rows):
        engine.seen[row] = 10**6
    features = engine.sampling.features(list(range(args.rows)))
    base = resident_mib()
    t = time.perf_counter()
    with torch.inference_mode():
        for _ in range(args.steps):
            engine.decode_rows(rows, features)
    took = (time.perf_counter() - t) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"torch {torch.__version__}, {args.rows} rows, windows full, {args.threads} thread(s): resident after "
          f"allocation {base:.0f} MiB, peak after {args.steps} decode steps {peak:.0f} MiB "
          f"(+{peak - base:.0f} MiB), {took * 1e3:.0f} ms a step")


if __name__ == "__main__":
    main()
