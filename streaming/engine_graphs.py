"""The engine's steps captured as CUDA graphs on the shared cache, one per batch-size bucket.

A bucket of b rows (1, 2, 4, ... up to the engine's row count) is captured once and replayed for
whichever rows are in the batch: the rows go into a static index buffer, padded with the engine's
scratch row, whose contents nobody reads. So admitting a stream captures nothing.
- Decode steps: one graph per bucket and set of sampling features (`RowSampling.features`: a greedy
  batch skips the sort); sampling, the step and the logits store replay as one graph.
- Full prompt chunks (n = the engine's chunk; for LCKV all m+b passes): one graph per bucket and
  per "every position's logits" flag.
- Short prompt chunks (a chat turn, a prompt's last piece): padded to the next of a few lengths
  (16, 32, 64, 128, ... below the chunk, and the chunk) and replayed with the real token count as an input
  (`forward_step`'s `real`; the padding writes nothing, so this holds on a wrapped window too).
  Eagerly, each short chunk of a new length was hundreds of kernel launches, each one giving up the
  GIL: in a server whose asyncio thread is busy with a thousand websockets, winning it back each
  time made such steps 4x longer. (An LCKV chunk within the m+b passes that evicts runs token by
  token, as the eager path does: one replay of a one-token graph per token.)
tests/test_engine_cuda.py shows the replays equal the eager steps.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Callable

import torch

from .forward import runs_as_one_step
from .host_copy import host_tensor

if TYPE_CHECKING:
    from .engine import Engine


def buckets(rows: int) -> list[int]:
    """1, 2, 4, ... and `rows` itself: the batch sizes a graph is captured for."""
    sizes, b = [], 1
    while b < rows:
        sizes.append(b)
        b *= 2
    return sizes + [rows]


SHORTEST_PADDED = 16  # the first padded length; each next one is twice as long, all below the chunk
MOST_PADDED_ROWS = 256  # a larger group of short chunks replays in pieces of this many rows


def padded_lengths(engine: "Engine") -> list[int]:
    """The lengths short chunks are padded to: 16, 32, ... below the chunk, then the chunk itself
    (a long prompt's tail), each long enough to run as one step (an LCKV chunk within the m+b
    prefill passes would run token by token)."""
    lengths, length = [], SHORTEST_PADDED
    while length < engine.chunk:
        lengths.append(length)
        length *= 2
    if engine.chunk >= SHORTEST_PADDED:
        lengths.append(engine.chunk)
    return [n for n in lengths if runs_as_one_step(engine.model.config, n, sequential=False)]



class _Graph:
    """`fn(rows, *inputs)` captured with static rows [size] (all the scratch row, or row 0 for a
    one-row engine, while capturing) and static inputs."""

    def __init__(self, engine: "Engine", size: int, fn: Callable, inputs: list[torch.Tensor], pool):
        device = engine.device
        filler = engine.scratch if engine.scratch is not None else 0
        self.rows = torch.full((size,), filler, dtype=torch.long, device=device)
        self._held = [filler] * size  # what self.rows holds: a replay for the same rows copies nothing
        self.inputs = inputs
        self.pinned = engine.pipelined
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
        # No garbage collection inside the capture: torch no longer collects before one, so a dead
        # engine (its graphs and pinned blocks held in a reference cycle) could be freed in the middle
        # of it, and freeing them makes CUDA calls a capture does not allow.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(self.graph, pool=pool):
                self.output = fn(self.rows, *inputs)
        finally:
            if collecting:
                gc.enable()
        _put_row_state(engine, filler, saved)

    def __call__(self, rows: list[int], scratch: int | None, *inputs: torch.Tensor) -> torch.Tensor:
        padded = rows + [scratch] * (self.rows.numel() - len(rows))
        if padded != self._held:  # (a one-row engine's graphs always replay row 0: no copy per token)
            # Pipelined: queued behind the steps on the device, not waiting for them (streaming.host_copy).
            self.rows.copy_(host_tensor(padded, torch.long, pinned=self.pinned), non_blocking=self.pinned)
            self._held = padded
        for static, given in zip(self.inputs, inputs):
            static[: given.shape[0]].copy_(given, non_blocking=self.pinned)
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
        self.padded_lengths = padded_lengths(engine)
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
        chunks run in one step), and the padded short-chunk graphs."""
        engine = self.engine
        most = max(1, engine.prefill_budget // engine.chunk)
        for size in reversed([b for b in self.sizes if b <= self._bucket(min(most, engine.rows))]):
            self._prefill_graph(size, all_logits)
        if all_logits:
            return
        for length in self.padded_lengths:
            shorter = [n for n in self.padded_lengths if n < length]
            shortest = shorter[-1] + 1 if shorter else 1  # the shortest chunk padded to `length`
            most = min(engine.prefill_budget // shortest, MOST_PADDED_ROWS, engine.rows)
            for size in reversed([b for b in self.sizes if b <= self._bucket(max(1, most))]):
                self._padded_graph(size, length)
        if engine.model.config.is_condensed:  # (prefill_tokens)
            most = min(engine.prefill_budget, MOST_PADDED_ROWS, engine.rows)
            for size in reversed([b for b in self.sizes if b <= self._bucket(max(1, most))]):
                self._padded_graph(size, 1)

    def padded_length(self, n: int) -> int | None:
        """The shortest padded length that holds n tokens (None: none does)."""
        return next((length for length in self.padded_lengths if length >= n), None)

    def prefill_padded(self, rows: list[int], ids: torch.Tensor, length: int) -> torch.Tensor:
        """Logits [k, 1, V] of the last token of a short chunk ids [k, n], n <= length, of `rows`,
        replayed padded to `length` (see Engine.prefill_rows_padded), in pieces of at most
        MOST_PADDED_ROWS rows. A fresh tensor (not a view of the graph's output)."""
        k, n = ids.shape
        padded = torch.zeros(k, length, dtype=torch.long, device=ids.device)  # padding: token 0
        padded[:, :n] = ids
        real = host_tensor([n], torch.long, pinned=self.engine.pipelined)
        pieces = []
        for lo in range(0, k, MOST_PADDED_ROWS):
            part = rows[lo : lo + MOST_PADDED_ROWS]
            graph = self._padded_graph(self._bucket(len(part)), length)
            pieces.append(graph(part, self.engine.scratch, padded[lo : lo + len(part)], real).clone())
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def prefill_tokens(self, rows: list[int], ids: torch.Tensor) -> torch.Tensor:
        """Logits [k, 1, V] of the last token of a short chunk ids [k, n] of `rows`, ingested token by
        token, one replay of the one-token graph each (Engine._ingest_chunk says when). A fresh tensor."""
        logits = None
        for i in range(ids.shape[1]):
            logits = self.prefill_padded(rows, ids[:, i : i + 1], 1)
        return logits

    def _padded_graph(self, size: int, length: int) -> _Graph:
        key = ("padded", size, length)
        graph = self._graphs.get(key)
        if graph is None:
            engine = self.engine
            ids = torch.zeros(size, length, dtype=torch.long, device=engine.device)
            real = torch.full((1,), length, dtype=torch.long, device=engine.device)
            graph = self._graphs[key] = _Graph(engine, size, engine.prefill_rows_padded, [ids, real], self.pool)
        return graph

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
