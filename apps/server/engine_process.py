"""The server's model side in a process of its own (`ServerConfig.engine_process`; the default on GPUs).

Why: in one process the stepping thread and the asyncio thread that serves every websocket share one
GIL. Each torch call of a step gives the GIL up and must win it back from a thread that frames a JSON
event per stream per step, so with 1,000 streams a step that makes a dozen small calls took 250 ms of
wall time for 27 ms of its own CPU (benchmarks/DECISIONS.md). Here the engine steps in a process whose
only other threads are idle most of the time (apps/server/engine_child.py), and the server process
keeps the websockets, the sessions' transcripts and --state-dir.

`EngineProcess` has the same calls as `LocalEngine` (apps/server/engine_local.py), so the server is
written once. A job's Responses arrive in `RemoteJob.responses` from the reader thread, one message
per engine step; when the engine process dies every running reply fails with `EngineProcessError`
and every later call raises it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from apps.server.engine_loop import set_all
from apps.server.engine_spec import EngineSettings, ModelSource, PackedState, pack_state
from streaming.generate import Response
from streaming.tokenizer import Tokenizer

log = logging.getLogger("sinkstream.server")


# In calls of at most SNAPSHOT_BATCH sessions: one answer holding a thousand states (hundreds of MB)
# took longer to pickle, send and read than a thousand small ones, and held the reader thread.
SNAPSHOT_BATCH = 64
CALL_BATCH = 256  # calls per op_many message at most (see EngineProcess._acall)


class EngineProcessError(RuntimeError):
    """The engine process failed to start, or stopped."""


@dataclass(eq=False)
class RemoteJob:
    """The server's view of a job in the engine process (the fields the server reads of an engine Job)."""
    id: int
    ready: asyncio.Event | None = None
    responses: deque = field(default_factory=deque)
    finished: bool = False
    cancelled: bool = False
    error: BaseException | None = None


@dataclass(eq=False)
class RemoteReply:
    job: RemoteJob


class EngineProcess:
    """Starts the engine process and speaks to it; see the module docstring."""

    def __init__(self, source: ModelSource, settings: EngineSettings, *, log_level: int | None = None,
                 on_death: Callable[[str], None] | None = None) -> None:
        self.source, self.settings = source, settings
        self.log_level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        self.on_death = on_death
        self.info: dict = {}
        self.tokenizer = None
        self.dead: str | None = None  # why, once the process is gone
        self.stats: dict = {}
        self.process = None
        self._conn = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls = itertools.count(1)
        self._job_ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._snapshots = _PerIteration(functools.partial(self._send_coalesced, "snapshot_many"), SNAPSHOT_BATCH)
        self._calls_now = _PerIteration(functools.partial(self._send_coalesced, "many"), CALL_BATCH)
        self._jobs: dict[int, RemoteJob] = {}
        self._lock = threading.Lock()  # sends, the pending calls and the jobs
        self._stopping = False
        self._reader: threading.Thread | None = None

    # ---- lifecycle ----

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # A fresh interpreter (CUDA cannot be forked into), started as a module rather than with
        # multiprocessing's spawn, which would run the embedding program's __main__ again in it.
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])  # (where `apps` is, as for this process)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *(p for p in sys.path if p)])}
        with theirs:
            self.process = subprocess.Popen([sys.executable, "-m", "apps.server.engine_child", str(theirs.fileno())],
                                            pass_fds=[theirs.fileno()], env=env)
        self._conn = Connection(ours.detach())
        self._conn.send((self.source, self.settings, self.log_level))
        try:
            first = await asyncio.to_thread(self._conn.recv)
        except (EOFError, OSError):
            code = await asyncio.to_thread(self.process.wait)
            raise EngineProcessError(f"the engine process exited while starting (exit code {code})") from None
        if first[0] == "fatal":
            await asyncio.to_thread(self.process.wait)
            raise EngineProcessError(f"the engine process could not start: {first[1]}")
        self.info = first[1]
        # Prompt lengths are counted here, not in the engine process (its threads step the engine).
        self.tokenizer = await asyncio.to_thread(Tokenizer.from_dir, self.info["path"])
        self._reader = threading.Thread(target=self._read, name="sinkstream-engine-reader", daemon=True)
        self._reader.start()

    async def stop(self) -> None:
        self._stopping = True
        if self.process is None:
            return
        try:
            with self._lock:
                self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        try:
            await asyncio.to_thread(self.process.wait, 60)
        except subprocess.TimeoutExpired:
            log.error("the engine process did not stop in 60 s; killing it")
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 10)
        self._conn.close()

    def run(self) -> None:
        """(The engine process steps from its start.)"""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def graphs(self) -> int:
        return self.info.get("graphs", 0)

    @property
    def has_tokenizer(self) -> bool:
        return self.info.get("has_tokenizer", False)

    # ---- calls ----

    def call(self, op: str, *args) -> Future:
        """Queue a call in the engine process (any thread); its result as a concurrent Future."""
        future: Future = Future()
        with self._lock:
            if self.dead is not None:
                future.set_running_or_notify_cancel()
                future.set_exception(EngineProcessError(self.dead))
                return future
            call_id = next(self._calls)
            self._pending[call_id] = future
            try:
                self._conn.send(("call", call_id, op, args))
            except (OSError, ValueError) as exc:
                self._pending.pop(call_id, None)
                future.set_running_or_notify_cancel()
                future.set_exception(EngineProcessError(f"the engine process is gone ({exc})"))
        return future

    async def _acall(self, op: str, *args):
        """A call from the event loop. The calls made in one loop iteration (a thousand replies
        beginning or ending in the same step) cross as one message, answered by one (op_many), in
        their order: not a send, an answer and a wake-up of the loop per call, which made a burst of
        endings hold the loop for tens of ms while other streams waited."""
        return await self._calls_now.ask((op, args))

    async def open_row(self) -> int:
        return await self._acall("open")

    async def release(self, handle: int) -> None:
        if self.dead is None:  # (a dead process's rows went with it)
            await self._acall("release", handle)

    async def snapshot(self, handle: int) -> PackedState:
        """The session's state, as the bytes of its file (the server writes or parks it as it is).
        Snapshots asked for in the same event-loop iteration (a thousand replies ending in one step,
        each saving its session) cross as one call whose device reads the engine process shares
        (op_snapshot_many)."""
        return PackedState(await self._snapshots.ask(handle))

    def _send_coalesced(self, op: str, items: list, futures: list[asyncio.Future]) -> None:
        """One call `op(items)` answering [(ok, value)] per item; each future gets its pair (all
        (False, error) when the call itself fails), set on this event loop in one callback."""

        def answered(call: Future) -> None:
            error = call.exception() if not call.cancelled() else EngineProcessError("the call was cancelled")
            results = [(False, error)] * len(futures) if error is not None else call.result()
            for future, result in zip(futures, results):
                if not future.done():
                    future.set_result(result)

        loop = asyncio.get_running_loop()

        def from_any_thread(call: Future) -> None:  # (the reader thread answers calls)
            try:
                loop.call_soon_threadsafe(answered, call)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        self.call(op, items).add_done_callback(from_any_thread)

    async def restore(self, handle: int, state: "tuple[dict, dict, dict] | PackedState") -> None:
        # Alone, not in a loop iteration's batch: a packed state is megabytes (see SNAPSHOT_BATCH).
        # (Packing runs off the event loop; a snapshot of this engine is packed already.)
        packed = state.blob if isinstance(state, PackedState) else await asyncio.to_thread(pack_state, state)
        await asyncio.wrap_future(self.call("restore", handle, packed))

    def check_saved(self, tensors: dict, meta: dict, extra: dict) -> None:
        """Raises unless a saved state fits the engine's model and cache (blocks: call from a worker thread)."""
        self.call("check_saved", pack_state((tensors, meta, extra))).result()

    async def begin_chat(self, handle: int, history: list[dict], kw: dict, ready: asyncio.Event) -> RemoteReply:
        job = RemoteJob(next(self._job_ids), ready)
        with self._lock:
            self._jobs[job.id] = job
        try:
            await self._acall("begin_chat", job.id, handle, history, kw)
        except BaseException:
            with self._lock:
                self._jobs.pop(job.id, None)
            raise
        return RemoteReply(job)

    async def end(self, reply: RemoteReply):
        """Finish a reply (records the chat turn); the session's stats after it (one call), None when
        the engine process is gone (its replies ended with it)."""
        try:
            return await self._acall("end", reply.job.id) if self.dead is None else None
        except EngineProcessError:  # (it died during the call)
            return None
        finally:
            with self._lock:
                self._jobs.pop(reply.job.id, None)

    def cancel(self, job: RemoteJob) -> None:
        """Stop a job before the engine's next step (does not wait)."""
        self._calls_now.send()  # calls made before it go first (its begin_chat among them)
        with self._lock:
            if self.dead is None:
                try:
                    self._conn.send(("cancel", job.id))
                except (OSError, ValueError):
                    pass

    async def session_stats(self, handle: int):
        return await self._acall("session_stats", handle)

    async def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text)
        return len(await asyncio.to_thread(self.tokenizer.encode, text))

    def step_stats(self) -> dict | None:
        """The stepping thread's statistics as last reported (every half second while it steps)."""
        return self.stats or None

    async def current_stats(self) -> dict:
        """The stepping thread's statistics now (and its free rows)."""
        self.stats = await self._acall("step_stats")
        return self.stats

    async def free_rows(self) -> int:
        return (await self.current_stats())["free_rows"]

    # ---- the reader thread ----

    def _read(self) -> None:
        why = None
        try:
            while True:
                try:
                    message = self._conn.recv()
                except (EOFError, OSError):
                    break
                except Exception as exc:  # (e.g. UnpicklingError) a message was lost: some call or reply
                    # would wait for it forever, so the process is given up, as if it had died
                    log.exception("unreadable message from the engine process")
                    why = f"the engine process sent a message that could not be read ({type(exc).__name__})"
                    self._kill()
                    break
                try:
                    kind = message[0]
                    if kind == "result":
                        _, call_id, ok, value = message
                        with self._lock:
                            future = self._pending.pop(call_id, None)
                        if future is not None and future.set_running_or_notify_cancel():  # (False: its caller gave up)
                            future.set_result(value) if ok else future.set_exception(value)
                    elif kind == "news":
                        self._news(message[1], message[2])
                except Exception:  # this thread carries every reply: it must outlive any one message
                    log.exception("engine process message %r not handled", message[:1])
        finally:  # whatever ended the loop, what waits on the process is told
            self._died(why)

    def _kill(self) -> None:
        try:
            self.process.kill()
        except OSError:
            pass

    def _news(self, entries: list, stats: dict | None) -> None:
        events = []
        with self._lock:
            jobs = [(self._jobs.get(jid), rest) for jid, *rest in entries]
        for job, (responses, finished, cancelled, error) in jobs:
            if job is None:  # ended already (its last news came after `end`)
                continue
            job.responses.extend(Response(*r) for r in responses)
            job.cancelled = job.cancelled or cancelled
            if finished:
                job.error = error
                job.finished = True
            if job.ready is not None:
                events.append(job.ready)
        if stats:
            self.stats = stats
        if events:
            self._call_soon(set_all, events)

    def _died(self, why: str | None = None) -> None:
        """The pipe closed (or can no longer be read: `why`): fail what waits on the process (unless
        we were stopping it)."""
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:
            code = "?"
        why = why or f"the engine process stopped (exit code {code})"
        with self._lock:
            self.dead = why
            pending, self._pending = list(self._pending.values()), {}
            jobs = list(self._jobs.values())
        for future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineProcessError(why))
        events = []
        for job in jobs:
            if not job.finished:
                job.error, job.finished = EngineProcessError(why), True
                if job.ready is not None:
                    events.append(job.ready)
        if events:
            self._call_soon(set_all, events)
        if not self._stopping:
            log.critical(why)
            if self.on_death is not None:
                self._call_soon(self.on_death, why)

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop has closed (the server is gone)
            pass


class _PerIteration:
    """Items asked for in one event-loop iteration, sent together: `send(items, futures)` (at most
    `most` a call) answers each future with (ok, value); `ask` returns the value or raises."""

    def __init__(self, send: Callable[[list, list], None], most: int) -> None:
        self._send, self.most = send, most
        self._queued: list[tuple[object, asyncio.Future]] = []

    async def ask(self, item):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queued.append((item, future))
        if len(self._queued) == 1:
            loop.call_soon(self.send)
        ok, value = await future
        if not ok:
            raise value
        return value

    def send(self) -> None:
        """Send what is queued now (the end of the iteration does it anyway)."""
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), self.most):
            part = queued[start : start + self.most]
            self._send([item for item, _ in part], [future for _, future in part])
