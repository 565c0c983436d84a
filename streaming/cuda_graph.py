"""The one-token decode step captured as a CUDA graph (the fast path next to `forward_step`).

A sink-window cache never reallocates and every per-step quantity (write slot, positions, masks) is
computed on the device from the cache's length tensor, so the whole step — all layers, the cache
write and the length update — replays as one graph: one launch per token instead of hundreds.
tests/test_cuda_graph.py shows replay and the eager step give the same logits and cache contents.
"""

from __future__ import annotations

import torch

from .forward import forward_step


class DecodeGraph:
    """A captured decode step for one model and one fixed-buffer cache (all rows step together)."""

    def __init__(self, model, cache):
        self.cache = cache
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.device)  # static input
        saved = cache.lengths.clone()
        # Warm up on a side stream (lazy initialisation must not be captured). The warm-up writes the
        # slot the next real token overwrites anyway, and the lengths are restored afterwards.
        side = torch.cuda.Stream(device=cache.device)
        side.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                forward_step(model, cache, self.ids, passes=1, all_logits=False)
                cache.lengths.copy_(saved)
        torch.cuda.current_stream(cache.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = forward_step(model, cache, self.ids, passes=1, all_logits=False)  # [B, 1, V]
        cache.lengths.copy_(saved)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, 1] -> logits [B, 1, V] (a static buffer: read or copy it before the next call)."""
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


def graph_capable(cache) -> bool:
    """Only CUDA caches that never reallocate can be replayed from a graph."""
    return cache.device.type == "cuda" and getattr(cache, "capacity", None) is not None
