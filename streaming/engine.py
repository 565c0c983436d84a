"""The engine: one sink-window cache whose rows many streams share, advanced by one scheduler loop.

Every stream holds a row of one `SinkWindowCache` allocated once (rows from a free list) and the
row's next-token logits. Each iteration of the loop (`Engine.step`):
- the jobs submitted since the last iteration join (a submit never waits for a running step: it is
  checked, queued, and admitted here);
- every decoding row samples its next token from its stored logits (per-row settings, on the device:
  `RowSampling`), ingests it in one batched decode step whose rows are addressed in place, and stores
  the new logits; the host reads the sampled ids with one device->host copy and turns them into
  text deltas, stop checks and finish reasons (pipelined: after queuing the next step, whose token
  is taken back for a row whose reply turned out to have ended);
- then a bounded budget of prompt tokens goes to the rows still ingesting, one chunk each, round
  robin, chunks of equal length batched into one step; so no live stream waits longer than about
  one chunk, and a cancel takes effect between chunks.

A reply's tokens are in the cache when they are reported (as with a standalone session), so a
finished reply needs no extra step and the stream can be continued. On CUDA the decode step is
replayed from a CUDA graph captured per batch-size bucket on the shared cache (`StepGraphs`, full
prompt chunks too); admitting a stream captures nothing, and `warm_up` captures every graph a set of
sampling settings needs up front (a server does it at start). tests/test_engine.py shows batched
streams equal streams run alone.
"""

from __future__ import annotations

import heapq
import threading
import time
from contextlib import contextmanager
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from cache import FullCache, SinkWindowCache, check_chunk, check_sink_window

from .engine_graphs import StepGraphs
from .errors import InvalidInputError, PoolFullError
from .forward import forward_step, forward_tokens, runs_as_one_step
from .generate import Reply, Response
from .host_copy import to_device
from .row_sampling import RowSampling
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .runtime import Runtime

# Repetition penalty looks at this many most recent tokens (at most the cache's capacity).
PENALTY_HISTORY = 4096
DEFAULT_CHUNK = 256
# A one-row engine (a standalone session) on CUDA ingests in longer chunks: no other stream waits for
# a chunk to end, and a longer chunk fills the GPU (LCKV w=2 prefill on the H200: 16.9k tok/s at 256,
# 27.0k at 1,024; benchmarks/RESULTS.md).
DEFAULT_CHUNK_ONE_ROW_CUDA = 1024


@dataclass
class StepTimes:
    """Where one `Engine.step` spent its time (host seconds). `decode_s` includes waiting for the
    device to finish the step (the sampled ids are read back); prompt chunks are queued and finish
    on the device during the next step's wait."""
    lock_wait_s: float = 0.0
    admit_s: float = 0.0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    decode_rows: int = 0
    prompt_jobs: int = 0

    def __str__(self) -> str:
        return (f"lock wait {self.lock_wait_s * 1e3:.0f} ms, admission {self.admit_s * 1e3:.0f} ms, decode of "
                f"{self.decode_rows} rows {self.decode_s * 1e3:.0f} ms, prompts of {self.prompt_jobs} jobs "
                f"{self.prefill_s * 1e3:.0f} ms")


@dataclass(eq=False)
class Job:
    """One piece of work on a row: ingest `ids`, then (a reply) generate. See `Engine.submit`."""

    row: int
    ids: list[int]  # tokens to ingest first (the prompt)
    reply: Reply | None  # None: ingest only
    on_logits: Callable | None  # called with each ingested chunk's logits [n, V] (valid during the call)
    params: SamplingParams | None = None  # a reply's settings, given to the row when the job is admitted
    ingested: int = 0  # how many of `ids` are in the cache
    responses: deque = field(default_factory=deque)  # produced, not yet taken by the consumer
    generated: list[int] = field(default_factory=list)
    launched: int = 0  # decode steps queued for this reply (the host reads their ids a step later when pipelined)
    finished: bool = False  # set once its row is consistent (a queued step taken back): readable without the lock
    cancelled: bool = False
    error: BaseException | None = None
    # Called (in the thread that steps the engine) after each step that gave this job Responses or
    # finished it: e.g. wakes an asyncio consumer with loop.call_soon_threadsafe.
    notify: Callable[[], None] | None = None

    @property
    def prefilling(self) -> bool:
        return self.ingested < len(self.ids)


@dataclass(eq=False)
class _Launched:
    """A decode step queued on the device: its jobs in batch order, and its sampled ids on their way
    to the host (`ready`, a CUDA event, marks the copy done; None: already there)."""

    jobs: list[Job]
    ids: torch.Tensor  # [k] long on the host
    ready: torch.cuda.Event | None
    counted: bool = False  # its tokens are accounted in their rows (`Engine._count`)

    def tokens(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.ids.tolist()


class Engine:
    """`rows` streams' worth of sink-window KV memory, allocated now, and the loop that advances them.

    `prefill_budget`: prompt tokens ingested per iteration at most (at least one chunk); default one
    chunk on CPU, four on CUDA. `pipelined`: queue each decode step before reading the previous
    one's ids, so the host's work on them (text, stops) overlaps the device's next step; a row whose
    reply turns out to have ended has its speculative step taken back (cache slot, length, logits,
    sampling state), so what every stream holds and emits equals the plain loop's. None (default): on
    for an engine of several rows on CUDA, where it measured 8-48 % more tokens per second; off on
    CPU (the host computes the step itself). A one-row engine (a standalone session) is never
    pipelined: at batch 1 it measured slower (570 against 611 tok/s) and an LCKV one-row capture
    failed on the H200 (benchmarks/RESULTS.md), so asking for it is an error. Thread-safe: any
    thread may call `step()` (or iterate `responses()`), one iteration runs at a time and advances
    every stream. A step that fails (a callback raising, the device) ends every job that took part
    with the error (`job.error`) and raises it; the rows count every token their caches hold (a
    queued step's included), so their streams can go on.
    """

    def __init__(self, runtime: "Runtime", rows: int, *, sinks: int = 4, window: int = 1020,
                 chunk: int | None = None, prefill: str = "iterative", prefill_budget: int | None = None,
                 unbounded: bool = False, pipelined: bool | None = None):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise InvalidInputError(f"rows must be an integer >= 1, got {rows!r}")
        if pipelined and rows == 1:
            raise InvalidInputError("pipelined steps need an engine of several rows; a one-row engine (a "
                                    "session of its own) is not pipelined")
        default = DEFAULT_CHUNK_ONE_ROW_CUDA if rows == 1 and runtime.device.type == "cuda" else DEFAULT_CHUNK
        if unbounded:
            chunk = default if chunk is None else chunk
            limit = None
        else:
            check_sink_window(sinks, window)
            chunk = min(default, window) if chunk is None else chunk
            limit = window
        check_chunk(chunk, limit)
        if prefill not in ("iterative", "sequential"):
            raise InvalidInputError(f"prefill must be 'iterative' or 'sequential', got {prefill!r}")
        config, device = runtime.config, runtime.device
        self.runtime, self.model, self.device = runtime, runtime.model, device
        self.chunk, self.sequential = chunk, prefill == "sequential"
        budget = chunk * (4 if device.type == "cuda" else 1) if prefill_budget is None else prefill_budget
        self.prefill_budget = max(chunk, budget)
        # Graph batches of k rows replay a bucket of b >= k rows: the b - k others are a scratch row
        # (one row more than asked, nobody reads it). One row needs no padding and no scratch.
        self.rows = rows
        self.scratch = rows if rows > 1 else None
        allocated = rows + (1 if rows > 1 else 0)
        geometry = (config.kv_layers, allocated, config.num_key_value_heads, config.head_dim)
        if unbounded:
            self.cache = FullCache(*geometry, dtype=runtime.dtype, device=device)
        else:
            self.cache = SinkWindowCache(*geometry, sinks=sinks, window=window, dtype=runtime.dtype, device=device)
        self.capacity: int | None = getattr(self.cache, "capacity", None)  # None: unbounded
        self.sampling = RowSampling(allocated, config.vocab_size, device=device,
                                    history=min(self.capacity or PENALTY_HISTORY, PENALTY_HISTORY))
        self.next_logits = torch.zeros(allocated, config.vocab_size, dtype=torch.float32, device=device)  # [R, V]
        self.seen = [0] * allocated  # tokens each row has ingested (host copy: no device read)
        self.pipelined = (device.type == "cuda" and rows > 1) if pipelined is None else bool(pipelined)
        self._launched: _Launched | None = None  # the decode step whose ids the host has not read yet
        if self.pipelined:  # what a decode step overwrites, kept so it can be taken back per row
            self.sampling.pipelined = True
            self._last_step = self.cache.keep_last_step(allocated)
            self._overwritten_logits = torch.zeros_like(self.next_logits)  # [R, V]: the logits it sampled from
        self._free = list(range(rows))  # a heap: the lowest free row first
        # Rows and jobs are registered under a short lock of their own, never held across a step: a
        # submit is queued in the inbox and admitted at the start of the next step, so it never waits
        # for one (a server admitting a burst of replies would otherwise get one per step).
        self._registry = threading.Lock()
        self._open: set[int] = set()
        self._jobs: dict[int, Job] = {}  # live job of each busy row (admitted or in the inbox)
        self._inbox: deque[Job] = deque()
        self._decoding: dict[Job, None] = {}  # an ordered set
        self._prefilling: deque[Job] = deque()
        self._lock = threading.RLock()
        self.last_step = StepTimes()
        self._waiting = 0  # threads queued for the lock through _locked() (see `has_waiters`)
        use_graphs = runtime.cuda_graphs and device.type == "cuda" and self.capacity is not None
        self.graphs = StepGraphs(self) if use_graphs else None

    @contextmanager
    def _locked(self):
        """The engine's lock, taken by an API call: counted, so a loop that steps back to back can
        let it in (`has_waiters`) instead of re-taking the lock first every time."""
        self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._lock.release()

    def warm_up(self, settings: list[SamplingParams]) -> int:
        """Capture now every CUDA graph that steps with these sampling settings will replay (decode
        steps of every bucket, full prompt chunks), so no request waits for a capture later (a
        server calls this at start). Returns how many graphs exist; a no-op without graphs."""
        if self.graphs is None:
            return 0
        with self._locked():
            if any(p.repetition_penalty != 1.0 for p in settings):
                self.sampling.prepare_counts()  # graphs are captured with or without the counts
            with torch.inference_mode():
                self._capture(settings)
            return len(self.graphs)

    def _capture(self, settings: list[SamplingParams]) -> None:
        for features in dict.fromkeys(self.sampling.features_for([p]) for p in settings):
            self.graphs.capture_decode(features)
        self.graphs.capture_prefill()

    def has_waiters(self) -> bool:
        """Whether an API call (submit, cancel's cleanup, open/close a row...) waits for the lock."""
        return self._waiting > 0

    # ---- rows --------------------------------------------------------------------------------------

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def open_row(self) -> int:
        """Take a free row, reset completely (PoolFullError when every row is taken)."""
        with self._locked():
            if not self._free:
                raise PoolFullError(f"all {self.rows} rows of the engine are in use; close one first")
            row = heapq.heappop(self._free)
            self._reset_row(row)
            with self._registry:
                self._open.add(row)
            return row

    def close_row(self, row: int) -> None:
        """Give a row back; its live job, if any, is cancelled first. Idempotent."""
        with self._locked():
            if row not in self._open:
                return
            job = self._jobs.get(row)
            if job is not None:
                self._finish(job, cancelled=True)
            with self._registry:
                self._open.discard(row)
            self._reset_row(row)
            heapq.heappush(self._free, row)

    def reset_row(self, row: int) -> None:
        """Start a new stream on an open, idle row."""
        with self._locked():
            self._check_idle(row)
            self._reset_row(row)

    def _reset_row(self, row: int) -> None:
        self.cache.reset(row)
        self.sampling.clear(row)
        self.next_logits[row].zero_()
        self.seen[row] = 0

    def tokens_in_cache(self, row: int) -> int:
        seen = self.seen[row]
        return seen if self.capacity is None else min(seen, self.capacity)

    def row_bytes(self) -> int:
        """KV bytes of one row (what one stream owns)."""
        return self.cache.nbytes // self.cache.batch

    def _check_idle(self, row: int) -> None:
        if row not in self._open:
            raise InvalidInputError(f"row {row} is not open on this engine")
        if row in self._jobs:
            raise InvalidInputError(f"row {row} already has a job running")

    # ---- work --------------------------------------------------------------------------------------

    def submit(self, row: int, ids: list[int], *, params: SamplingParams | None = None,
               max_new_tokens: int | None = None, stop: list[str] | None = None,
               on_logits: Callable | None = None, notify: Callable[[], None] | None = None) -> Job:
        """Queue work on an idle row: ingest `ids` (validated token ids), then, when `params` is given,
        generate a reply with those settings (`max_new_tokens` None = unbounded). `on_logits(logits)`
        sees every ingested chunk's logits [n, V] (for scoring). Nothing runs until `step()`.

        Never waits for a running step: the job is checked now (bad settings raise here) and admitted
        at the start of the next step."""
        ids = list(ids)
        reply = None
        if params is not None:
            params.validate()  # (the seed's type included)
        with self._registry:
            self._check_idle(row)
            if params is not None:
                if not ids and self.seen[row] == 0:
                    raise InvalidInputError("an empty stream needs a prompt (at least a BOS token) to generate from")
                reply = Reply(self.runtime.tokenizer, lambda: self.tokens_in_cache(row), prompt_tokens=len(ids),
                              max_new_tokens=max_new_tokens, stop=stop, eos_ids=self.runtime.eos_ids)
            job = Job(row, ids, reply, on_logits, params=params, notify=notify)
            self._jobs[row] = job
            self._inbox.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job before the next iteration's work (between chunks of a prompt, too)."""
        job.cancelled = True

    def responses(self, job: Job) -> Iterator[Response]:
        """A reply's Responses as they come, driving the loop while waiting (from any thread)."""
        while True:
            with self._locked():
                while not job.responses and not job.finished:
                    self.step()
                if job.error is not None and not job.responses:
                    raise job.error
                if not job.responses:
                    return
                response = job.responses.popleft()
            yield response

    def wait(self, job: Job, *, raise_error: bool = True) -> None:
        """Drive the loop until `job` is finished (its Responses stay queued)."""
        with self._locked():
            while not job.finished:
                self.step()
            if job.error is not None and raise_error:
                raise job.error

    def step(self) -> bool:
        """One iteration: a decode step of every decoding row, then a budget of prompt chunks.
        Returns whether work is left. Where its time went: `last_step`.

        Pipelined, the decode step is queued first and the previous step's ids are read after it
        (their jobs' Responses come one iteration later)."""
        t0 = time.perf_counter()
        with self._lock:
            times = StepTimes(lock_wait_s=time.perf_counter() - t0)
            self.last_step = times
            t = time.perf_counter()
            admitted = self._admit()
            earlier = self._launched
            waiting = earlier.jobs if earlier is not None else []
            # Cancelled jobs take no new step and finish after the previous step's ids are read: one
            # whose last token was still on its way keeps it (as if the cancel came after that step).
            cancelled = [j for j in (*self._decoding, *self._prefilling) if j.cancelled]
            live = [j for j in (*self._decoding, *self._prefilling) if not j.cancelled]
            stepping = list(dict.fromkeys((*live, *waiting)))
            times.admit_s = time.perf_counter() - t
            launched = None  # this iteration's decode step, once queued (the failure path reads it too)
            try:
                t = time.perf_counter()
                self._launched = None
                launching = [job for job in self._decoding if not job.cancelled and job.reply.may_take(job.launched)]
                times.decode_rows = len(launching)
                launched = self._launch_decode(launching) if launching else None
                if earlier is not None:
                    self._read_decoded(earlier, then=launched)
                if launched is not None:
                    if self.pipelined:
                        self._launched = launched
                    else:
                        self._read_decoded(launched, then=None)
                for job in cancelled:
                    self._finish(job, cancelled=True)
                times.decode_s = time.perf_counter() - t
                times.prompt_jobs = len(self._prefilling)
                if self._prefilling:
                    t = time.perf_counter()
                    self._prefill_step()
                    times.prefill_s = time.perf_counter() - t
            except BaseException as exc:  # every job that took part sees the failure
                self._launched = None
                self._count_unread(earlier, launched)
                for job in stepping:
                    job.error = exc
                    self._finish(job)
                raise
            finally:
                for job in dict.fromkeys((*admitted, *cancelled, *stepping)):
                    if job.notify is not None and (job.responses or job.finished):
                        job.notify()
            return bool(self._decoding or self._prefilling or self._inbox or self._launched)

    def _count_unread(self, *steps: _Launched | None) -> None:
        """After a failed step: the tokens of decode steps whose ids were not read yet are in their
        rows all the same (a queued step included), so they are accounted, and the rows stay
        consistent for the streams' next replies. Their Responses are not made (the jobs end with
        the error). A device that cannot give the ids back any more leaves nothing to account."""
        for step in steps:
            if step is not None and not step.counted:
                try:
                    self._count(step)
                except Exception:
                    return

    def _admit(self) -> list[Job]:
        """Move the jobs submitted since the last step into the schedule (their rows' settings set)."""
        with self._registry:
            submitted = list(self._inbox)
            self._inbox.clear()
        for job in submitted:
            if job.cancelled and not job.finished:
                self._finish(job)
        jobs = [job for job in submitted if not job.finished]  # (closing a row finishes its job too)
        replies = [job for job in jobs if job.params is not None]
        self.sampling.configure_many([job.row for job in replies], [job.params for job in replies])
        for job in jobs:
            if job.prefilling:
                self._prefilling.append(job)
            else:
                self._start_decoding(job)
        return submitted

    # ---- the decode step ---------------------------------------------------------------------------

    def _launch_decode(self, jobs: list[Job]) -> _Launched:
        """Queue one decode step of these jobs' rows; its ids start on their way to the host."""
        rows = [job.row for job in jobs]
        features = self.sampling.features(rows)
        with torch.inference_mode():
            if self.graphs is not None:
                tokens = self.graphs.decode(rows, features)
            else:
                tokens = self.decode_rows(self.index_tensor(rows), features)
            if self.pipelined and tokens.is_cuda:  # the one device->host copy of the step, not waited for
                ids = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                ids.copy_(tokens, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                ids, ready = tokens.cpu(), None
        for job in jobs:
            job.launched += 1
        return _Launched(jobs, ids, ready)

    def _read_decoded(self, step: _Launched, *, then: _Launched | None) -> None:
        """The host's part of a decode step: ids -> Responses, stops, finishes. A job that ends here
        but already has a token in `then` (the step queued after) gets that step taken back, and is
        finished only after that: whoever sees `job.finished` (without the engine's lock) finds its
        row as the reply left it."""
        live = [(job, token) for job, token in zip(step.jobs, self._count(step)) if token is not None]
        ended = []
        for job, token in live:
            job.responses.append(job.reply.push(token))
            if not job.reply.finished and not job.reply.wants_token():
                job.responses.append(job.reply.end())
            if job.reply.finished:
                ended.append(job)
        if then is not None and ended:
            position = {job: i for i, job in enumerate(then.jobs)}
            undo = [job for job in ended if job in position]
            if undo:
                self._take_back([position[job] for job in undo], undo)
        for job in ended:
            self._finish(job)

    def _count(self, step: _Launched) -> list[int | None]:
        """Account a decode step's tokens in their rows (`seen`, `job.generated`), before anything
        that may fail works on them, so a row's count always matches its cache. Returns the tokens,
        None for a job whose row was closed meanwhile (and reset after this step). Once per step."""
        tokens = step.tokens()
        step.counted = True
        for i, (job, token) in enumerate(zip(step.jobs, tokens)):
            if job.finished:
                tokens[i] = None
                continue
            self.seen[job.row] += 1
            job.generated.append(token)
        return tokens

    def index_tensor(self, values: list) -> torch.Tensor:
        """A long tensor (of a list, or a list of equal-length lists) on the engine's device; pipelined,
        queued behind the steps on the device instead of waiting for them (`streaming.host_copy`)."""
        return to_device(values, torch.long, self.device, without_waiting=self.pipelined)

    def _take_back(self, positions: list[int], jobs: list[Job]) -> None:
        """Undo the queued decode step for these jobs, at these positions of its batch."""
        index, rows = self.index_tensor(positions), self.index_tensor([job.row for job in jobs])
        with torch.inference_mode():
            self._last_step.take_back(index, rows)
            self.sampling.take_back(index, rows)
            self.next_logits.index_copy_(0, rows, self._overwritten_logits.index_select(0, index))
        for job in jobs:
            job.launched -= 1

    def decode_rows(self, rows: torch.Tensor, features) -> torch.Tensor:
        """Device work of one decode step for rows [k]: sample from the stored logits, ingest the
        tokens in place, store the new logits. Returns the tokens [k]. (Captured by StepGraphs.)"""
        # Pipelined, the logits sampled from are gathered into the kept buffer (for a take-back).
        kept = self._overwritten_logits[: rows.shape[0]] if self.pipelined else None
        fused = self.sampling.fuses_greedy(features)
        if fused and not self.pipelined:  # reads the stored logits by row: no gathered copy
            tokens = self.sampling.greedy_step(rows, self.next_logits, by_row=True)
        else:
            current = torch.index_select(self.next_logits, 0, rows, out=kept)  # [k, V]
            tokens = (self.sampling.greedy_step(rows, current) if fused
                      else self.sampling.sample(rows, current, features=features))
            if not fused:
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
        # One step per (length, logits wanted), and apart the rows an LCKV chunk within the passes
        # would evict on (run token by token, see _ingest_chunk), so the others replay one graph.
        groups: dict[tuple[int, bool, bool], list[Job]] = {}
        for job, n in served:
            apart = not runs_as_one_step(self.model.config, n, sequential=self.sequential) and self._evicts([job.row], n)
            groups.setdefault((n, job.on_logits is not None, apart), []).append(job)
        with torch.inference_mode():
            for (n, all_logits, _), jobs in groups.items():
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
        rows = [job.row for job in jobs]
        ids = self.index_tensor([job.ids[job.ingested : job.ingested + n] for job in jobs])  # [k, n]
        one_step = runs_as_one_step(self.model.config, n, sequential=self.sequential)
        length = self._padded_length(n, all_logits)
        if self.graphs is not None and n == self.chunk and one_step:
            logits = self.graphs.prefill(rows, ids, all_logits)
        elif length is not None and (one_step or not self._evicts(rows, n)):
            logits = self.graphs.prefill_padded(rows, ids, length)  # [k, 1, V]
            self.sampling.observe(self.index_tensor(rows), ids)  # (the real ids only)
        elif length is not None:
            # An LCKV chunk within the prefill passes runs token by token (forward_tokens); where it
            # evicts, one padded step would not equal that (its first tokens would miss the evicted
            # ones), so: a replay of the one-token graph per token, the same steps as the eager path.
            logits = self.graphs.prefill_tokens(rows, ids)
            self.sampling.observe(self.index_tensor(rows), ids)
        else:
            logits = self.prefill_rows(self.index_tensor(rows), ids, all_logits)  # [k, n or 1, V]
        for job in jobs:  # counted first: a callback that raises leaves every row's count right
            job.ingested += n
            self.seen[job.row] += n
        for i, job in enumerate(jobs):
            if job.on_logits is not None:
                job.on_logits(logits[i])

    def _evicts(self, rows: list[int], n: int) -> bool:
        """Whether n more tokens push any of `rows` past its window's capacity."""
        return self.capacity is not None and any(self.seen[row] + n > self.capacity for row in rows)

    def _padded_length(self, n: int, all_logits: bool) -> int | None:
        """The captured length to which a short chunk of n tokens is padded, or None: run it as it is.
        On any row (the padding writes nothing: a wrapped window loses no token to it); not where
        every position's logits are wanted, nor in sequential mode."""
        if self.graphs is None or all_logits or self.sequential or n >= self.chunk:
            return None
        return self.graphs.padded_length(n)

    def prefill_rows_padded(self, rows: torch.Tensor, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Device work of a short chunk padded to a captured length: ids [k, L] of which the first
        `real` ([1] long) are the prompt's, the rest padding. Ingests, stores the last real token's
        logits and returns them [k, 1, V]. The repetition penalty's record of the real ids is the
        caller's (its ring would take the padding too). (Captured by StepGraphs.)"""
        logits = forward_step(self.model, self.cache, ids, passes=self.model.config.prefill_passes,
                              all_logits=False, rows=rows, real=real)  # (one token runs one pass anyway)
        self.next_logits.index_copy_(0, rows, logits[:, 0])
        return logits

    def prefill_rows(self, rows: torch.Tensor, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """Device work of one prompt chunk ids [k, n] for rows [k]: ingest, record the ids for the
        repetition penalty, store the last position's logits. Returns logits [k, n or 1, V].
        (Captured by StepGraphs for full chunks.)"""
        logits = forward_tokens(self.model, self.cache, ids, sequential=self.sequential, all_logits=all_logits,
                                rows=rows)
        self.sampling.observe(rows, ids)
        self.next_logits.index_copy_(0, rows, logits[:, -1])
        return logits

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
        with self._registry:
            if self._jobs.get(job.row) is job:
                del self._jobs[job.row]
