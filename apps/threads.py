"""How many CPU threads torch may use, chosen before the model loads.

A one-token decode step of a small model is hundreds of small operations, and with two threads
each one ends in a barrier where the threads wait for each other. When another process is busy,
one of them is often descheduled and the whole step waits for it. Measured on the 2-CPU
development machine (benchmarks/cpu_threads.py, RESULTS.md), the bundled 12.9M-parameter model
generated at 70-80 tok/s with one thread (35 with both CPUs taken by others); two threads made 93 on a quiet machine but 27 next to
one busy loop and 6 while other test runs used the CPUs. A 386M-parameter model gained 11-25 % from a
second thread when quiet and lost half next to one busy loop. So small models get one thread;
larger ones every CPU allowed but one, left for the rest of the machine (on 2 CPUs: one too).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

# Below this many parameters a model runs on one thread (see the module docstring).
SMALL_MODEL_PARAMS = 100_000_000


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def checkpoint_params(model_dir: Path) -> int | None:
    """Parameters in the checkpoint's safetensors files, from their headers (no weights read)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    except Exception:  # a malformed file: loading reports it properly; no guess here
        return None
    return total


def auto_threads(params: int | None, cpus: int) -> int:
    """One thread for small models (or an unreadable checkpoint), else every CPU allowed but one."""
    if params is None or params < SMALL_MODEL_PARAMS:
        return 1
    return max(1, cpus - 1)


def configure_threads(args: argparse.Namespace) -> str:
    """Set torch's intra-op threads from --threads, $OMP_NUM_THREADS or the automatic rule.

    Must run before the model loads and before any inter-op work; returns a note for --verbose.
    """
    import torch

    try:  # the CLI runs no inter-op parallel work; a pool of idle threads is only overhead
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already started (e.g. main() called twice in one process)
        pass
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        why = "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        why = "$OMP_NUM_THREADS"  # torch has read it already
    else:
        params = checkpoint_params(model_dir(args.model))
        torch.set_num_threads(auto_threads(params, available_cpus()))
        size = f"{params / 1e6:.1f}M parameters" if params is not None else "size unknown"
        why = f"automatic: {size}, {available_cpus()} CPUs"
    return f"{torch.get_num_threads()} thread(s) ({why})"


def model_dir(model: str | None) -> Path:
    if model is None:
        from streaming.runtime import DEFAULT_MODEL_DIR

        return Path(DEFAULT_MODEL_DIR)
    return Path(model).expanduser()
