"""Decode speed and KV memory: sinkstream vs Hugging Face transformers on the same weights, same process.

Builds a TinyLlama-1.1B-shaped checkpoint with random weights (plain Llama and LCKV w=2), writes it to
disk, loads it through sinkstream's loader and through transformers, checks that both give the same
logits, then times greedy decode of the same prompt. Run on the GPU:

    PYTHONPATH=. python benchmarks/decode_speed.py --device cuda --new-tokens 256

Prints a markdown table; the numbers go to benchmarks/RESULTS.md with the date, hardware and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import streaming
from tests.tiny_checkpoint import lckv_config, plain_config, random_weights, write_checkpoint

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False)
TINY = dict(TINYLLAMA, vocab_size=1000, hidden_size=128, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(rt, prompt, new_tokens, sinks, window, impl, graphs):
    rt.model.attention_impl = impl
    rt.cuda_graphs = graphs
    s = rt.session(sinks=sinks, window=window, chunk=min(256, window))
    s.feed(prompt)  # warm-up (captures the chunk and decode graphs when they are on)
    list(s.generate(max_new_tokens=8, temperature=0.0))
    s.reset()
    sync(rt.device)
    t0 = time.perf_counter()
    s.feed(prompt)
    sync(rt.device)
    t1 = time.perf_counter()
    out = [r.token_ids for r in s.generate(max_new_tokens=new_tokens, temperature=0.0)]
    sync(rt.device)
    t2 = time.perf_counter()
    ids = [i for ids in out for i in ids]
    return len(prompt) / (t1 - t0), len(ids) / (t2 - t1), s.stats().cache_bytes, ids


def time_hf(path, device, dtype, prompt, new_tokens):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        hf.generate(ids[:, :8], max_new_tokens=8, do_sample=False)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync(device)
        elapsed = time.perf_counter() - t0
    return new_tokens / elapsed, out[0, len(prompt):].tolist(), hf


def parity(rt, hf, prompt, device):
    """Max relative difference of last-position logits (ours, full prefill) vs HF."""
    s = rt.session(unbounded_cache=True)
    ours = s.feed(prompt, return_logits=True)
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt], device=device)).logits[0].float()
    return float((ours - ref).abs().max() / ref.abs().max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=2044)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--tiny", action="store_true", help="a small shape, for a smoke run on CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = TINY if args.tiny else TINYLLAMA
    prompt = torch.randint(3, base["vocab_size"], (args.prompt_tokens,)).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("plain", "lckv"):
            if kind == "plain":
                config = plain_config(layers=args.layers, **base)
            else:
                config = lckv_config(layers=args.layers, m=7, b=2, **base)
            weights = {k: (v * 0.1 if v.dim() > 1 else v).to(torch.bfloat16)
                       for k, v in random_weights(config, std=0.2).items()}
            path = write_checkpoint(Path(tmp) / kind, config, weights, shards=2)
            del weights
            rt = streaming.load(path, device=device, dtype=dtype)
            modes = [("sdpa", False), ("plain", False)] + ([("sdpa", True)] if device.type == "cuda" else [])
            for impl, graphs in modes:
                prefill, decode, cache_bytes, ids = time_ours(rt, prompt, args.new_tokens, args.sinks, args.window,
                                                              impl, graphs)
                engine = "CUDA graphs" if graphs else "eager"
                rows.append((kind, f"sinkstream {engine} ({impl} attention)", prefill, decode, cache_bytes))
                if (impl, graphs) == ("sdpa", False):
                    ours = ids
                elif graphs:
                    print(f"{kind}: graph vs eager greedy ids agree {sum(a == b for a, b in zip(ours, ids))}/{len(ids)}")
            rt.model.attention_impl = "sdpa"
            rt.cuda_graphs = True
            if kind == "plain":
                hf_rate, hf_ids, hf = time_hf(path, device, dtype, prompt, args.new_tokens)
                agree = sum(a == b for a, b in zip(ours, hf_ids))
                rel = parity(rt, hf, prompt[:256], device)
                rows.append(("plain", "transformers generate (dynamic cache)", float("nan"), hf_rate, float("nan")))
                print(f"parity vs transformers: last-256 logits rel diff {rel:.2e}; greedy ids agree {agree}/{len(hf_ids)}")
                del hf
            del rt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    print(f"{platform.node()} {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}, "
          f"torch {torch.__version__}, {args.dtype}, batch 1, prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, cache {args.sinks}+{args.window}, {args.layers} layers")
    print("| model | engine | prefill tok/s | decode tok/s | KV bytes per stream |")
    print("|---|---|---|---|---|")
    for kind, engine, prefill, decode, nbytes in rows:
        kv = "-" if nbytes != nbytes else f"{nbytes / 2**20:.1f} MiB"
        pf = "-" if prefill != prefill else f"{prefill:,.0f}"
        print(f"| {kind} | {engine} | {pf} | {decode:,.1f} | {kv} |")
    print(json.dumps([list(r) for r in rows]))


if __name__ == "__main__":
    main()
