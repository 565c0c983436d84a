"""The engine's steps captured as CUDA graphs on the shared cache, one per batch-size bucket.

A bucket of b rows (1, 2, 4, ... up to the engine's row count) is captured once and replayed for
whichever rows are in the batch: the rows go into a static index buffer, padded with the engine's
scratch row, whose contents nobody reads. So admitting a stream captures nothing.
- Decode steps: one graph per bucket and set of sampling features (`RowSampling.features`: a greedy
  batch skips the sort); sampling, the step and the logits store replay as one graph.
- Full prompt chunks (n = the engine's chunk; for LCKV all m+b passes): one graph per bucket and
  per "every position's logits" flag.
tests/test_engine_cuda.py shows the replays equal the eager steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

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
    """`fn(rows, *inputs)` captured with static rows [size] (all the scratch row, or row 0 for a
    one-row engine, while capturing) and static inputs."""

    def __init__(self, engine: "Engine", size: int, fn: Callable, inputs: list[torch.Tensor], pool):
        device = engine.device
        filler = engine.scratch if engine.scratch is not None else 0
        self.rows = torch.full((size,), filler, dtype=torch.long, device=device)
        self.inputs = inputs
        # Warm-up and capture run the step on the filler row; for a one-row engine that is the live
        # row, so its state is saved first and put back after.
        saved = _row_state(engine, filler)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation must not be captured
                fn(self.rows, *inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(self.rows, *inputs)
        _put_row_state(engine, filler, saved)

    def __call__(self, rows: list[int], scratch: int | None, *inputs: torch.Tensor) -> torch.Tensor:
        padded = rows + [scratch] * (self.rows.numel() - len(rows))
        self.rows.copy_(torch.tensor(padded, dtype=torch.long))
        for static, given in zip(self.inputs, inputs):
            static[: given.shape[0]].copy_(given)
        self.graph.replay()
        return self.output[: len(rows)]


def _row_views(engine: "Engine", row: int) -> list[torch.Tensor]:
    """Views of everything a step writes for one row: cache, lengths, logits, sampling state."""
    cache, sampling = engine.cache, engine.sampling
    views = [cache.lengths[row], engine.next_logits[row], sampling.counters[row], sampling.ring[row],
             sampling.head[row]]
    views += [t[row] for t in (*cache.keys.values(), *cache.values.values())]
    if sampling.counts is not None:
        views.append(sampling.counts[row])
    return views


def _row_state(engine: "Engine", row: int) -> list[torch.Tensor]:
    return [view.clone() for view in _row_views(engine, row)]


def _put_row_state(engine: "Engine", row: int, saved: list[torch.Tensor]) -> None:
    for view, value in zip(_row_views(engine, row), saved):
        view.copy_(value)


class StepGraphs:
    """Replays the engine's decode steps and full prompt chunks from graphs of the next bucket up."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.sizes = buckets(engine.rows)
        self._graphs: dict[tuple, _Graph] = {}
        # One memory pool for every graph's temporaries: safe because replays never overlap and a
        # replay's output is read (or copied) before the next one. Separate pools would each hold
        # their own temporaries ([k, V] sampling buffers, attention inputs): 75 GiB at 1,024 rows.
        self.pool = torch.cuda.graph_pool_handle()

    def __len__(self) -> int:
        """How many graphs are captured."""
        return len(self._graphs)

    def _bucket(self, k: int) -> int:
        return next(b for b in self.sizes if b >= k)

    def decode(self, rows: list[int], features) -> torch.Tensor:
        """Sampled ids [k] of a decode step of `rows` (see Engine.decode_rows)."""
        return self._decode_graph(self._bucket(len(rows)), features)(rows, self.engine.scratch)

    def prefill(self, rows: list[int], ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """Logits [k, chunk or 1, V] of a full chunk ids [k, chunk] of `rows` (see Engine.prefill_rows).
        A view of the graph's output: read it before the next replay."""
        return self._prefill_graph(self._bucket(len(rows)), all_logits)(rows, self.engine.scratch, ids)

    def _prefill_graph(self, size: int, all_logits: bool) -> _Graph:
        # A graph captured before the penalty counts existed does not update them: the key says so.
        key = ("prefill", size, all_logits, self.engine.sampling.has_counts)
        graph = self._graphs.get(key)
        if graph is None:
            engine = self.engine
            static = torch.zeros(size, engine.chunk, dtype=torch.long, device=engine.device)
            graph = self._graphs[key] = _Graph(
                engine, size, lambda rows, ids: engine.prefill_rows(rows, ids, all_logits), [static], self.pool)
        return graph

    def capture_prefill(self, all_logits: bool = False) -> None:
        """Capture the full-chunk graphs of every bucket a step can use (at most prefill_budget // chunk
        chunks run in one step)."""
        engine = self.engine
        most = max(1, engine.prefill_budget // engine.chunk)
        for size in reversed([b for b in self.sizes if b <= self._bucket(min(most, engine.rows))]):
            self._prefill_graph(size, all_logits)

    def capture_decode(self, features) -> None:
        """Capture every decode bucket now (e.g. at server start), so no request waits for a capture.
        Largest first: the shared pool is sized once and smaller buckets fit in its blocks."""
        for size in reversed(self.sizes):
            self._decode_graph(size, features)

    def _decode_graph(self, size: int, features) -> _Graph:
        key = ("decode", size, features, self.engine.sampling.has_counts)
        graph = self._graphs.get(key)
        if graph is None:
            engine = self.engine
            graph = self._graphs[key] = _Graph(
                engine, size, lambda rows: engine.decode_rows(rows, features), [], self.pool)
        return graph
