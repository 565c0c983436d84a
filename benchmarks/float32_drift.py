"""How far a tiny random model's float32 logits drift from the same model in float64, prompt and decode.

    PYTHONPATH=. python benchmarks/float32_drift.py

The setup of tests/test_decode_kernel.py's engine test (hidden 128, 4 heads, 2 KV heads, head size 32,
4 + 60 slots, chunks of 16, three greedy streams), on CPU: one engine in float32, one with the model
and cache in float64, stepped in lockstep. Prints the largest logit difference per stream in each
band of generated tokens (until a stream's greedy tokens part). It tells which bound a comparison of
two float32 paths can hold: an LCKV model's iterative prefill and its layers' reading of the top
layer's KV amplify rounding far more than a plain model does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import streaming
from streaming.engine import Engine
from streaming.sampling import SamplingParams
from tests.float64_reference import float64_engine, float64_runtime
from tests.tiny_checkpoint import make_tiny_checkpoint

BANDS = (16, 32, 64, 128)


def drift(kind: str, new_tokens: int = 128) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp), kind, with_tokenizer=False, hidden_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=32)
        engines = [Engine(streaming.load(path, device="cpu", dtype="float32"), 3, sinks=4, window=60, chunk=16),
                   float64_engine(float64_runtime(path), 3, sinks=4, window=60, chunk=16)]
    prompts = [list(range(3, 3 + 11 * (i + 1))) for i in range(3)]
    jobs = [[e.submit(e.open_row(), p, params=SamplingParams(), max_new_tokens=new_tokens) for p in prompts]
            for e in engines]
    worst: dict = {}
    parted = [False] * 3
    while True:
        before = [e.next_logits[:3].double().clone() for e in engines]
        more = [e.step() for e in engines]
        for i in range(3):
            ours, wide = jobs[0][i], jobs[1][i]
            parted[i] = parted[i] or ours.generated != wide.generated
            if parted[i] or wide.ingested < len(wide.ids):
                continue
            band = next(b for b in BANDS if len(wide.generated) <= b)
            worst[(i, band)] = max(worst.get((i, band), 0.0), float((before[0][i] - before[1][i]).abs().max()))
        if not any(more):
            return worst


def main():
    print(f"torch {torch.__version__}, CPU; largest |float32 - float64| logit per stream and band of tokens "
          f"(blank: the stream's greedy tokens had parted)")
    print("| model | stream | " + " | ".join(f"tokens <= {b}" for b in BANDS) + " |")
    print("|---|---|" + "---|" * len(BANDS))
    for kind in ("plain", "lckv"):
        worst = drift(kind)
        for i in range(3):
            cells = [f"{worst[(i, b)]:.1e}" if (i, b) in worst else "" for b in BANDS]
            print(f"| {kind} | {i} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
