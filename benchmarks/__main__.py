"""One entry point for the benchmarks: `python -m benchmarks NAME [args]` runs benchmarks/NAME.py with
`args` (`python -m benchmarks NAME --help` shows its own options). Run from the repository root.
Figures, setups and commands: benchmarks/RESULTS.md."""

from __future__ import annotations

import runpy
import sys

# name -> what it measures (one line each; the order of RESULTS.md)
BENCHMARKS = {
    "decode_speed": "batch-1 decode and prefill by path vs transformers generate, against the bandwidth roofline (GPU)",
    "prefill_profile": "LCKV/plain prefill by chunk, the prompt-chunk kernel against the plain attention path (GPU)",
    "bundled_gpu": "the bundled model on the GPU: ingest by chunk size and generation, eager or compiled",
    "engine_decode": "the engine: decode tok/s by stream count and at a KV budget, admission, vs transformers",
    "server_sessions": "the websocket server under N concurrent sessions: errors, TTFT, tok/s, gaps during a long prompt",
    "server_long_prompt": "the server while one session's long prompt arrives: another session's worst gap, cancel latency",
    "ray_serve": "serve --ray (1 or 2 replicas) against the single-process server, same load",
    "server_load": "the CPU server under sustained load with churn: latencies and RSS minute by minute",
    "cpu_bundled": "the bundled model on CPU through the Python API: generate and feed by chunk",
    "cpu_threads": "the CLI on CPU by thread count, quiet or next to a busy loop",
    "heldout_ppl": "held-out perplexity of a checkpoint (training forward and runtime paths)",
    "streaming_ppl": "perplexity along one long stream through a sink-window session, per segment",
    "gemv": "the one-row GEMV kernels against cuBLAS, and their config sweeps (GPU)",
    "decode_kernel": "the decode-attention kernel alone by rows and fill, and its config sweep (GPU)",
    "chunk_attention": "the prompt-chunk attention kernel against the plain path, and its config sweep (GPU)",
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: python -m benchmarks NAME [args]   (python -m benchmarks NAME --help: its options)", "",
             "benchmarks:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"error: no benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    sys.argv = [f"python -m benchmarks {name}", *rest]
    runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
