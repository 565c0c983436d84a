"""Where the time of a burst goes: the engine's steps while many chat replies arrive at once, in
one process (no websockets), timed step by step.

    PYTHONPATH=. python3 benchmarks/engine_burst.py --device cuda --sessions 1000

Like benchmarks/server_sessions.py: the bundled model, a pool of `--sessions` + 1 rows warmed up
with the server's settings, every session asks "Tell me a story." (temperature 0.8, seed 1,
`--new-tokens`), and after `--long-after` steps one more session sends a `--long-prompt-tokens`
prompt. Each step is timed with a device synchronisation; the longest steps are listed with what
they did (rows decoded, prompt jobs waiting, graphs captured and Python garbage collection during the step), so a long step in
the server's /healthz can be explained from a measurement.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import streaming
from benchmarks.server_long_prompt import long_prompt
from streaming.sampling import SamplingParams

MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long-prompt-tokens", type=int, default=4000)
    parser.add_argument("--long-after", type=int, default=10, help="steps before the long prompt is sent")
    parser.add_argument("--prefill-budget", type=int, default=4096, help="as the server's on GPU")
    parser.add_argument("--no-gc-freeze", action="store_true",
                        help="leave the startup objects to the garbage collector (the server freezes them)")
    parser.add_argument("--show", type=int, default=12, help="how many of the longest steps to list")
    args = parser.parse_args()

    rt = streaming.load(device=args.device)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    pool = rt.pool(args.sessions + 1, prefill_budget=args.prefill_budget)
    engine = pool.engine
    t = time.perf_counter()
    engine.warm_up([rt.sampling_defaults, SamplingParams()])
    print(f"warm-up: {len(engine.graphs or [])} graphs in {time.perf_counter() - t:.1f} s")
    sessions = [pool.session() for _ in range(args.sessions + 1)]
    long_session = sessions.pop()
    text = long_prompt(rt, args.long_prompt_tokens) if args.long_prompt_tokens else ""
    if not args.no_gc_freeze:
        gc.freeze()  # as the server does after its start

    t = time.perf_counter()
    replies = [pool.begin_chat(s, MESSAGES, max_new_tokens=args.new_tokens, temperature=0.8, seed=1)
               for s in sessions]
    print(f"{len(replies)} replies submitted in {time.perf_counter() - t:.2f} s (host: template, tokenizer, submit)")
    long_reply = None
    collecting = {"ms": 0.0, "t": 0.0}

    def on_gc(phase, info):  # Python's cyclic collector pauses every thread: counted per step
        if phase == "start":
            collecting["t"] = time.perf_counter()
        else:
            collecting["ms"] += (time.perf_counter() - collecting["t"]) * 1e3

    gc.callbacks.append(on_gc)
    steps = []  # (ms, decoding rows before, prompt jobs before, graphs captured, long prompt ingesting)
    t_start = time.perf_counter()
    while True:
        if long_reply is None and text and len(steps) == args.long_after:
            long_reply = pool.begin_chat(long_session, [{"role": "user", "content": text}], max_new_tokens=8)
        decoding, prefilling = len(engine._decoding), len(engine._prefilling) + len(engine._inbox)
        graphs = len(engine.graphs or [])
        ingesting = long_reply is not None and long_reply.job.prefilling
        sync()
        collecting["ms"] = 0.0
        t = time.perf_counter()
        more = engine.step()
        sync()
        steps.append(((time.perf_counter() - t) * 1e3, decoding, prefilling, len(engine.graphs or []) - graphs,
                      ingesting, collecting["ms"]))
        if not more:
            break
    wall = time.perf_counter() - t_start
    tokens = sum(len(r.job.generated) for r in replies)
    ms = sorted(s[0] for s in steps)
    print(f"{len(steps)} steps in {wall:.2f} s, {tokens / wall:,.0f} tok/s; step ms p50 {ms[len(ms) // 2]:.1f}, "
          f"max {ms[-1]:.1f}")
    while_long = [s[0] for s in steps if s[4]]
    if while_long:
        print(f"while the long prompt was ingested: {len(while_long)} steps, longest {max(while_long):.1f} ms")
    print("\n| step | ms | rows decoding | prompt jobs | graphs captured | long prompt ingesting | gc ms |\n|---|---|---|---|---|---|---|")
    for i, (took, decoding, prefilling, captured, ingesting, gc_ms) in sorted(enumerate(steps), key=lambda s: -s[1][0])[:args.show]:
        print(f"| {i} | {took:.1f} | {decoding} | {prefilling} | {captured} | {ingesting} | {gc_ms:.1f} |")
    for reply in replies + ([long_reply] if long_reply else []):
        pool.end(reply)


if __name__ == "__main__":
    main()
