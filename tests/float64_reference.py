"""A checkpoint in float64 on CPU: the reference that float32 paths (GPU kernels, the plain path) are
measured against where a model amplifies rounding too much for two float32 paths to agree closely
(LCKV: benchmarks/DECISIONS.md, "Numerics")."""

from __future__ import annotations

import torch


def float64_runtime(path):
    """The checkpoint at `path` loaded on CPU with float64 weights (the stored values, widened)."""
    import streaming

    rt = streaming.load(path, device="cpu", dtype="float32")
    for layer in rt.model.model.layers:  # re-stack the q/k/v and gate/up weights after the conversion
        layer._stacked = None
    rt.model.double()
    rt.model.stack_weights()
    return rt


def float64_engine(rt, rows: int, **kwargs):
    """An engine of a `float64_runtime` whose cache is float64 too."""
    from streaming.engine import Engine

    engine = Engine(rt, rows, **kwargs)
    cache = engine.cache
    for layer in cache.keys:
        cache.keys[layer] = cache.keys[layer].double()
        cache.values[layer] = cache.values[layer].double()
    cache.dtype = torch.float64
    return engine
