"""The decode-attention kernel alone: microseconds per layer call and the KV bandwidth it reaches.

    PYTHONPATH=. python benchmarks/decode_kernel.py --rows 1 64 256 1024 --fill 260 1024

TinyLlama-1.1B attention shape (32 query heads, 4 KV heads, head size 64), bf16, 4 + 1020 slots.
`--fill`: tokens in every row (1024 = a full window; 260 = a 128-token prompt plus ~130 generated,
what benchmarks/engine_decode.py decodes at). GB/s counts the K and V bytes of the valid slots (what
attention must read); a plain `copy_` of the same bytes is printed as the card's practical ceiling.
`--sweep` also times block size / warps / stages / split variants; `--tables` times the cos/sin table
in bf16 (the model's dtype) against float32, and without rotation (a diagnostic upper bound: what
reading the table and rotating the keys costs; its scores are wrong).
"""

from __future__ import annotations

import argparse
import itertools

import torch

from cache import SinkWindowCache
from streaming.config import RopeConfig
from streaming.kernels import decode_attention as kernel
from streaming.rope import inverse_frequencies

SINKS, WINDOW, HEADS, KV_HEADS, HEAD_DIM = 4, 1020, 32, 4, 64


def time_us(fn, repeat=50):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(repeat):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256, 1024])
    parser.add_argument("--fill", type=int, nargs="+", default=[260, SINKS + WINDOW])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--tables", action="store_true")
    args = parser.parse_args()
    inv_freq = inverse_frequencies(RopeConfig(), HEAD_DIM).cuda()
    tables = {torch.float32: kernel.rope_table(inv_freq, SINKS + WINDOW),
              torch.bfloat16: kernel.rope_table(inv_freq, SINKS + WINDOW, torch.bfloat16)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {kernel.triton.__version__}")
    print("| rows | fill | variant | us/call | GB/s (valid KV) | copy GB/s |")
    print("|---|---|---|---|---|---|")
    for rows, fill in itertools.product(args.rows, args.fill):
        cache = SinkWindowCache([0], rows, KV_HEADS, HEAD_DIM, sinks=SINKS, window=WINDOW, dtype=torch.bfloat16,
                                device="cuda")
        cache.keys[0].normal_()
        cache.values[0].normal_()
        cache.lengths.fill_(fill - 1)
        index = torch.arange(rows, device="cuda")
        total = cache.lengths + 1
        q = torch.randn(rows, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        valid = min(fill, SINKS + WINDOW)
        nbytes = 2 * rows * KV_HEADS * valid * HEAD_DIM * 2
        src = cache.keys[0][:, :, :valid]
        dst = torch.empty_like(src)
        copy_us = time_us(lambda: (dst.copy_(src), dst.copy_(cache.values[0][:, :, :valid])))
        variants = [dict()]
        if args.tables:
            variants += [dict(table=torch.bfloat16), dict(rotate=False)]
            variants += [dict(table=torch.bfloat16, block=b, num_warps=w, num_stages=s)
                         for b in (64, 128) for w in (4, 8) for s in (2, 3, 4)]
        if args.sweep:
            variants += [dict(block=b, num_warps=w, num_stages=s) for b in (32, 64, 128) for w in (2, 4, 8)
                         for s in (2, 3, 4)]
            variants += [dict(splits=n) for n in (1, 2, 4, 8)]
        for variant in variants:
            def call():
                knobs = dict(variant)
                cos, sin = tables[knobs.pop("table", torch.float32)]
                kernel.decode_attention(q, cache.keys[0], cache.values[0], index, total, cos, sin, sinks=SINKS,
                                        window=WINDOW, diagonal=True, **knobs)
            try:
                us = time_us(call)
            except Exception as error:  # a variant that does not fit (shared memory, registers)
                print(f"| {rows} | {fill} | {variant or 'default'} | failed: {type(error).__name__} | | |")
                continue
            print(f"| {rows} | {fill} | {variant or 'default'} | {us:.1f} | {nbytes / us / 1e3:.0f} | "
                  f"{nbytes / copy_us / 1e3:.0f} |", flush=True)
        del cache


if __name__ == "__main__":
    main()
