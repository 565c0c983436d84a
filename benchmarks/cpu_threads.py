"""CLI speed on CPU by intra-op thread count, on an idle machine and next to a busy process.

    PYTHONPATH=. python3 benchmarks/cpu_threads.py [--repeats 3] [--threads 1 2 auto] [--env K=V]
    PYTHONPATH=. python3 benchmarks/cpu_threads.py --random-hidden 2048 --random-layers 8 \\
        --new-tokens 40 --ingest-chars 2000      # a larger random model with the bundled tokenizer

Runs the real `sinkstream` console script: `generate -v` (its generation tokens/s: decode steps)
and `stream` over tests/data/heldout.txt (its ingestion tokens/s: chunked prefill), each with
`--threads N` or, for "auto", with no flag and no $OMP_NUM_THREADS; "as found", then next to
`--busy` pure-Python busy loops started here. Other users of the machine are not controlled:
the 1-minute load average is recorded before every run, so each row says how busy it was.
Prints a markdown table: median and range over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "heldout.txt"
SINKSTREAM = [shutil.which("sinkstream")] if shutil.which("sinkstream") else [sys.executable, "-m", "apps"]
GEN_RATE = re.compile(r"generation: (\d+) tokens, ([0-9.]+) tokens/s")
INGEST_RATE = re.compile(r"ingested (\d+) tokens .*? ([0-9.]+) tokens/s")


EXTRA_ENV: dict[str, str] = {}  # --env KEY=VALUE, for the commands measured


def cli(args: list[str], threads: str, stdin: bytes | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(EXTRA_ENV)
    flags = [] if threads == "auto" else ["--threads", threads]
    r = subprocess.run(SINKSTREAM + args + flags, input=stdin, capture_output=True, env=env,
                       timeout=900)
    err = r.stderr.decode("utf-8", "replace")
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {err}")
    return err


def measure(model: list[str], threads: str, new_tokens: int, text: bytes) -> tuple[float, float]:
    """(generate tokens/s, stream ingestion tokens/s) in fresh processes."""
    err = cli(["generate", "The old house at the end of the lane", *model, "-n", str(new_tokens),
               "--seed", "0", "-v"], threads)
    gen = float(GEN_RATE.search(err).group(2))
    err = cli(["stream", *model, "--no-progress"], threads, stdin=text)
    ingest = float(INGEST_RATE.search(err).group(2))
    return gen, ingest


def random_checkpoint(hidden: int, layers: int, directory: Path) -> Path:
    """A plain Llama-shaped random model with the bundled model's tokenizer (8k vocabulary)."""
    from streaming.runtime import DEFAULT_MODEL_DIR
    from tests.tiny_checkpoint import plain_config, random_weights, write_checkpoint

    config = plain_config(layers, vocab_size=8192, hidden_size=hidden,
                          intermediate_size=hidden * 8 // 3 // 64 * 64, num_attention_heads=hidden // 64,
                          num_key_value_heads=max(1, hidden // 256), head_dim=64, tie_word_embeddings=False)
    write_checkpoint(directory, config, random_weights(config, std=0.02))
    for f in Path(DEFAULT_MODEL_DIR).iterdir():
        if "token" in f.name or f.suffix == ".model":
            shutil.copy(f, directory / f.name)
    return directory


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", nargs="+", default=["1", "2", "auto"])
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes in the loaded runs")
    p.add_argument("--new-tokens", type=int, default=150)
    p.add_argument("--ingest-chars", type=int, default=None, help="stream only this much of the text")
    p.add_argument("--random-hidden", type=int, default=None)
    p.add_argument("--random-layers", type=int, default=8)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the measured commands, e.g. OMP_WAIT_POLICY=PASSIVE")
    args = p.parse_args()
    EXTRA_ENV.update(kv.split("=", 1) for kv in args.env)

    text = TEXT.read_bytes()[:args.ingest_chars] if args.ingest_chars else TEXT.read_bytes()
    tmp = tempfile.TemporaryDirectory()
    model, name = ["--device", "cpu"], "bundled model"
    if args.random_hidden:
        path = random_checkpoint(args.random_hidden, args.random_layers, Path(tmp.name) / "ckpt")
        model += ["--model", str(path)]
        from apps.threads import checkpoint_params

        name = (f"random plain model, hidden {args.random_hidden}, {args.random_layers} layers, "
                f"{checkpoint_params(path) / 1e6:.0f}M parameters")

    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in range(args.repeats):
        for load in ("as found", f"+{args.busy} busy loop"):
            procs = busy_loops(args.busy) if load != "as found" else []
            try:
                if procs:
                    time.sleep(1.0)
                for threads in args.threads:
                    loadavg = os.getloadavg()[0]
                    gen, ingest = measure(model, threads, args.new_tokens, text)
                    results.setdefault((load, threads), []).append((gen, ingest, loadavg))
                    print(f"# repeat {r}, {load}, threads {threads}: generate {gen:.1f}, "
                          f"stream {ingest:.1f} tok/s, load average {loadavg:.2f}", file=sys.stderr,
                          flush=True)
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name")), platform.processor())
    print(f"{time.strftime('%Y-%m-%d')}, {cpu}, {len(os.sched_getaffinity(0))} CPUs, torch "
          f"{torch.__version__}, float32, {name}; generate -n {args.new_tokens}, stream "
          f"{len(text)} bytes; {args.repeats} repeats"
          + "".join(f"; {kv}" for kv in args.env))
    print("| machine | threads | generate tok/s, median (range) | stream ingestion tok/s, median (range) | 1-min load average before the runs |")
    print("|---|---|---|---|---|")

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    for (load, threads), rows in results.items():
        gens, ingests, loads = zip(*rows)
        print(f"| {load} | {threads} | {cell(gens)} | {cell(ingests)} | {min(loads):.2f}-{max(loads):.2f} |")
    print(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}), file=sys.stderr)


if __name__ == "__main__":
    main()
