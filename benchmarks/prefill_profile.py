"""Where a stream's prompt ingestion spends its time: torch.profiler's top kernels for one prompt.

    PYTHONPATH=. python benchmarks/prefill_profile.py --kind lckv --chunk 1024 [--graphs] [--compiled]

TinyLlama-1.1B shape (`--tiny`: a small one, for a smoke run on CPU), random bf16 weights, batch 1,
4 + 2,044 slots. One session feeds the prompt once (warm-up: graphs captured, layers compiled), then
again into a fresh stream under the profiler. Prints the kernels (CPU ops on CPU) sorted by total
time, then the prompt's tok/s, kernel time and wall time: for LCKV, the cyclic block runs m+b times
per chunk, so this shows what those passes are made of (projections, attention, the cache writes).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import streaming
from benchmarks.decode_speed import TINY, TINYLLAMA, random_checkpoint


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="lckv")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=2044)
    parser.add_argument("--graphs", action="store_true", help="replay captured graphs (as served)")
    parser.add_argument("--compiled", action="store_true", help="layers through torch.compile")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--compare-plain", action="store_true",
                        help="also time a session with the chunk-attention kernel off (the plain SDPA path)")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = TINY if args.tiny else TINYLLAMA
    with tempfile.TemporaryDirectory() as tmp:
        rt = streaming.load(random_checkpoint(tmp, args.kind, shape=shape), device=device, dtype="bf16")
    rt.cuda_graphs = args.graphs and device.type == "cuda"
    rt.model.compile_layers(args.compiled)
    prompt = torch.randint(3, shape["vocab_size"], (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    session = rt.session(sinks=4, window=args.window, chunk=args.chunk)
    session.feed(prompt)  # warm-up: capture, compile
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    session.reset()
    sync()
    with torch.profiler.profile(activities=[activity]) as prof:
        session.feed(prompt)
        sync()
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
    wall = _timed_feed(session, prompt, sync)
    line = f"{args.kind}, chunk {args.chunk}: {len(prompt) / wall:,.0f} tok/s, {wall * 1e3:,.1f} ms wall"
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e3
        line += f", {len(kernels)} kernels, {busy:,.1f} ms of kernel time ({busy / (wall * 1e3):.0%} busy)"
    print(line)
    if args.compare_plain:  # a new session: its own graphs, captured with the kernel off
        rt.model.chunk_kernel = False
        plain = rt.session(sinks=4, window=args.window, chunk=args.chunk)
        plain.feed(prompt)
        wall_plain = min(_timed_feed(plain, prompt, sync) for _ in range(3))
        wall_kernel = min(_timed_feed(session, prompt, sync) for _ in range(3))  # (graphs of the kernel)
        print(f"{args.kind}, chunk {args.chunk}, best of 3: chunk kernel {len(prompt) / wall_kernel:,.0f} tok/s, "
              f"plain attention path {len(prompt) / wall_plain:,.0f} tok/s")


def _timed_feed(session, prompt, sync) -> float:
    """Seconds to feed `prompt` into the session's stream from empty."""
    session.reset()
    sync()
    t0 = time.perf_counter()
    session.feed(prompt)
    sync()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
