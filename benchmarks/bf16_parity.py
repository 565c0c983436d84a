"""How far bf16 logits are from transformers', next to how far transformers' own bf16 logits are from
its float32 ones, on the same TinyLlama-shaped random checkpoint decode_speed.py builds.

decode_speed.py prints "parity vs transformers" in bf16 (about 3 % of the largest logit on the H200).
Alone that number cannot say whether our arithmetic is off or bf16 is simply that coarse for this
model; this prints the three distances side by side (max |difference| / max |reference| over every
position's logits of a 256-token prompt, fed whole):

    PYTHONPATH=. python benchmarks/bf16_parity.py [--device cuda] [--layers 22]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import streaming
from benchmarks.decode_speed import TINYLLAMA, random_checkpoint


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    args = parser.parse_args()
    from transformers import LlamaForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(0)
    prompt = torch.randint(3, TINYLLAMA["vocab_size"], (args.prompt_tokens,)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(Path(tmp) / "plain", "plain", layers=args.layers, shards=2)
        rt = streaming.load(path, device=device, dtype="bfloat16")
        ours = rt.session(unbounded_cache=True).feed(prompt, return_logits=True).float()
        del rt
        theirs = {}
        for dtype in (torch.bfloat16, torch.float32):
            hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
            with torch.inference_mode():
                theirs[dtype] = hf(torch.tensor([prompt], device=device)).logits[0].float()
            del hf
    print(f"torch {torch.__version__}, {args.device}, {args.layers} layers, {args.prompt_tokens}-token prompt")
    print(f"ours bf16 vs transformers bf16: {relative(ours, theirs[torch.bfloat16]):.2e}")
    print(f"transformers bf16 vs transformers float32: {relative(theirs[torch.bfloat16], theirs[torch.float32]):.2e}")
    print(f"ours bf16 vs transformers float32: {relative(ours, theirs[torch.float32]):.2e}")


if __name__ == "__main__":
    main()
