"""Every engine figure in one command, on the GPU: decode throughput, the KV-budget comparison,
admission, and the server with 1,000 websocket sessions while a 4k-token prompt arrives.

    PYTHONPATH=. python3 benchmarks/engine_all.py

Runs, one after the other, each in a fresh process (so each starts with the whole GPU):
1. benchmarks/engine_decode.py: TinyLlama-1.1B shape, plain and LCKV w=2, 4 + 1020 slots; decode
   tok/s at 1, 64, 256 and 1,024 streams (and with windows full), streams and tok/s at a 32 GiB KV
   budget, admission ms per stream with 128-token prompts, transformers at 1 and 64 streams on the
   same plain weights in the same process. Layers compiled, every engine row also pipelined (what
   `serve` runs on a GPU), next to the plain step.
2. benchmarks/server_sessions.py: the bundled model on the GPU, 1,000 concurrent sessions of 64
   tokens: errors, p50/p99 time to first token, aggregate tok/s, and the worst gap between deltas of
   any session while one more session's 4,000-token prompt is ingested, with `serve`'s GPU defaults
   (compiled layers, pipelined steps).
Extra arguments are passed to neither; run the scripts alone for other settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    [str(HERE / "engine_decode.py"), "--compile", "--pipelined"],
    [str(HERE / "server_sessions.py"), "--sessions", "1000", "--connections", "50", "--new-tokens", "64",
     "--device", "cuda", "--long-prompt-tokens", "4000"],
]


def main() -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    failed = 0
    for command in RUNS:
        print(f"\n$ python {' '.join(Path(command[0]).name if i == 0 else a for i, a in enumerate(command))}", flush=True)
        failed |= subprocess.run([sys.executable, *command], env=env).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
