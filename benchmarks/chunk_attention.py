"""The chunk-attention kernel alone against the plain path's attention: microseconds per layer call.

    PYTHONPATH=. python benchmarks/chunk_attention.py [--sweep]

TinyLlama-1.1B attention shape (32 query heads, 4 KV heads, head size 64), bf16, one row, 4 + 2,044
slots, a chunk of `--chunk` tokens written after `--history` tokens (default: the second chunk of a
2,048-token prompt: every slot valid, the chunk causal over itself). The plain path is what
streaming/forward.py runs without the kernel for one layer: the cache's rotated copy, the prepared
mask and SDPA (memory-efficient backend). TFLOP/s counts the 4 * n * D * H * (visible keys) of the
score and value products over the keys each query actually sees. `--sweep` times the kernel's block
sizes, warps and stages.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.decode_kernel import time_us
from cache import SinkWindowCache
from streaming.attention import PreparedMask, attend
from streaming.config import RopeConfig
from streaming.kernels import chunk_attention as kernel
from streaming.rope import cos_sin, inverse_frequencies, rope_table, rotate

SINKS, HEADS, KV_HEADS, HEAD_DIM = 4, 32, 4, 64


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=int, default=2044)
    parser.add_argument("--chunk", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--history", type=int, default=None, help="tokens before the chunk (default 2048 - chunk)")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    inv_freq = inverse_frequencies(RopeConfig(), HEAD_DIM).cuda()
    cos, sin = rope_table(inv_freq, SINKS + args.window, torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {kernel.triton.__version__}")
    print("| chunk | history | path | us/call | TFLOP/s |")
    print("|---|---|---|---|---|")
    for n in args.chunk:
        history = 2048 - n if args.history is None else args.history
        cache = SinkWindowCache([0], 1, KV_HEADS, HEAD_DIM, sinks=SINKS, window=args.window, dtype=torch.bfloat16,
                                device="cuda")
        cache.keys[0].normal_()
        cache.values[0].normal_()
        cache.lengths.fill_(history)
        rows = torch.zeros(1, dtype=torch.long, device="cuda")
        plan = cache.plan(n, rows)
        total = plan.total.reshape(-1)
        q = torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        q_pos, k_pos = plan.query_positions[:, :, None], plan.slot_positions[:, None, :]
        mask = plan.slot_valid[:, None, :] & (k_pos <= q_pos)
        flops = 4 * HEAD_DIM * HEADS * float(mask.sum())

        def plain():  # per layer: the rotated copy, the prepared mask, SDPA
            keys, values = cache.read(0, plan)
            keys = rotate(keys, *cos_sin(plan.slot_positions, inv_freq, torch.bfloat16))
            return attend(q, keys, values, PreparedMask(mask, HEADS // KV_HEADS, q.dtype))

        def fused(**knobs):
            return kernel.chunk_attention(q, cache.keys[0], cache.values[0], rows, total, plan.query_positions,
                                          cos, sin, sinks=SINKS, window=args.window, diagonal=True, **knobs)

        error = float((fused().float() - plain().float()).abs().max())
        variants = [("plain (rotated copy, mask, SDPA)", plain, {}), (f"kernel (max diff {error:.3g})", fused, {})]
        if args.sweep:
            for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
                variants.append((f"kernel m{bm} n{bn} w{warps} s{stages}", fused,
                                 dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)))
        for name, fn, knobs in variants:
            try:
                us = time_us(lambda: fn(**knobs))
            except Exception as error:  # a variant that does not fit (shared memory): say so, go on
                print(f"| {n} | {history} | {name} | failed: {type(error).__name__} | |")
                continue
            print(f"| {n} | {history} | {name} | {us:,.1f} | {flops / us / 1e6:,.0f} |")


if __name__ == "__main__":
    main()
