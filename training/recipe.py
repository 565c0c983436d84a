"""The whole recipe, one command: tokenizer -> token streams -> LCKV + plain twin in lockstep -> held-out
perplexity -> Hugging Face checkpoint directories with model cards.

    PYTHONPATH=. python -m training --corpus ../shared/corpus --out runs/default --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from training import card
from training.corpus import DEFAULT_CORPUS, shard_paths
from training.data import RowSampler, encode_shards, eval_rows
from training.evaluate import perplexity
from training.export import save_checkpoint
from training.model import CausalLM, ModelShape, lckv_sources
from training.tokenizer import train_tokenizer
from training.train import TrainSettings, train_lockstep

TRAIN_SHARDS = ["books-train-00", "books-train-01", "books-train-02", "wiki-train-00", "wiki-train-04"]
PRESETS = {
    # the bundled model: ~12.9M parameters (LCKV), 25.8 MB in bf16
    "default": dict(shape=dict(hidden_size=384, intermediate_size=768, num_hidden_layers=8,
                               num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                               max_position_embeddings=1024),
                    train=dict(batch_rows=64, seq_len=1024)),
    # CPU smoke test (CI): seconds
    "tiny": dict(shape=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                            max_position_embeddings=64),
                 train=dict(batch_rows=8, seq_len=64, warmup_steps=5, lr=3e-3, log_every=5)),
}


def build_models(vocab: int, preset: dict, m: int, b: int, seed: int, which: list[str]) -> dict[str, CausalLM]:
    models = {}
    for name in which:
        layers = preset["shape"]["num_hidden_layers"]
        lckv = name == "lckv"
        shape = ModelShape(vocab_size=vocab, **preset["shape"], kv_sources=lckv_sources(layers) if lckv else None,
                           force_nodiag=lckv, forward_passes=m, backward_passes=b)
        torch.manual_seed(seed)
        models[name] = CausalLM(shape)
    return models


def versions() -> dict:
    import sentencepiece
    import transformers
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "transformers": transformers.__version__, "sentencepiece": sentencepiece.__version__}
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name(0)
    return v


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", help="existing tokenizer.model (default: train one into OUT/tokenizer)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--train-shards", nargs="*", default=TRAIN_SHARDS)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--models", default="lckv,plain")
    ap.add_argument("--forward-passes", "-m", type=int, default=7)
    ap.add_argument("--backward-passes", "-b", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, help="fixed step count (default: fit to --time-budget)")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds of training")
    ap.add_argument("--batch-rows", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--eval-rows", type=int, default=512, help="held-out rows per valid set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--max-docs", type=int, help="documents per shard (smoke tests)")
    args = ap.parse_args(argv)
    if args.backward_passes < 2:
        ap.error("--backward-passes must be >= 2 (with b=1 the target layer's k/v projections get no gradient)")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    log_path = os.path.join(args.out, "train_log.txt")

    def log(msg):
        line = f"[{time.perf_counter() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    preset = PRESETS[args.preset]
    tok = args.tokenizer or train_tokenizer(args.corpus, os.path.join(args.out, "tokenizer"), args.vocab_size,
                                            [s for s in args.train_shards], threads=args.workers)
    import sentencepiece as spm
    vocab = spm.SentencePieceProcessor(model_file=tok).vocab_size()
    log(f"tokenizer {tok}: {vocab} pieces; versions {versions()}")

    train_paths = shard_paths(args.corpus, "train", args.train_shards)
    valid_paths = shard_paths(args.corpus, "valid")
    streams = encode_shards(train_paths + valid_paths, tok, args.workers, args.max_docs)
    train_counts = {os.path.basename(p).split(".")[0]: len(s) for p, s in zip(train_paths, streams)}
    train_tokens = np.concatenate(streams[:len(train_paths)])
    valid = {os.path.basename(p).split(".")[0]: s for p, s in zip(valid_paths, streams[len(train_paths):])}
    log(f"train tokens {len(train_tokens):,} {train_counts}; valid tokens { {k: len(v) for k, v in valid.items()} }")

    st = TrainSettings(**{**preset["train"], "seed": args.seed, "steps": args.steps, "time_budget": args.time_budget})
    if args.batch_rows:
        st.batch_rows = args.batch_rows
    if args.lr:
        st.lr = args.lr
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    models = build_models(vocab, preset, args.forward_passes, args.backward_passes, args.seed,
                          args.models.split(","))
    for k, m in models.items():
        m.to(device)
        log(f"{k}: {m.num_parameters():,} parameters, kv_sources {m.s.sources}")
    sampler = RowSampler(train_tokens, st.seq_len, device, seed=args.seed)
    result = train_lockstep(models, sampler, st, device, log, os.path.join(args.out, "train_log.jsonl"))
    log(f"trained {result['steps']} steps, {result['tokens_per_model']:,} tokens per model")

    evals = {}
    for name, model in models.items():
        passes = [None] + ([32] if model.s.is_lckv else [])
        for p in passes:
            key = name if p is None else f"{name}@{p}passes"
            evals[key] = {}
            for vname, stream in valid.items():
                rows = eval_rows(stream, st.seq_len, args.eval_rows)
                if rows.shape[0] == 0:
                    continue
                evals[key][vname] = perplexity(model, rows, passes=p, device=device)
            nll = sum(r["nll"] * r["tokens"] for r in evals[key].values()) / sum(r["tokens"] for r in evals[key].values())
            evals[key]["all"] = {"nll": nll, "ppl": float(np.exp(nll)), "tokens": sum(r["tokens"] for r in evals[key].values())}
            log(f"held-out {key}: " + ", ".join(f"{v}: {r['ppl']:.2f}" for v, r in evals[key].items()))

    metrics = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "versions": versions(),
        "command": "python -m training " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "preset": args.preset, "settings": st.__dict__, "train_shards": train_counts,
        "valid_tokens": {k: len(v) for k, v in valid.items()}, "eval_rows_per_set": args.eval_rows,
        "train": result, "heldout": evals, "wall_seconds": round(time.perf_counter() - t0, 1),
        "parameters": {k: m.num_parameters() for k, m in models.items()},
        "passes": {"m": args.forward_passes, "b": args.backward_passes},
    }
    for name, model in models.items():
        out = os.path.join(args.out, name)
        save_checkpoint(model, out, tok)
        card.write_card(out, name, metrics)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    log(f"done: {args.out}")
    return metrics
