"""The bundled model on the GPU: how fast one stream is ingested and
generated, by chunk size, with and without compiled layers. (The CPU figures: benchmarks/cpu_bundled.py.)

    PYTHONPATH=. python benchmarks/bundled_gpu.py [--chunks 256 1024] [--compile]

Ingestion: `Session.feed` of a random-token prompt into a fresh stream (the default 4 + 1,020-slot
cache; every full chunk replays a captured graph), median of three feeds after a warm-up feed. Note
that for an LCKV model the chunk is part of the result, not only of the speed: the iterative prefill
runs over each chunk, so logits differ (slightly) between chunk sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import streaming


def timed(fn, device) -> float:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, nargs="*", default=[64, 256, 512, 1020])
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also with compiled layers")
    args = parser.parse_args()
    device = torch.device("cuda")
    rt = streaming.load(device=device, dtype="bfloat16")
    prompt = torch.randint(3, rt.config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, bundled model "
          f"({sum(p.numel() for p in rt.model.parameters()) / 1e6:.1f}M parameters), 4 + 1,020 slots, "
          f"prompt {args.prompt_tokens} tokens")
    print("| layers | what | tok/s |")
    print("|---|---|---|")
    for compiled in (False, True) if args.compile else (False,):
        rt.model.compile_layers(compiled)
        label = "compiled" if compiled else "eager"
        for chunk in args.chunks:
            s = rt.session(chunk=chunk)
            s.feed(prompt[: 2 * chunk])  # warm-up: captures the chunk's graph (and compiles)
            rates = []
            for _ in range(3):
                s.reset()
                rates.append(len(prompt) / timed(lambda: s.feed(prompt), device))
            print(f"| {label} | feed, chunk {chunk} | {statistics.median(rates):,.0f} |", flush=True)
        s = rt.session()
        s.feed(prompt[:512])
        list(s.generate(max_new_tokens=8, temperature=0.0))  # warm-up: the decode graph
        ids: list[int] = []

        def generate():
            ids.extend(t for r in s.generate(max_new_tokens=args.new_tokens, temperature=0.0) for t in r.token_ids)

        seconds = timed(generate, device)
        print(f"| {label} | generate, greedy | {len(ids) / seconds:,.0f} |", flush=True)
    rt.model.compile_layers(False)


if __name__ == "__main__":
    main()
