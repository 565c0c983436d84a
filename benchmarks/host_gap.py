"""How much of a batch-1 decode token is host time: one stream's greedy decode through `Session.generate`
(as the CLI and a chat run it) against the same captured decode graph replayed back to back on the
device (no host work between steps), and replayed with a read of each token (the host's wait for the
device, without the engine's bookkeeping).

    PYTHONPATH=. python benchmarks/host_gap.py [--kinds plain,lckv] [--new-tokens 256]

TinyLlama-1.1B shape, random bf16 weights, 4 + 2,044 slots, the default step (graphs, compiled prefill,
GEMV decode), as `decode_speed.py`'s default mode. CUDA only. The back-to-back replays are a valid
greedy decode (each step samples from the logits the previous one left on the device and advances the
cache on the device), but the engine's host records do not follow them: the session is thrown away.
Per token: device time = 1 / the back-to-back rate; the read adds the device-to-host wait; what
`generate` adds beyond that is the engine's and the session's Python work per token.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import streaming
from benchmarks.decode_speed import TINYLLAMA, decode_rate, random_checkpoint


def replay_rates(session, steps: int) -> tuple[float, float]:
    """(tok/s replaying the one-row decode graph back to back, tok/s reading each step's token)."""
    graphs = session.engine.graphs
    graph = next(g for key, g in graphs._graphs.items() if key[0] == "decode" and key[1] == 1)
    rates = []
    for read in (False, True):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.graph.replay()
            if read:
                graph.output.tolist()
        torch.cuda.synchronize()
        rates.append(steps / (time.perf_counter() - t0))
    return rates[0], rates[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", default="plain,lckv")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    prompt = torch.randint(3, TINYLLAMA["vocab_size"], (2048,)).tolist()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, batch 1, 4+2044 slots, "
          f"{args.new_tokens} tokens per run, median of {args.repeats}")
    print("| model | generate tok/s | replay + read tok/s | replay back to back tok/s | device us/token | "
          "read us/token | engine us/token |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            rt = streaming.load(random_checkpoint(Path(tmp) / kind, kind), device=device, dtype=torch.bfloat16)
            rt.model.compile_layers(True)
            s = rt.session(sinks=4, window=2044, chunk=256)
            s.feed(prompt)
            list(s.generate(max_new_tokens=8, temperature=0.0))  # captures the decode graph
            generate, read, back_to_back = [], [], []
            for _ in range(args.repeats):
                generate.append(decode_rate(s, args.new_tokens, device)[0])
            for _ in range(args.repeats):  # (after the generate runs: the replays leave the host records behind)
                b2b, with_read = replay_rates(s, args.new_tokens)
                back_to_back.append(b2b)
                read.append(with_read)
            g, r, b = (sorted(x)[len(x) // 2] for x in (generate, read, back_to_back))
            print(f"| {kind} | {g:,.0f} | {r:,.0f} | {b:,.0f} | {1e6 / b:,.0f} | {1e6 / r - 1e6 / b:,.0f} | "
                  f"{1e6 / g - 1e6 / r:,.0f} |", flush=True)
            del s, rt
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
