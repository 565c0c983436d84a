"""The engine process of `sinkstream serve` (apps/server/engine_process.py is the server's side).

It loads the model, owns the pool of sessions and steps the engine on a thread of its own, so the
stepping thread shares its interpreter (and GIL) with nothing that serves websockets. One duplex
pipe to the server carries, server -> here: ("call", id, op, args), ("cancel", job id) and ("stop",);
here -> server: ("ready", info) or ("fatal", text) once, ("result", id, ok, value) per call, and
("news", entries, stats) once per engine step that had news, where an entry is (job id, responses as
tuples, finished, cancelled, error). Calls run one at a time on a worker thread, in arrival order (as
the in-process server's model worker runs them); a cancel is applied at once by the reading thread.
The process ends when the server says stop or its end of the pipe closes (the server died).
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from apps.server.engine_loop import EngineLoop
from apps.server.engine_spec import EngineSettings, ModelSource, pack_state, unpack_state

log = logging.getLogger("sinkstream.engine")
STATS_EVERY_S = 0.5  # step statistics ride along with news at most this often

PENDING = object()  # a job id whose begin_chat has not returned yet (its news waits)


def main(fd: int) -> None:
    """The process's entry point: `python -m apps.server.engine_child FD`, FD one end of a socket pair
    whose first message is (ModelSource, EngineSettings, log level)."""
    conn = Connection(fd)
    try:
        source, settings, log_level = conn.recv()
    except (EOFError, OSError):
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server stops us
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        child = EngineChild(conn, source, settings)
    except BaseException as exc:  # a bad checkpoint, too little memory: the server reports it and exits
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", child.info()))
    child.serve()


class EngineChild:
    def __init__(self, conn, source: ModelSource, settings: EngineSettings) -> None:
        import torch

        import streaming
        from apps.server import native_heap
        from streaming.sampling import SamplingParams

        self.conn = conn
        if source.threads:
            torch.set_num_threads(source.threads)
        self.rt = rt = streaming.load(source.model, device=source.device, dtype=source.dtype, compile=source.compile)
        if rt.device.type == "cpu" and settings.cpu_mmap_threshold is not None:
            native_heap.map_large_blocks(settings.cpu_mmap_threshold)
        self.pool = rt.pool(settings.rows, sinks=settings.sinks, window=settings.window, chunk=settings.chunk,
                            prefill_budget=settings.prefill_budget, pipelined=settings.pipelined)
        self.graphs = 0
        if rt.device.type == "cuda":  # every step graph now, not in the first requests
            self.graphs = self.pool.engine.warm_up([rt.sampling_defaults, SamplingParams()])
        self.sessions: dict[int, object] = {}  # handle -> streaming Session
        self.replies: dict[int, object] = {}  # job id -> OpenReply, until `end`
        self.jobs: dict[int, object] = {}  # job id -> engine Job (or PENDING), until its finish is sent
        self._handles = 0
        self._send_lock = threading.Lock()
        self._stats_at = 0.0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sinkstream-model")
        gc.collect()
        gc.freeze()  # the model and graphs live as long as the process (see ChatServer.start)
        self.loop = EngineLoop(self.pool.engine, self._send_news)
        self.loop.start()

    def info(self) -> dict:
        rt = self.rt
        return {"pid": os.getpid(), "device": str(rt.device), "dtype": str(rt.dtype).removeprefix("torch."),
                "path": str(rt.path),
                "graphs": self.graphs, "fingerprint": rt.fingerprint, "has_tokenizer": rt.tokenizer is not None}

    # ---- the pipe ----

    def _send(self, message) -> None:
        with self._send_lock:
            self.conn.send(message)

    def serve(self) -> None:
        try:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):  # the server is gone
                    break
                except Exception:  # (e.g. UnpicklingError) a lost call would wait forever: stop; the
                    # server then fails what waits on this process, as when it dies
                    log.exception("unreadable message from the server; stopping")
                    break
                kind = message[0]
                if kind == "cancel":
                    job = self.jobs.get(message[1])
                    if job is not None and job is not PENDING:
                        self.pool.engine.cancel(job)
                        self.loop.wake()
                elif kind == "call":
                    self.worker.submit(self._call, *message[1:])
                elif kind == "stop":
                    break
        finally:
            self.worker.shutdown(wait=True, cancel_futures=True)
            self.loop.stop()
            self.conn.close()

    def _call(self, call_id: int, op: str, args: tuple) -> None:
        try:
            value, ok = getattr(self, f"op_{op}")(*args), True
        except BaseException as exc:
            value, ok = portable(exc), False
        try:
            self._send(("result", call_id, ok, value))
        except (OSError, ValueError):  # the server is gone (or stopping)
            pass

    def _send_news(self, job_ids: list[int]) -> None:
        """EngineLoop's deliver: what the step gave each job, one message."""
        entries = []
        for jid in job_ids:
            job = self.jobs.get(jid)
            if job is None:  # finished and reported already
                continue
            if job is PENDING:  # stepped before begin_chat returned: told at the wake that follows it
                self.loop.notifier(jid)()
                continue
            finished = job.finished  # (read first: a finished job has all its responses queued)
            responses = []
            while job.responses:
                r = job.responses.popleft()
                responses.append((r.text, r.token_ids, r.prompt_tokens, r.generated_tokens, r.tokens_in_cache,
                                  r.finish_reason))
            error = portable(job.error) if finished and job.error is not None else None
            entries.append((jid, responses, finished, job.cancelled, error))
            if finished:
                self.jobs.pop(jid, None)
        now = time.monotonic()
        stats = None
        if now - self._stats_at > STATS_EVERY_S:
            self._stats_at, stats = now, self.step_stats()
        if entries or stats:
            try:
                self._send(("news", entries, stats))
            except (OSError, ValueError):
                pass

    def step_stats(self) -> dict:
        return {**self.loop.stats.as_dict(), "free_rows": self.pool.free_slots}

    # ---- the calls (run on the worker thread, one at a time) ----

    def op_open(self) -> int:
        session = self.pool.session()
        self._handles += 1
        self.sessions[self._handles] = session
        return self._handles

    def op_release(self, handle: int) -> None:
        self.pool.release(self.sessions[handle])
        del self.sessions[handle]

    def op_snapshot_many(self, handles: list[int]) -> list[tuple[bool, object]]:
        """(True, packed state) or (False, the error) of each session, their device reads shared
        (streaming.session.snapshot_many)."""
        from streaming.session import snapshot_many

        known = [h for h in handles if h in self.sessions]
        states = dict(zip(known, snapshot_many([self.sessions[h] for h in known])))
        out = []
        for handle in handles:
            state = states.get(handle, KeyError(f"no session {handle} in the engine process"))
            out.append((False, portable(state)) if isinstance(state, BaseException) else (True, pack_state(state)))
        return out

    def op_restore(self, handle: int, packed) -> None:
        self.sessions[handle].restore(*unpack_state(packed))

    def op_check_saved(self, packed) -> None:
        from streaming.session import check_state

        check_state(self.rt, self.pool.engine.cache, *unpack_state(packed))

    def op_many(self, calls: list[tuple[str, tuple]]) -> list[tuple[bool, object]]:
        """Several calls in order (those the server made in one event-loop iteration): (True, value)
        or (False, the error) of each."""
        out = []
        for op, args in calls:
            try:
                out.append((True, getattr(self, f"op_{op}")(*args)))
            except BaseException as exc:
                out.append((False, portable(exc)))
        return out

    def op_begin_chat(self, jid: int, handle: int, history: list[dict], kw: dict) -> None:
        self.jobs[jid] = PENDING
        try:
            reply = self.pool.begin_chat(self.sessions[handle], history, **kw, notify=self.loop.notifier(jid))
        except BaseException:
            self.jobs.pop(jid, None)
            raise
        self.replies[jid] = reply
        self.jobs[jid] = reply.job
        self.loop.wake()  # (delivers news that came before the job was known)

    def op_end(self, jid: int):
        """End a reply; the session's stats after it (None: no such reply)."""
        reply = self.replies.pop(jid, None)
        if reply is None:
            return None
        self.pool.end(reply)
        self.loop.wake()  # news of replies from steps the end ran
        return reply.session.stats()

    def op_session_stats(self, handle: int):
        return self.sessions[handle].stats()

    def op_step_stats(self) -> dict:
        return self.step_stats()


def portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (the server re-raises the same class), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    import sys

    main(int(sys.argv[1]))
