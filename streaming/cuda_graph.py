"""Cache steps captured as CUDA graphs (the fast path next to `forward_step`).

A sink-window cache never reallocates and every per-step quantity (write slots, positions, masks) is
computed on the device from the cache's length tensor, so a whole step — all layers (for an LCKV
chunk: all m+b passes of the cyclic block), the cache writes and the length update — replays as one
graph: one launch instead of hundreds. Decode steps (n = 1) and full ingestion chunks (n = chunk)
each get their own graph. tests/test_cuda_graph.py shows replays equal the eager step.
"""

from __future__ import annotations

import torch

from .forward import forward_step


class StepGraph:
    """A captured `forward_step` of n tokens for one model and one fixed-buffer cache."""

    def __init__(self, model, cache, n: int, *, passes: int, all_logits: bool):
        self.cache = cache
        self.ids = torch.zeros(cache.batch, n, dtype=torch.long, device=cache.device)  # static input

        def step():
            return forward_step(model, cache, self.ids, passes=passes, all_logits=all_logits)

        saved = cache.lengths.clone()
        # Warm up on a side stream (lazy initialisation must not be captured). The warm-up writes the
        # slots the next real step overwrites anyway, and the lengths are restored afterwards.
        side = torch.cuda.Stream(device=cache.device)
        side.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
                cache.lengths.copy_(saved)
        torch.cuda.current_stream(cache.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()  # [B, n or 1, V]
        cache.lengths.copy_(saved)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, n] -> logits (a static buffer: read or copy it before the next call)."""
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


def graph_capable(cache) -> bool:
    """Only CUDA caches that never reallocate can be replayed from a graph."""
    return cache.device.type == "cuda" and getattr(cache, "capacity", None) is not None
