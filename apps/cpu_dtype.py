"""The CLI's automatic dtype on CPU: the checkpoint's own bfloat16 where the CPU computes it natively.

Measured on the 2-CPU development machine (AVX-512 with BF16), bundled model (trained and saved in
bfloat16), one thread, `sinkstream stream` over 35,129 tokens of held-out books: 293 tok/s in
float32, 427 in bfloat16, perplexity 27.022 vs 27.031 (benchmarks/DECISIONS.md). LCKV ingestion is
compute-bound there (the cyclic block runs m+b times per chunk) and bfloat16 matrix products run at
about twice the float32 rate on such CPUs. Without native bfloat16 (no `avx512_bf16` / `amx_bf16`
CPU flag) it would be emulated and slower, so float32 stays; so it does for checkpoints saved in
float32, and `--dtype` or a GPU decide otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU flags (Linux /proc/cpuinfo) include a native bfloat16 instruction set."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: not known, so no
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def checkpoint_dtype(model_dir: Path) -> str | None:
    """The dtype the checkpoint's config.json says its weights were saved in (None: not said)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = config.get("torch_dtype", config.get("dtype")) if isinstance(config, dict) else None
    return dtype if isinstance(dtype, str) else None


def auto_cpu_dtype(model_dir: Path, *, cpuinfo: str | None = None) -> str | None:
    """'bfloat16' for a bfloat16 checkpoint on a CPU with native bfloat16, else None (the runtime's
    float32)."""
    if checkpoint_dtype(model_dir) == "bfloat16" and cpu_has_native_bf16(cpuinfo):
        return "bfloat16"
    return None


def configure_dtype(args: argparse.Namespace, model_dir: Path) -> str:
    """Fill in args.dtype when neither --dtype nor a GPU decides; returns a note for --verbose."""
    import torch

    if getattr(args, "dtype", None) is not None:
        return "--dtype"
    device = getattr(args, "device", None)
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if not on_cpu:
        return "the device's default"
    args.dtype = auto_cpu_dtype(model_dir)
    return "automatic: bfloat16 checkpoint, native bfloat16 CPU" if args.dtype else "automatic"
