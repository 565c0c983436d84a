"""The engine: one sink-window cache whose rows many streams share, advanced by one scheduler loop.

Every stream holds a row of one `SinkWindowCache` allocated once (rows from a free list) and the
row's next-token logits. Each iteration of the loop (`Engine.step`):
- every decoding row samples its next token from its stored logits (per-row settings, on the device:
  `RowSampling`), ingests it in one batched decode step whose rows are addressed in place, and stores
  the new logits; the host reads the sampled ids with one device->host copy and turns them into
  text deltas, stop checks and finish reasons;
- then a bounded budget of prompt tokens goes to the rows still ingesting, one chunk each, round
  robin, chunks of equal length batched into one step; so no live stream waits longer than about
  one chunk, and a cancel takes effect between chunks.

A reply's tokens are in the cache when they are reported (as with a standalone session), so a
finished reply needs no extra step and the stream can be continued. On CUDA the decode step is
replayed from a CUDA graph captured per batch-size bucket on the shared cache (`DecodeGraphs`);
admitting a stream captures nothing. tests/test_engine.py shows batched streams equal streams run
alone.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from cache import SinkWindowCache, check_sink_window
from cache.errors import CacheConfigError

from .engine_graphs import DecodeGraphs
from .errors import InvalidInputError, PoolFullError
from .forward import forward_step, forward_tokens
from .generate import Reply, Response
from .row_sampling import RowSampling
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .runtime import Runtime

# Repetition penalty looks at this many most recent tokens (at most the cache's capacity).
PENALTY_HISTORY = 4096
DEFAULT_CHUNK = 256


@dataclass(eq=False)
class Job:
    """One piece of work on a row: ingest `ids`, then (a reply) generate. See `Engine.submit`."""

    row: int
    ids: list[int]  # tokens to ingest first (the prompt)
    reply: Reply | None  # None: ingest only
    on_logits: Callable | None  # called with (ids of a chunk, its logits [n, V]) after each chunk
    ingested: int = 0  # how many of `ids` are in the cache
    responses: deque = field(default_factory=deque)  # produced, not yet taken by the consumer
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    cancelled: bool = False
    error: BaseException | None = None

    @property
    def prefilling(self) -> bool:
        return self.ingested < len(self.ids)


class _RowView:
    """What a `Reply` asks of its stream: the runtime and the tokens in cache."""

    def __init__(self, engine: "Engine", row: int):
        self.runtime, self._engine, self._row = engine.runtime, engine, row

    def tokens_in_cache(self) -> int:
        return min(self._engine.seen[self._row], self._engine.cache.capacity)


class Engine:
    """`rows` streams' worth of sink-window KV memory, allocated now, and the loop that advances them.

    `prefill_budget`: prompt tokens ingested per iteration at most (at least one chunk); default one
    chunk on CPU, four on CUDA. Thread-safe: any thread may call `step()` (or iterate `responses()`),
    one iteration runs at a time and advances every stream.
    """

    def __init__(self, runtime: "Runtime", rows: int, *, sinks: int = 4, window: int = 1020,
                 chunk: int | None = None, prefill: str = "iterative", prefill_budget: int | None = None):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise InvalidInputError(f"rows must be an integer >= 1, got {rows!r}")
        check_sink_window(sinks, window)
        chunk = min(DEFAULT_CHUNK, window) if chunk is None else chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= window:
            raise CacheConfigError(f"chunk must be an integer in [1, window={window}], got {chunk!r}")
        if prefill not in ("iterative", "sequential"):
            raise InvalidInputError(f"prefill must be 'iterative' or 'sequential', got {prefill!r}")
        config, device = runtime.config, runtime.device
        self.runtime, self.model, self.device = runtime, runtime.model, device
        self.chunk, self.sequential = chunk, prefill == "sequential"
        budget = chunk * (4 if device.type == "cuda" else 1) if prefill_budget is None else prefill_budget
        self.prefill_budget = max(chunk, budget)
        # One row more than asked: the scratch row that pads graph batches (nobody reads it).
        self.rows, self.scratch = rows, rows
        self.cache = SinkWindowCache(config.kv_layers, rows + 1, config.num_key_value_heads, config.head_dim,
                                     sinks=sinks, window=window, dtype=runtime.dtype, device=device)
        self.sampling = RowSampling(rows + 1, config.vocab_size, device=device,
                                    history=min(self.cache.capacity, PENALTY_HISTORY))
        self.next_logits = torch.zeros(rows + 1, config.vocab_size, dtype=torch.float32, device=device)  # [R+1, V]
        self.seen = [0] * (rows + 1)  # tokens each row has ingested (host copy: no device read)
        self._free = list(range(rows))  # a heap: the lowest free row first
        self._open: set[int] = set()
        self._jobs: dict[int, Job] = {}  # live job of each busy row
        self._decoding: dict[Job, None] = {}  # an ordered set
        self._prefilling: deque[Job] = deque()
        self._lock = threading.RLock()
        self.graphs = DecodeGraphs(self) if runtime.cuda_graphs and device.type == "cuda" else None

    # ---- rows --------------------------------------------------------------------------------------

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def open_row(self) -> int:
        """Take a free row, reset completely (PoolFullError when every row is taken)."""
        with self._lock:
            if not self._free:
                raise PoolFullError(f"all {self.rows} rows of the engine are in use; close one first")
            row = heapq.heappop(self._free)
            self._reset_row(row)
            self._open.add(row)
            return row

    def close_row(self, row: int) -> None:
        """Give a row back; its live job, if any, is cancelled first. Idempotent."""
        with self._lock:
            if row not in self._open:
                return
            job = self._jobs.get(row)
            if job is not None:
                self._finish(job, cancelled=True)
            self._open.discard(row)
            self._reset_row(row)
            heapq.heappush(self._free, row)

    def reset_row(self, row: int) -> None:
        """Start a new stream on an open, idle row."""
        with self._lock:
            self._check_idle(row)
            self._reset_row(row)

    def _reset_row(self, row: int) -> None:
        self.cache.reset(row)
        self.sampling.clear(row)
        self.next_logits[row].zero_()
        self.seen[row] = 0

    def _check_idle(self, row: int) -> None:
        if row not in self._open:
            raise InvalidInputError(f"row {row} is not open on this engine")
        if row in self._jobs:
            raise InvalidInputError(f"row {row} already has a job running")

    # ---- work --------------------------------------------------------------------------------------

    def submit(self, row: int, ids: list[int], *, params: SamplingParams | None = None,
               max_new_tokens: int | None = None, stop: list[str] | None = None,
               on_logits: Callable | None = None) -> Job:
        """Queue work on an idle row: ingest `ids` (validated token ids), then, when `params` is given,
        generate a reply with those settings (`max_new_tokens` None = unbounded). `on_logits(ids, logits)`
        sees every ingested chunk's logits [n, V] (for scoring). Nothing runs until `step()`."""
        with self._lock:
            self._check_idle(row)
            ids = list(ids)
            reply = None
            if params is not None:
                if not ids and self.seen[row] == 0:
                    raise InvalidInputError("an empty stream needs a prompt (at least a BOS token) to generate from")
                self.sampling.configure(row, params)
                reply = Reply(_RowView(self, row), prompt_tokens=len(ids), max_new_tokens=max_new_tokens,
                              stop=stop, eos_ids=self.runtime.eos_ids)
            job = Job(row, ids, reply, on_logits)
            self._jobs[row] = job
            if job.prefilling:
                self._prefilling.append(job)
            else:
                self._start_decoding(job)
            return job

    def cancel(self, job: Job) -> None:
        """Stop a job before the next iteration's work (between chunks of a prompt, too)."""
        job.cancelled = True

    def responses(self, job: Job) -> Iterator[Response]:
        """A reply's Responses as they come, driving the loop while waiting (from any thread)."""
        while True:
            with self._lock:
                while not job.responses and not job.finished:
                    self.step()
                if job.error is not None and not job.responses:
                    raise job.error
                if not job.responses:
                    return
                response = job.responses.popleft()
            yield response

    def wait(self, job: Job) -> None:
        """Drive the loop until `job` is finished (its Responses stay queued)."""
        with self._lock:
            while not job.finished:
                self.step()
            if job.error is not None:
                raise job.error

    def step(self) -> bool:
        """One iteration: a decode step of every decoding row, then a budget of prompt chunks.
        Returns whether work is left."""
        with self._lock:
            for job in [j for j in (*self._decoding, *self._prefilling) if j.cancelled]:
                self._finish(job, cancelled=True)
            stepping = list(self._decoding)
            try:
                if self._decoding:
                    self._decode_step()
                if self._prefilling:
                    self._prefill_step()
            except BaseException as exc:  # every job that took part sees the failure
                for job in (*stepping, *self._prefilling):
                    job.error = exc
                    self._finish(job)
                raise
            return bool(self._decoding or self._prefilling)

    # ---- the decode step ---------------------------------------------------------------------------

    def _decode_step(self) -> None:
        jobs = list(self._decoding)
        rows = [job.row for job in jobs]
        features = self.sampling.features(rows)
        with torch.inference_mode():
            if self.graphs is not None:
                tokens = self.graphs.decode(rows, features)
            else:
                tokens = self.decode_rows(torch.tensor(rows, device=self.device), features)
            sampled = tokens.tolist()  # the one device->host copy of the step
        for job, token in zip(jobs, sampled):
            self.seen[job.row] += 1
            job.generated.append(token)
            job.responses.append(job.reply.push(token))
            if not job.reply.finished and not job.reply.wants_token():
                job.responses.append(job.reply.end())
            if job.reply.finished:
                self._finish(job)

    def decode_rows(self, rows: torch.Tensor, features) -> torch.Tensor:
        """Device work of one decode step for rows [k]: sample from the stored logits, ingest the
        tokens in place, store the new logits. Returns the tokens [k]. (Captured by DecodeGraphs.)"""
        tokens = self.sampling.sample(rows, self.next_logits.index_select(0, rows), features=features)
        self.sampling.observe(rows, tokens[:, None])
        logits = forward_step(self.model, self.cache, tokens[:, None], passes=1, all_logits=False, rows=rows)
        self.next_logits.index_copy_(0, rows, logits[:, 0])
        return tokens

    # ---- prompt chunks -----------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        # Round robin: each job in turn gets one chunk until the budget is spent (at least one job).
        budget, served = self.prefill_budget, []
        while self._prefilling and (not served or budget > 0):
            job = self._prefilling[0]
            n = min(self.chunk, len(job.ids) - job.ingested)
            if served and n > budget:
                break
            self._prefilling.popleft()
            served.append((job, n))
            budget -= n
        groups: dict[tuple[int, bool], list[Job]] = {}
        for job, n in served:
            groups.setdefault((n, job.on_logits is not None), []).append(job)
        with torch.inference_mode():
            for (n, all_logits), jobs in groups.items():
                self._ingest_chunk(jobs, n, all_logits)
        for job, _ in served:
            if job.prefilling:
                self._prefilling.append(job)
            elif job.reply is not None:
                self._start_decoding(job)
            else:
                self._finish(job)

    def _ingest_chunk(self, jobs: list[Job], n: int, all_logits: bool) -> None:
        """The next n prompt tokens of every job, as one step of len(jobs) rows."""
        rows = torch.tensor([job.row for job in jobs], device=self.device)
        pieces = [job.ids[job.ingested : job.ingested + n] for job in jobs]
        ids = torch.tensor(pieces, dtype=torch.long, device=self.device)  # [k, n]
        logits = forward_tokens(self.model, self.cache, ids, sequential=self.sequential, all_logits=all_logits,
                                rows=rows)  # [k, n or 1, V]
        self.sampling.observe(rows, ids)
        self.next_logits.index_copy_(0, rows, logits[:, -1])
        for i, (job, piece) in enumerate(zip(jobs, pieces)):
            job.ingested += n
            self.seen[job.row] += n
            if job.on_logits is not None:
                job.on_logits(piece, logits[i])

    # ---- bookkeeping -------------------------------------------------------------------------------

    def _start_decoding(self, job: Job) -> None:
        if job.reply.wants_token():
            self._decoding[job] = None
        else:  # max_new_tokens == 0
            job.responses.append(job.reply.end())
            self._finish(job)

    def _finish(self, job: Job, *, cancelled: bool = False) -> None:
        if job.finished:
            return
        job.finished = True
        job.cancelled = job.cancelled or cancelled
        self._decoding.pop(job, None)
        if job in self._prefilling:
            self._prefilling.remove(job)
        if self._jobs.get(job.row) is job:
            del self._jobs[job.row]
