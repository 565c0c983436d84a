"""CPU speed of the bundled model: generation and stream ingestion, iterative vs sequential prefill.

    PYTHONPATH=. python benchmarks/cpu_bundled.py [--threads 2] [--dtype float32]

There is no transformers implementation of LCKV to compare against; the in-run baselines are the
runtime's own exact sequential mode (token by token) and the eager decode step.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import streaming


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=120)
    parser.add_argument("--ingest-tokens", type=int, default=2048)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = streaming.load(device="cpu", dtype=args.dtype)
    ids = torch.randint(3, rt.config.vocab_size, (args.ingest_tokens,), generator=torch.Generator().manual_seed(0))
    ids = ids.tolist()
    rows = []

    s = rt.session(seed=0)
    s.feed("The old house at the end of the lane")
    list(s.generate(max_new_tokens=5))  # warm-up
    t0 = time.perf_counter()
    n = sum(len(r.token_ids) for r in s.generate(max_new_tokens=args.new_tokens, temperature=0.8, top_p=0.95))
    rows.append(("generate (sampled, top-p 0.95)", n / (time.perf_counter() - t0)))

    for prefill, chunk in (("iterative", 256), ("iterative", 64), ("sequential", 256)):
        s = rt.session(chunk=chunk, prefill=prefill)
        s.feed(ids[:chunk])  # warm-up
        t0 = time.perf_counter()
        s.feed(ids, return_logits=True)
        rows.append((f"feed, {prefill} prefill, chunk {chunk}", len(ids) / (time.perf_counter() - t0)))

    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.dtype}, bundled model ({sum(p.numel() for p in rt.model.parameters()) / 1e6:.1f}M parameters)")
    print("| what | tokens/s |")
    print("|---|---|")
    for what, rate in rows:
        print(f"| {what} | {rate:,.1f} |")


if __name__ == "__main__":
    main()
