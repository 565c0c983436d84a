"""Streaming perplexity over a long held-out stream through the runtime's sink+window cache.

The stream: every document of the validation split (books-valid, wiki-valid), framed <s> doc </s> as in
training, in a fixed shuffled order (seed 0), cut to --tokens. It is fed through
`streaming.load(model).session(sinks, window, chunk).feed(ids, return_logits=True)` piece by piece; each
token is scored by the logits of the token before it. Reported per --segment predicted tokens.

    PYTHONPATH=. python benchmarks/streaming_ppl.py --device cuda --tokens 1000000 \
        --config 4:1020 --config 0:1024 [--model DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import streaming  # noqa: E402
from training.corpus import DEFAULT_CORPUS, read_documents, shard_paths  # noqa: E402
from training.data import encode_documents  # noqa: E402


def heldout_stream(corpus: str, tokenizer: str, tokens: int, seed: int = 0) -> list[int]:
    docs = [d for p in shard_paths(corpus, "valid") for d in read_documents(p)]
    random.Random(seed).shuffle(docs)
    ids = encode_documents(docs, tokenizer)
    if len(ids) < tokens:
        print(f"note: the validation split has only {len(ids):,} tokens", file=sys.stderr)
    return ids[:tokens].tolist()


def stream_nll(rt, ids: list[int], sinks: int, window: int, chunk: int | None, piece: int,
               segment: int, deadline: float, log=print, on_segment=None) -> dict:
    """-> per-segment and total NLL of ids[1:] fed through one session (stops at `deadline`)."""
    s = rt.session(sinks=sinks, window=window, chunk=chunk)
    dev = rt.device
    target = torch.tensor(ids, device=dev)
    seg_sum, seg_n, segments = 0.0, 0, []
    total, count = 0.0, 0
    prev = None                                   # logits row of the previous piece's last token
    t0 = time.perf_counter()
    for start in range(0, len(ids), piece):
        n = min(piece, len(ids) - start)
        logits = s.feed(ids[start:start + n], return_logits=True)          # [n, V] float32
        if prev is None:                                                   # the first token is not scored
            rows, tgt = logits[:-1], target[start + 1:start + n]
        else:
            rows, tgt = torch.cat([prev[None], logits[:-1]]), target[start:start + n]
        prev = logits[-1]
        nll = F.cross_entropy(rows, tgt, reduction="none")
        # split this piece's losses at segment boundaries (segment k covers predicted tokens k*S..)
        vals = nll.double().cpu()
        i = 0
        while i < vals.numel():
            take = min(segment - seg_n, vals.numel() - i)
            seg_sum += vals[i:i + take].sum().item()
            seg_n += take
            i += take
            if seg_n == segment:
                segments.append({"tokens": seg_n, "ppl": math.exp(seg_sum / seg_n)})
                log(f"  sinks={sinks} window={window}: segment {len(segments)} ppl {segments[-1]['ppl']:.2f} "
                    f"({time.perf_counter() - t0:.0f} s)")
                seg_sum, seg_n = 0.0, 0
                if on_segment:
                    on_segment({"sinks": sinks, "window": window, "partial": True, "segments": segments})
        total += vals.sum().item()
        count += vals.numel()
        if time.perf_counter() > deadline:
            log(f"  stopped at the time limit after {count:,} tokens")
            break
    if seg_n:
        segments.append({"tokens": seg_n, "ppl": math.exp(seg_sum / seg_n)})
    secs = time.perf_counter() - t0
    st = s.stats()
    return {"sinks": sinks, "window": window, "chunk": s.chunk, "tokens_scored": count,
            "ppl": math.exp(total / count), "segments": segments, "seconds": round(secs, 1),
            "tokens_per_second": round(count / secs), "cache_bytes": st.cache_bytes,
            "tokens_in_cache": st.tokens_in_cache}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the bundled model)")
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--config", action="append", help="SINKS:WINDOW, repeatable (default 4:1020 and 0:1024)")
    ap.add_argument("--chunk", type=int, default=None, help="tokens per step (default: the runtime's)")
    ap.add_argument("--piece", type=int, default=8192, help="tokens per feed() call")
    ap.add_argument("--segment", type=int, default=100_000)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--compile", action="store_true", help="layers through torch.compile")
    ap.add_argument("--max-seconds", type=float, default=1e9, help="per configuration")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    rt = streaming.load(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    model_dir = str(rt.path)
    ids = heldout_stream(args.corpus, os.path.join(model_dir, "tokenizer.model"), args.tokens)
    print(f"{model_dir}: {len(ids):,} held-out tokens on {rt.device} ({rt.dtype})", flush=True)
    results = {"model": model_dir, "device": str(rt.device), "dtype": str(rt.dtype),
               "gpu": torch.cuda.get_device_name(0) if rt.device.type == "cuda" else None,
               "torch": torch.__version__, "stream_tokens": len(ids), "runs": []}
    def save(partial=None):  # after every segment too: a killed run keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**results, "runs": results["runs"] + ([partial] if partial else [])}, f, indent=2)

    for cfg in args.config or ["4:1020", "0:1024"]:
        sinks, window = (int(x) for x in cfg.split(":"))
        deadline = time.perf_counter() + args.max_seconds
        res = stream_nll(rt, ids, sinks, window, args.chunk, args.piece, args.segment, deadline,
                         log=lambda m: print(m, flush=True), on_segment=save)
        print(f"sinks={sinks} window={window} chunk={res['chunk']}: ppl {res['ppl']:.2f} over "
              f"{res['tokens_scored']:,} tokens, {res['tokens_per_second']:,} tok/s", flush=True)
        results["runs"].append(res)
        save()
    return results


if __name__ == "__main__":
    main()
