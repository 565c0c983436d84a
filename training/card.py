"""Model card (README.md in a checkpoint directory): provenance, licences, budget, held-out perplexity."""
from __future__ import annotations

import os

LICENCES = """\
## Training data and licences

- **Novels** (`books-train-*`): public-domain English novels, mostly 1771–1930 (Project Gutenberg-derived
  texts from the computationalstylistics "100 English Novels" set, the txtLAB/cenlab novel collection
  and the dhmit `gender_novels` corpus; Gutenberg headers stripped). The texts are in the public domain
  in the US.
- **Wikipedia** (`wiki-train-*`): English Wikipedia articles (a 2014 wikiextractor dump slice), text by
  **Wikipedia contributors**, licensed under CC BY-SA 3.0 and the GFDL. Whether trained weights are an
  adaptation of their training text is unsettled; this card gives the attribution those licences ask
  for either way.
- Validation: the fixed `books-valid` / `wiki-valid` splits, never trained on.
"""


def _ppl_table(metrics: dict, names: list[str]) -> str:
    rows = ["| model | books-valid | wiki-valid | all |", "|---|---|---|---|"]
    for key, res in metrics["heldout"].items():
        if key.split("@")[0] in names:
            rows.append(f"| {key} | " + " | ".join(f"{res[v]['ppl']:.2f}" if v in res else "–"
                                                 for v in ("books-valid", "wiki-valid", "all")) + " |")
    return "\n".join(rows)


def write_card(out_dir: str, name: str, metrics: dict, samples: list[tuple[str, str]] | None = None,
               extra: str = "") -> None:
    """Writes out_dir/README.md. `samples`: (command, unedited output) pairs."""
    tr, st = metrics["train"], metrics["settings"]
    lckv = name == "lckv"
    title = "sinkstream default model (LCKV w=2)" if lckv else "sinkstream plain-Llama twin"
    arch = ("Llama-style decoder with a Layer-Condensed KV cache (Wu & Tu, ACL 2024): 8 layers, layers 1–5 "
            "attend to layer 6's keys/values (`layer_types = 0_6_6_6_6_6_6_7`), only layers 0, 6 and 7 "
            "own a KV cache; every layer masks its diagonal (`force_nodiag`). Trained with the iterative "
            "parallel forward") if lckv else \
        "Plain Llama decoder of the same shape (every layer owns its KV, standard causal attention)."
    if lckv:
        p = metrics.get("passes", {})
        arch += (f": the block (layers 1–6) runs m+b = {p.get('m', '?')}+{p.get('b', '?')} passes from the "
                 "same input, each reading the previous pass's layer-6 KV (layer 6 too, the ACL-2024 "
                 "behaviour); the first m without gradient.")
    m = metrics["train"]["models"][name]
    lines = [
        f"# {title}", "",
        "A small English language model trained from scratch by sinkstream's reproducible recipe "
        "(`training/`), shipped so sinkstream works offline. It writes fluent-looking English with "
        "little factual reliability: it is a demonstration model, not an assistant.", "",
        "## Model", "", arch, "",
        f"- parameters: {metrics['parameters'][name]:,} (tied input/output embeddings), stored in bfloat16",
        "- vocabulary: 8,192 sentencepiece BPE pieces with byte fallback, trained on a sample of the training split",
        f"- trained at sequence length {st['seq_len']}; RoPE theta 10000; the runtime's default cache "
        "(4 sinks + 1020 window) keeps positions within that length", "",
        LICENCES,
        "## Training budget", "",
        f"- {tr['steps']} steps × {st['batch_rows']} rows × {st['seq_len']} tokens = "
        f"**{tr['tokens_per_model']:,} tokens**, the same batches for the LCKV model and its plain twin "
        "(trained in lockstep in one process)",
        f"- AdamW (β 0.9/0.95, weight decay {st['weight_decay']}), peak lr {st['lr']}, {st['warmup_steps']} "
        f"warm-up steps, cosine to {st['min_lr_ratio']}×, grad clip {st['grad_clip']}, bf16 autocast",
        f"- hardware: {metrics['versions'].get('gpu', 'CPU')}; {tr['train_seconds']} s of training for both "
        f"models; this model's steps took {m['busy_seconds']} s ({m['tokens_per_second']:,} tokens/s)",
        f"- software: {', '.join(f'{k} {v}' for k, v in metrics['versions'].items() if k != 'gpu')}",
        f"- final training loss (mean of the last 50 steps): {m['final_train_loss_mean50']}",
        f"- command: `{metrics['command']}` ({metrics['date_utc']} UTC)", "",
        "## Held-out perplexity", "",
        f"Non-overlapping {st['seq_len']}-token rows from the validation split (at most "
        f"{metrics['eval_rows_per_set']} rows per set), every next-token prediction scored, computed with "
        "the training framework's parallel forward (LCKV: the iterative forward with m+b passes, as the "
        "runtime's parallel prefill; `@32passes` = 32 passes, closer to the exact sequential fixed point).",
        "", _ppl_table(metrics, ["lckv", "plain"]), "",
    ]
    if extra:
        lines += [extra, ""]
    if samples:
        lines += ["## Samples (unedited)", ""]
        for cmd, text in samples:
            lines += [f"`{cmd}`", "", "```", text, "```", ""]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    """Rewrite a checkpoint's card from the run's metrics.json, adding samples and extra sections:

    python -m training.card --metrics runs/default/metrics.json --out streaming/models/default --name lckv \
        --extra extra.md --sample 'sinkstream generate "..."' sample1.txt
    """
    import argparse
    import json
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="lckv")
    ap.add_argument("--extra", help="markdown file appended after the perplexity table")
    ap.add_argument("--sample", nargs=2, action="append", metavar=("COMMAND", "OUTPUT_FILE"), default=[])
    args = ap.parse_args()
    with open(args.metrics) as f:
        metrics = json.load(f)
    extra = open(args.extra, encoding="utf-8").read().strip() if args.extra else ""
    samples = [(cmd, open(path, encoding="utf-8").read()) for cmd, path in args.sample]
    write_card(args.out, args.name, metrics, samples, extra)


if __name__ == "__main__":
    main()
