"""Held-out perplexity of a checkpoint on the validation split, by up to three independent paths.

Rows: non-overlapping 1024+1-token rows of each validation set (books-valid, wiki-valid; documents framed
<s> doc </s>), the first --rows of each, exactly the rows `training/` evaluates. Paths:

- `training`: the training framework's parallel forward (LCKV: the iterative forward, m+b passes);
- `runtime`: `streaming.load(model).session(unbounded_cache=True, chunk=1024).feed(row)`, the runtime's
  parallel prefill (LCKV: its iterative prefill with m+b passes);
- `sequential`: the same session with prefill="sequential", the runtime's exact token-by-token path
  (slow: --seq-rows rows per set).

    PYTHONPATH=. python benchmarks/heldout_ppl.py --device cuda --model DIR --rows 512 --seq-rows 4
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import streaming  # noqa: E402
from streaming.runtime import DEFAULT_MODEL_DIR  # noqa: E402
from training.corpus import DEFAULT_CORPUS, read_documents, shard_paths  # noqa: E402
from training.data import encode_documents, eval_rows  # noqa: E402
from training.evaluate import perplexity  # noqa: E402
from training.export import load_checkpoint  # noqa: E402


def runtime_nll(rt, rows: torch.Tensor, sequential: bool = False) -> tuple[float, int]:
    total, count = 0.0, 0
    for row in rows:
        s = rt.session(unbounded_cache=True, chunk=row.numel() - 1,
                       prefill="sequential" if sequential else "iterative")
        logits = s.feed(row[:-1].tolist(), return_logits=True)
        total += F.cross_entropy(logits, row[1:].to(logits.device), reduction="sum").item()
        count += row.numel() - 1
    return total, count


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--rows", type=int, default=512, help="rows per validation set (training/runtime paths)")
    ap.add_argument("--runtime-rows", type=int, default=None, help="rows per set for the runtime path (default --rows)")
    ap.add_argument("--seq-rows", type=int, default=0, help="rows per set for the sequential path")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--paths", default="training,runtime,sequential")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    tok = os.path.join(args.model, "tokenizer.model")
    sets = {}
    for path in shard_paths(args.corpus, "valid"):
        stream = encode_documents(read_documents(path), tok)
        sets[os.path.basename(path).split(".")[0]] = eval_rows(stream, args.seq_len, args.rows)
    paths = args.paths.split(",")

    def report(name, res):  # print and save each path's figures as soon as they exist
        nll = sum(r["nll"] * r["tokens"] for r in res.values()) / sum(r["tokens"] for r in res.values())
        res["all"] = {"nll": nll, "ppl": math.exp(nll), "tokens": sum(r["tokens"] for r in res.values())}
        print(f"{name:28s} " + "  ".join(f"{k}: {r['ppl']:.2f} ({r['tokens']:,} tok)" for k, r in res.items()),
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)

    out = {"model": args.model, "device": str(device), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "results": {}}
    if "training" in paths:
        model = load_checkpoint(args.model, device)
        res = {k: perplexity(model, r, device=device) for k, r in sets.items()}
        out["results"]["training"] = res
        report("training", res)
        del model
    rt = None
    for name, rows_per_set, seq in (("runtime", args.runtime_rows or args.rows, False),
                                    ("sequential", args.seq_rows, True)):
        if name not in paths or rows_per_set <= 0:
            continue
        rt = rt or streaming.load(args.model, device=device)
        res = {}
        for k, r in sets.items():
            t0 = time.perf_counter()
            total, count = runtime_nll(rt, r[:rows_per_set], sequential=seq)
            res[k] = {"nll": total / count, "ppl": math.exp(total / count), "tokens": count,
                      "seconds": round(time.perf_counter() - t0, 1)}
        out["results"][name + (f" ({rt.dtype})")] = res
        report(name + f" ({rt.dtype})", res)
    return out


if __name__ == "__main__":
    main()
