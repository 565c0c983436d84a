"""The engine's decode step captured as CUDA graphs, one per batch-size bucket, on the shared cache.

A bucket of b rows (1, 2, 4, ... up to the engine's row count) is captured once per set of sampling
features (`RowSampling.features`: greedy batches skip the sort) and replayed for whichever rows are
in the batch: the rows go into a static index buffer, padded with the engine's scratch row, whose
contents nobody reads. So admitting a stream captures nothing. tests/test_engine_cuda.py shows the
replays equal the eager step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import Engine


def buckets(rows: int) -> list[int]:
    """1, 2, 4, ... and `rows` itself: the batch sizes a graph is captured for."""
    sizes, b = [], 1
    while b < rows:
        sizes.append(b)
        b *= 2
    return sizes + [rows]


class _Graph:
    def __init__(self, engine: "Engine", size: int, features, pool):
        device = engine.device
        self.rows = torch.full((size,), engine.scratch, dtype=torch.long, device=device)  # static input

        def step():
            return engine.decode_rows(self.rows, features)

        # Warm up on a side stream (lazy initialisation must not be captured). With every index on the
        # scratch row, warm-up and capture touch only that row.
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.tokens = step()  # [size] static output

    def __call__(self, rows: list[int], scratch: int) -> torch.Tensor:
        padded = rows + [scratch] * (self.rows.numel() - len(rows))
        self.rows.copy_(torch.tensor(padded, dtype=torch.long), non_blocking=False)
        self.graph.replay()
        return self.tokens[: len(rows)]


class DecodeGraphs:
    """Replays the engine's decode step for any set of rows from a graph of the next bucket up."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.sizes = buckets(engine.rows)
        self._graphs: dict[tuple[int, object, bool], _Graph] = {}
        # One memory pool for every bucket's temporaries: safe because replays never overlap and
        # a replay's only output (the ids) is read before the next one. Separate pools would each
        # hold their own temporaries ([k, V] sampling buffers, gathered keys): 75 GiB at 1,024 rows.
        self.pool = torch.cuda.graph_pool_handle()

    def decode(self, rows: list[int], features) -> torch.Tensor:
        size = next(b for b in self.sizes if b >= len(rows))
        # A graph captured before the penalty counts existed does not update them: the key says so.
        key = (size, features, self.engine.sampling.has_counts)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = _Graph(self.engine, size, features, self.pool)
        return graph(rows, self.engine.scratch)

    def capture_all(self, features) -> None:
        """Capture every bucket now (e.g. at server start), so no request waits for a capture.
        Largest first: the shared pool is sized once, smaller buckets fit in its blocks."""
        for size in reversed(self.sizes):
            key = (size, features, self.engine.sampling.has_counts)
            if key not in self._graphs:
                self._graphs[key] = _Graph(self.engine, size, features, self.pool)
