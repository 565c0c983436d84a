"""Aggregate decode throughput of the engine: every live stream advances in one batched step.

    PYTHONPATH=. python benchmarks/engine_decode.py --streams 1 64 256 1024 --budget-gib 32

TinyLlama-1.1B-shaped random checkpoints (plain and LCKV w=2), bf16, 4 + 1020 cache slots per
stream. For each stream count: admission (open a row and submit a 128-token prompt, host time per
stream), prompt ingestion of all streams, then aggregate greedy decode tok/s over `--new-tokens`
steps with every stream live, with the decode-attention kernel and with the plain attention path.
The same run measures Hugging Face transformers' batched `generate` on the same plain weights.
`--budget-gib`: as many streams as fit that KV budget, plain vs LCKV. "windows full" rows (and
`--steady-streams`): decode with every stream positioned as long-running, reading all of its slots.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

import streaming
from benchmarks.decode_speed import random_checkpoint, sync
from streaming import kernels
from streaming.engine import Engine
from streaming.sampling import SamplingParams

SINKS, WINDOW = 4, 1020


def prompts(count, length, vocab):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (count, length), generator=gen).tolist()


def engine_run(rt, streams, prompt_len, new_tokens, steady=False, pipelined=False):
    """(admission ms/stream, prompt tok/s, decode tok/s, longest decode iteration ms) with `streams`
    live streams. `steady`: after the prompt, every row is positioned as a long-running stream (its
    window full, 10**6 tokens seen), so each decode step reads all 4 + 1020 slots of every stream, as
    it does forever after the first thousand tokens. The slots hold random KV left from earlier runs;
    timing does not depend on values.
    `pipelined`: each decode step is queued before the last one's ids are read (Engine's option)."""
    engine = Engine(rt, streams, sinks=SINKS, window=WINDOW, chunk=128, prefill_budget=128 * 64, pipelined=pipelined)
    greedy = SamplingParams()
    # Warm-up: capture the decode graphs of every bucket once (what a server does at start).
    engine.graphs.capture_decode(engine.sampling.features([0]))
    batch = prompts(streams, prompt_len, rt.config.vocab_size)
    sync(rt.device)
    t0 = time.perf_counter()
    jobs = [engine.submit(engine.open_row(), p, params=greedy, max_new_tokens=new_tokens + 1) for p in batch]
    t1 = time.perf_counter()
    while any(j.prefilling for j in jobs):
        engine.step()
    sync(rt.device)
    t2 = time.perf_counter()
    if steady:
        for job in jobs:
            engine.seen[job.row] = 10**6
        engine.cache.lengths[[job.row for job in jobs]] = 10**6
    engine.step()  # every stream's first token
    start = sum(j.launched for j in jobs)  # tokens whose step ran before the clock (read or not yet)
    sync(rt.device)
    t3 = time.perf_counter()
    longest, last = 0.0, t3  # the longest iteration shows a one-time cost inside the timed window
    while engine.step():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    sync(rt.device)
    t4 = time.perf_counter()
    made = sum(len(j.generated) for j in jobs) - start
    del engine, jobs
    gc.collect()  # the engine and its graphs hold each other: free their memory before the next run
    torch.cuda.empty_cache()
    return (t1 - t0) / streams * 1e3, streams * prompt_len / (t2 - t1), made / (t4 - t3), longest * 1e3


def table_row(kind: str, path: str, streams: int, run: tuple) -> str:
    """One line of the results table from `engine_run`'s tuple."""
    adm, pre, dec, worst = run
    return f"| {kind} | {path} | {streams} | {adm:.3f} | {pre:,.0f} | {dec:,.0f} | {worst:.1f} |"


def hf_run(path, streams, new_tokens):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    ids = torch.tensor(prompts(streams, 128, hf.config.vocab_size), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        sync(torch.device("cuda"))
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        sync(torch.device("cuda"))
    del hf
    torch.cuda.empty_cache()
    return streams * new_tokens / (time.perf_counter() - t0)


def row_bytes(rt):
    c = rt.config
    return len(c.kv_layers) * 2 * c.num_key_value_heads * (SINKS + WINDOW) * c.head_dim * 2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 64, 256, 1024])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget-gib", type=float, default=32.0)
    parser.add_argument("--steady-streams", type=int, nargs="*", default=[256, 1024])
    parser.add_argument("--plain-path-streams", type=int, nargs="*", default=[1, 256])
    parser.add_argument("--hf-streams", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--kinds", default="plain,lckv", help="which models, of plain and lckv")
    parser.add_argument("--compile", action="store_true", help="layers through torch.compile (streaming.load's)")
    parser.add_argument("--pipelined", action="store_true",
                        help="every engine row also with the pipelined engine (next step queued before the ids are read)")
    parser.add_argument("--pdl", choices=["auto", "on", "off"], default="auto",
                        help="programmatic dependent launch of the step's Triton kernels (default: where supported)")
    parser.add_argument("--fused", choices=["auto", "off"], default="auto",
                        help="the fused greedy step and plan (streaming.kernels.use_fused_greedy/_plan; default: "
                             "where Triton and CUDA are)")
    parser.add_argument("--fused-store", choices=["auto", "off"], default="auto",
                        help="each KV layer's store in its decode attention launch (streaming.kernels.use_fused_store; "
                             "default: where Triton and CUDA are)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each row of the --streams list this many times (a first run's own costs show)")
    args = parser.parse_args()
    kernels.use_pdl({"auto": None, "on": True, "off": False}[args.pdl])
    kernels.use_fused_greedy(None if args.fused == "auto" else False)
    kernels.use_fused_plan(None if args.fused == "auto" else False)
    kernels.use_fused_store(None if args.fused_store == "auto" else False)
    if not set(args.kinds.split(",")) <= {"plain", "lckv"}:
        parser.error(f"--kinds: plain and/or lckv, got {args.kinds!r}")
    modes = [(False, "")] + ([(True, ", pipelined")] if args.pipelined else [])
    lines = []

    def report(line):
        lines.append(line)
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            path = random_checkpoint(Path(tmp) / kind, kind)
            rt = streaming.load(path, device="cuda", dtype="bf16", compile=args.compile)
            for pipelined, label in modes:
                for streams in [s for s in args.streams for _ in range(args.repeat)]:
                    if pipelined and streams == 1:
                        continue  # a one-row engine is never pipelined
                    run = engine_run(rt, streams, 128, args.new_tokens, pipelined=pipelined)
                    report(table_row(kind, f"engine{label}", streams, run))
                for streams in args.steady_streams:
                    run = engine_run(rt, streams, 128, args.new_tokens, steady=True, pipelined=pipelined)
                    report(table_row(kind, f"engine{label}, windows full", streams, run))
            rt.model.decode_kernel = False  # the plain attention path (gather, rotate, SDPA) for comparison
            for streams in args.plain_path_streams:
                run = engine_run(rt, streams, 128, args.new_tokens)
                report(table_row(kind, "engine, plain attention path", streams, run))
            rt.model.decode_kernel = True
            budget = int(args.budget_gib * 2**30 // row_bytes(rt))
            for pipelined, label in modes:
                path_name = f"engine{label}, {args.budget_gib:g} GiB KV budget"
                run = engine_run(rt, budget, 8, args.new_tokens, pipelined=pipelined)
                report(table_row(kind, path_name, budget, run))
                run = engine_run(rt, budget, 8, args.new_tokens, steady=True, pipelined=pipelined)
                report(table_row(kind, f"{path_name}, windows full", budget, run))
            del rt
            torch.cuda.empty_cache()
            if kind == "plain":
                for streams in args.hf_streams:
                    report(f"| plain | transformers generate (dynamic cache) | {streams} | | | "
                           f"{hf_run(path, streams, args.new_tokens):,.0f} | |")
    print(f"\ntorch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, {SINKS}+{WINDOW} slots, "
          f"{args.new_tokens} decode steps, PDL {args.pdl}, fused greedy step and plan {args.fused}, "
          f"fused store {args.fused_store}")
    print("| model | path | streams | admission ms/stream (host) | prompt tok/s | decode tok/s (all streams) | "
          "longest decode iteration ms |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
