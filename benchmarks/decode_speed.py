"""Batch-1 decode and prefill speed: sinkstream's paths vs Hugging Face transformers on the same weights,
in the same process, against the card's bandwidth roofline.

Builds a TinyLlama-1.1B-shaped checkpoint with random weights (plain Llama, LCKV w=2), writes it to disk,
loads it through sinkstream's loader and through transformers, checks that both give the same logits,
then times greedy decode of the same prompt on every path:
- eager (sdpa / plain attention): the reference steps, one kernel launch at a time;
- CUDA graphs: every decode step and full prompt chunk replays one captured graph (decode attention in
  the Triton kernel that applies RoPE where keys are read);
- CUDA graphs + compiled layers: the same, each layer's arithmetic through `torch.compile`;
- "-gemv": decode steps run each layer in four GEMV launches (streaming/layer_gemv.py), the default.
For the graph paths it also times decode with the window full, the stream positioned at 100,000
tokens seen (a sink-window step costs the same at 100k as at any length past S+W), and prefill at
several chunk sizes. The roofline: bytes one step must read (weights + the window's keys and values)
over the card's measured copy bandwidth. Run on the GPU:

    PYTHONPATH=. python benchmarks/decode_speed.py --device cuda

Prints a markdown table; the numbers go to benchmarks/RESULTS.md with the date, hardware and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import streaming
from streaming import kernels
from tests.tiny_checkpoint import lckv_config, plain_config, random_weights, write_checkpoint

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False)
TINY = dict(TINYLLAMA, vocab_size=1000, hidden_size=128, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)


def random_checkpoint(directory, kind: str, *, layers: int = 22, shape: dict = TINYLLAMA, shards: int = 1) -> Path:
    """A checkpoint of random weights in `shape` (the plain model, or LCKV w=2 with m=7, b=2), as the
    GPU benchmarks measure: bf16, matrices drawn at std 0.2 and scaled by 0.1 (norms at 1)."""
    config = plain_config(layers=layers, **shape) if kind == "plain" else lckv_config(layers=layers, m=7, b=2, **shape)
    weights = {k: (v * 0.1 if v.dim() > 1 else v).to(torch.bfloat16) for k, v in random_weights(config, std=0.2).items()}
    return write_checkpoint(Path(directory), config, weights, shards=shards)


MODES = {  # name: (attention impl, CUDA graphs, compiled layers, one-row GEMV layer kernels)
    "eager-sdpa": ("sdpa", False, False, False),
    "eager-plain": ("plain", False, False, False),
    "graphs": ("sdpa", True, False, False),
    "graphs-compiled": ("sdpa", True, True, False),
    "graphs-gemv": ("sdpa", True, False, True),  # decode steps: four GEMV launches per layer
    # The default on a GPU: compiled prefill, GEMV decode, a greedy step's argmax and penalty history in
    # one Triton launch and a one-token step's plan in another (streaming.kernels.use_fused_greedy and
    # use_fused_plan), each KV layer's store in its attention launch (use_fused_store).
    "graphs-compiled-gemv": ("sdpa", True, True, True),
    # As the default, with every Triton kernel launched without programmatic dependent launch (on by
    # default where supported: Hopper and later).
    "graphs-compiled-gemv-nopdl": ("sdpa", True, True, "nopdl"),
    # As the default, with the greedy step and the plan in torch ops, and with only one of the two fused.
    "graphs-compiled-gemv-unfused": ("sdpa", True, True, "unfused"),
    "graphs-compiled-gemv-fusedgreedy": ("sdpa", True, True, "fusedgreedy"),
    "graphs-compiled-gemv-fusedplan": ("sdpa", True, True, "fusedplan"),
    # As the default, with each KV layer's store in a launch of its own before the attention.
    "graphs-compiled-gemv-storeapart": ("sdpa", True, True, "storeapart"),
    "eager-compiled": ("sdpa", False, True, False),  # CPU's fast path
    "graphs-autotuned": ("sdpa", True, "max-autotune-no-cudagraphs", False),  # Inductor's GEMM templates timed too
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    """Bytes per second a device-to-device copy moves (read + write), best of 20 copies of 1 GiB."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(20):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def step_bytes(rt, slots: int) -> int:
    """Bytes a decode step must read: every weight but the embedding table (one row of it is read),
    plus the keys and values of `slots` slots of every KV layer."""
    config = rt.config
    weights = sum(p.numel() * p.element_size() for name, p in rt.model.named_parameters()
                  if not (name == "model.embed_tokens.weight" and not config.tie_word_embeddings))
    kv = 2 * len(config.kv_layers) * slots * config.num_key_value_heads * config.head_dim * rt.model.inv_freq.new_empty(
        0, dtype=rt.dtype).element_size()
    return weights + kv


def decode_rate(s, new_tokens, device, repeats: int = 1) -> tuple[float, list[int]]:
    """Median tok/s of `repeats` greedy runs of `new_tokens` on the stream as it goes, and the first
    run's ids (single runs of 256 tokens spread by up to 7 % between runs on the H200)."""
    rates, first = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        ids = [i for r in s.generate(max_new_tokens=new_tokens, temperature=0.0) for i in r.token_ids]
        sync(device)
        rates.append(len(ids) / (time.perf_counter() - t0))
        first = ids if first is None else first
    return statistics.median(rates), first


def near_and_far_rates(s, new_tokens, device, repeats: int = 5) -> tuple[float, float, list[int]]:
    """Median tok/s at the stream's own length (about 2k, window full) and at 100k tokens, runs
    alternating between the two (the H200's rate drifts by up to 7 % from run to run: alternating
    keeps the drift out of the comparison), and the first run's ids. Only the length differs: with
    the window full, slots and positions are the same at any length."""
    engine, near = s.engine, int(s.engine.cache.lengths[s.row])
    near_rates, far_rates, first = [], [], None
    for _ in range(repeats):
        for length, rates in ((near, near_rates), (100_000, far_rates)):
            engine.cache.lengths[s.row] = length
            engine.seen[s.row] = length
            rate, ids = decode_rate(s, new_tokens, device)
            rates.append(rate)
            first = ids if first is None else first
    return statistics.median(near_rates), statistics.median(far_rates), first


def prefill_rate(s, prompt, device, repeats: int = 3) -> float:
    """Median tok/s of feeding `prompt` into a fresh stream (its graphs captured by a first feed)."""
    s.reset()
    s.feed(prompt)
    rates = []
    for _ in range(repeats):
        s.reset()
        sync(device)
        t0 = time.perf_counter()
        s.feed(prompt)
        sync(device)
        rates.append(len(prompt) / (time.perf_counter() - t0))
    return statistics.median(rates)


def time_mode(rt, args, mode, prompt, device):
    impl, graphs, compiled, one_row = MODES[mode]
    rt.model.attention_impl = impl
    rt.cuda_graphs = graphs
    rt.model.compile_layers(bool(compiled), mode=compiled if isinstance(compiled, str) else None)
    rt.model.one_row_kernels = bool(one_row)
    kernels.use_pdl(False if one_row == "nopdl" else None)
    kernels.use_fused_greedy(one_row not in ("unfused", "fusedplan"))
    kernels.use_fused_plan(one_row not in ("unfused", "fusedgreedy"))
    kernels.use_fused_store(False if one_row == "storeapart" else None)
    row = {"mode": mode}
    t0 = time.perf_counter()
    s = rt.session(sinks=args.sinks, window=args.window)  # the default chunk (1,024 on CUDA, 256 on CPU)
    s.feed(prompt)  # warm-up (captures the chunk and decode graphs, compiles when asked)
    list(s.generate(max_new_tokens=8, temperature=0.0))
    row["warm-up s"] = time.perf_counter() - t0
    row["prefill tok/s"] = prefill_rate(s, prompt, device, repeats=1 if not graphs else 3)
    if graphs:
        row["decode tok/s"], row["decode at 100k tok/s"], ids = near_and_far_rates(s, args.new_tokens, device)
    else:
        row["decode tok/s"], ids = decode_rate(s, args.new_tokens, device)
    row["cache bytes"] = s.stats().cache_bytes
    if graphs:
        for chunk in args.chunks:
            c = rt.session(sinks=args.sinks, window=args.window, chunk=chunk)
            row[f"prefill chunk {chunk} tok/s"] = prefill_rate(c, prompt, device)
            del c
    rt.model.compile_layers(False)
    kernels.use_pdl(None)
    kernels.use_fused_greedy(None)
    kernels.use_fused_plan(None)
    kernels.use_fused_store(None)
    return row, ids


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
    parser.add_argument("--hf-tokens", type=int, default=64, help="greedy tokens transformers generates")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=2044)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--kinds", default="plain,lckv")
    parser.add_argument("--modes", default="eager-sdpa,eager-plain,graphs,graphs-compiled,graphs-gemv,graphs-compiled-gemv")
    parser.add_argument("--chunks", type=int, nargs="*", default=[256, 512, 1024, 2044],
                        help="prefill chunk sizes timed on the graph paths")
    parser.add_argument("--tiny", action="store_true", help="a small shape, for a smoke run on CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    modes = [m for m in args.modes.split(",") if device.type == "cuda" or not MODES[m][1]]
    torch.manual_seed(0)
    base = TINY if args.tiny else TINYLLAMA
    prompt = torch.randint(3, base["vocab_size"], (args.prompt_tokens,)).tolist()
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + write)")
    rows, roofline = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            path = random_checkpoint(Path(tmp) / kind, kind, layers=args.layers, shape=base, shards=2)
            rt = streaming.load(path, device=device, dtype=dtype)
            roofline[kind] = bandwidth / step_bytes(rt, args.sinks + args.window)
            if kind == "plain":
                hf_rate, hf_ids, hf = time_hf(path, device, dtype, prompt[:512], args.hf_tokens)
                print(f"parity vs transformers: 256-token prefill logits rel diff {parity(rt, hf, prompt[:256], device):.2e}")
                if device.type == "cuda":  # the same with cuDNN's attention allowed first, as transformers' call may use
                    from torch.nn.attention import SDPBackend

                    from streaming import attention

                    preferred = attention._CUDA_BACKENDS
                    attention._CUDA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *preferred]
                    print(f"parity vs transformers, cuDNN attention first: {parity(rt, hf, prompt[:256], device):.2e}")
                    attention._CUDA_BACKENDS = preferred
            reference = None
            for mode in modes:
                row, ids = time_mode(rt, args, mode, prompt, device)
                row["kind"] = kind
                rows.append(row)
                if reference is None:
                    reference = ids
                else:
                    row["greedy ids as the first mode"] = f"{sum(a == b for a, b in zip(reference, ids))}/{len(ids)}"
                print(json.dumps(row), flush=True)
            if kind == "plain":
                rows.append({"kind": "plain", "mode": "transformers generate (dynamic cache)", "decode tok/s": hf_rate})
                print(f"parity vs transformers after every path: {parity(rt, hf, prompt[:256], device):.2e}")
                del hf
            del rt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    print(f"{platform.node()} {name}, torch {torch.__version__}, {args.dtype}, batch 1, prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, cache {args.sinks}+{args.window}, {args.layers} layers; roofline "
          + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in roofline.items()))
    keys = ["prefill tok/s", "decode tok/s", "decode at 100k tok/s"] + [f"prefill chunk {c} tok/s" for c in args.chunks]
    print("| model | path | " + " | ".join(keys) + " | decode / roofline | warm-up s |")
    print("|---" * (len(keys) + 4) + "|")
    for row in rows:
        cells = [f"{row[k]:,.0f}" if k in row else "-" for k in keys]
        share = f"{row['decode tok/s'] / roofline[row['kind']]:.0%}"
        warm = f"{row['warm-up s']:.1f}" if "warm-up s" in row else "-"
        print(f"| {row['kind']} | {row['mode']} | " + " | ".join(cells) + f" | {share} | {warm} |")


if __name__ == "__main__":
    main()
