"""The websocket chat server: one model, many sessions, several sessions per connection."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import secrets
import time
from dataclasses import dataclass, field

from websockets.exceptions import ConnectionClosed

from apps import protocol
from apps.protocol import Limits, ProtocolError
from apps.server.batching import FrameWriter, close_stalled, wants_batches
from apps.server.engine_local import LocalEngine
from apps.server.engine_process import EngineProcess, EngineProcessError
from apps.server.engine_spec import EngineSettings, ModelSource
from apps.server.http import WS_PATH, Listening, listen
from apps.server.loop_lag import LoopLag
from apps.server.ownership import may_change
from apps.server.sessions import ON_DISK, ChatState, ModelWorker, Registry
from apps.server.rate_limit import RateLimiter
from apps.server.state_dir import SESSION_ID, StateDir, conversation_of
from apps.server.state_writer import StateWriter
from cache.errors import CacheStateError
from streaming import PoolFullError
from streaming.session import SessionStats

log = logging.getLogger("sinkstream.server")

# Default prompt chunk (tokens per engine step): on a 2-core CPU the bundled model ingests about
# 200 tok/s, so 64 tokens keep every other stream's pause near 0.3 s; on a GPU a chunk costs
# milliseconds and larger chunks batch better.
SERVER_CHUNK_CPU = 64
SERVER_CHUNK_GPU = 256
# Prompt tokens one step may ingest, over all waiting prompts (one chunk each per step, round robin).
# On a GPU a step's host work for every live stream dwarfs a few thousand prompt tokens, so a burst of
# short prompts is admitted in few steps; one long prompt still gets one chunk per step.
SERVER_PREFILL_BUDGET_GPU = 4096


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    limits: Limits = field(default_factory=Limits)
    chunk: int | None = None               # prompt tokens per engine step (None: 64 on CPU, 256 on GPU)
    prefill_budget: int | None = None      # prompt tokens per step, all prompts (None: 1 chunk CPU, 4096 GPU)
    # Queue each decode step before reading the last one's ids (streaming.engine.Engine's `pipelined`;
    # None: on a GPU).
    pipelined: bool | None = None
    allowed_origins: tuple[str, ...] = ()  # besides same-origin and localhost; "*" = any
    allowed_hosts: tuple[str, ...] = ()    # Host names accepted besides loopback; "*" = any
    token: str | None = None               # required as ?token= or Authorization: Bearer
    model_name: str = "model"
    state_dir: str | None = None           # keep every session on disk here (survives restarts)
    # Register every saved session of state_dir at start. Off for servers that share one directory
    # (the replicas of `serve --ray`): each then reads a session's file when it is resumed there.
    scan_state_dir: bool = True
    # On CPU, allocations of at least this many bytes come from mmap (glibc), so the steps' large
    # temporaries of ever-changing sizes do not fragment the heap (apps/server/native_heap.py).
    # Process-wide; None leaves glibc's default.
    cpu_mmap_threshold: int | None = 128 * 1024
    # permessage-deflate on the websockets. Off: a delta is a few dozen bytes, and compressing each
    # one took an eighth of the server's time per event (profiled with 400 streams).
    compression: bool = False
    # Step the engine in a process of its own (apps/server/engine_process.py), so the websockets'
    # work never holds the stepping thread's GIL. None: on a GPU yes, on CPU no.
    engine_process: bool | None = None
    # A connection whose writes have waited this long for its client to read (a frozen or hung
    # client) is closed: its sessions are parked as on a disconnect (the reply cancelled, the row
    # given back, the session resumable). A reading client never waits this long. None: never.
    write_stall_s: float | None = 5.0


class ChatServer(Listening):
    """`rt`: a loaded `streaming.Runtime`, or a `ModelSource` to load (in the engine process, or here
    when the engine runs in this process)."""

    def __init__(self, rt, cfg: ServerConfig) -> None:
        self.rt, self.cfg, self.limits = rt, cfg, cfg.limits
        self.worker = ModelWorker()  # model calls of an engine in this process; --state-dir file work
        self.engine: LocalEngine | EngineProcess | None = None
        self.failed = asyncio.Event()  # set when the engine process died: the server cannot go on
        self.sessions = Registry(cfg.limits.max_sessions)
        self.started = time.time()
        self.server = None
        self._reaper: asyncio.Task | None = None
        self._stall_watch: asyncio.Task | None = None
        self.store = StateDir(cfg.state_dir) if cfg.state_dir else None
        self.writer = StateWriter(self.store) if self.store is not None else None  # its writes and deletes
        # Named in every file this server writes; where servers share the directory (scan_state_dir off),
        # a file naming another is that server's (apps/server/ownership.py).
        self.owner = secrets.token_urlsafe(12)
        self.shared_dir = self.store is not None and not cfg.scan_state_dir
        self.rate = RateLimiter(cfg.limits.max_requests_per_minute)
        self.stopping = False  # stop() has begun: no more parking (the model worker is going away)
        self._writers: dict = {}  # connection -> its FrameWriter (batched frames for the --ray front door)
        self._parking: set[asyncio.Task] = set()  # parks under way (stop lets them finish)
        self.lag = LoopLag()
        self.creates_handled = 0  # session.create frames answered (created, resumed or refused)

    # ---- lifecycle ----

    async def start(self):
        """Load the engine, then listen. A start that fails (a bad checkpoint, the port taken) stops
        what it started: no engine process outlives it."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self):
        t0 = time.perf_counter()
        self.engine = await self._build_engine()
        await self.engine.start()
        if not self.engine.has_tokenizer:
            raise ValueError("this checkpoint has no tokenizer; the server needs one")
        log.info("engine ready in %.1f s (%s, %d step graphs captured)", time.perf_counter() - t0,
                 "a process of its own" if isinstance(self.engine, EngineProcess) else "in this process",
                 self.engine.graphs)
        if self.store is not None and self.cfg.scan_state_dir:
            await self._load_saved_sessions()
        # The model, tokenizer, graphs and imported modules live as long as the server: out of the
        # collector's generations, a full collection no longer walks them (with 1,000 replies in
        # flight those pauses took 170 ms of one engine step; benchmarks/DECISIONS.md). Undone at stop.
        gc.collect()
        gc.freeze()
        self.engine.run()
        self.server = await listen(self.handler, self.cfg, self.health)
        self._reaper = asyncio.create_task(self._reap_idle())
        self._stall_watch = asyncio.create_task(close_stalled(self._writers, self.cfg.write_stall_s, log))
        self.lag.start()
        return self.server

    async def _build_engine(self):
        """An engine in a process of its own, or in this one (ServerConfig.engine_process)."""
        from streaming.runtime import resolve_device

        source = self.rt if isinstance(self.rt, ModelSource) else None
        device = resolve_device(source.device) if source is not None else self.rt.device
        chunk = self.cfg.chunk
        if chunk is None:  # a chunk is what other streams may wait for: small where steps are slow
            chunk = min(SERVER_CHUNK_CPU if device.type == "cpu" else SERVER_CHUNK_GPU, self.limits.window)
        budget = self.cfg.prefill_budget
        if budget is None and device.type == "cuda":
            budget = SERVER_PREFILL_BUDGET_GPU
        settings = EngineSettings(rows=self.limits.max_sessions, sinks=self.limits.sinks, window=self.limits.window,
                                  chunk=chunk, prefill_budget=budget, cpu_mmap_threshold=self.cfg.cpu_mmap_threshold,
                                  pipelined=self.cfg.pipelined)
        in_process = self.cfg.engine_process if self.cfg.engine_process is not None else device.type == "cuda"
        if in_process:
            return EngineProcess(source or ModelSource.of(self.rt), settings, on_death=self._engine_died)
        if source is not None:
            import streaming

            load = functools.partial(streaming.load, source.model, device=source.device, dtype=source.dtype,
                                     compile=source.compile)
            self.rt = await self.worker.run(load)
        return LocalEngine(self.rt, settings, self.worker)

    def _engine_died(self, why: str) -> None:
        log.critical("%s: no reply can run any more; the server must be restarted", why)
        self.failed.set()

    async def stop(self) -> None:
        self.stopping = True
        for st in list(self.sessions.by_id.values()):
            self.stop_reply(st)
        tasks = [st.task for st in self.sessions.by_id.values() if st.busy]
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._parking, return_exceptions=True)  # (their snapshots need the engine)
        if self._reaper:
            self._reaper.cancel()
        if self._stall_watch:
            self._stall_watch.cancel()
        self.lag.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self.server:
            self.server.close()
            await self.server.wait_closed()
        if self.writer is not None:
            for st in [x for x in self.sessions.parked() if x.parked is not ON_DISK]:
                await self._write_state(st, st.parked)  # parked in memory when a write failed: try again
            await self.writer.close()
        self.worker.shutdown()
        gc.unfreeze()  # (start froze what existed then; an embedding process goes on collecting it)

    def health(self) -> dict:
        return {"status": "engine failed" if self.failed.is_set() else "ok", "model": self.cfg.model_name, "sessions": len(self.sessions),
                "active_sessions": self.sessions.active, "parked_sessions": len(self.sessions.parked()),
                "max_sessions": self.limits.max_sessions, "creates_handled": self.creates_handled,
                "uptime_s": round(time.time() - self.started, 1), "websocket": WS_PATH,
                "engine": self.engine.step_stats() if self.engine else None, **self.lag.as_dict(),
                "pid": os.getpid(), "engine_pid": self.engine.pid if self.engine else None}

    # ---- one connection ----

    async def handler(self, ws) -> None:
        owned: set[str] = set()  # sessions attached to this connection
        self._writers[ws] = FrameWriter(ws, batched=wants_batches(ws))
        try:
            async for frame in ws:
                msg = None
                try:
                    msg = protocol.parse_frame(frame, self.limits)
                    await self.dispatch(ws, msg, owned)
                except ProtocolError as e:
                    await self.send(ws, e.event())
                except Exception as e:  # a bug must not take the connection or server down
                    log.exception("error handling a frame")
                    await self.send(ws, protocol.error(protocol.INTERNAL,
                                                       f"internal error: {type(e).__name__}"))
                finally:
                    if msg is not None and msg["type"] == "session.create":  # (answered: created or refused)
                        self.creates_handled += 1  # the --ray front door counts rows of creates on their way
        except ConnectionClosed:
            pass
        finally:
            self._writers.pop(ws, None)
            # A disconnect stops the replies it was receiving; the sessions stay resumable, parked
            # without a cache row (a reply that is still ending parks its session when it ends).
            for sid in owned:
                st = self.sessions.by_id.get(sid)
                if st is not None and st.conn is ws:
                    st.conn = None
                    self.stop_reply(st)
                    st.touch()
                    if not st.busy:
                        self._park_soon(st)

    async def dispatch(self, ws, msg: dict, owned: set[str]) -> None:
        kind, rid = msg["type"], msg.get("id")
        if kind in ("session.create", "message") and not self.rate.allow(_client(ws)):
            raise ProtocolError(protocol.RATE_LIMITED, f"more than {self.limits.max_requests_per_minute} "
                                "sessions and messages a minute from this client; wait a moment",
                                session=msg.get("session"), request_id=rid)
        if kind == "session.create":
            attached = sum(1 for sid in owned if getattr(self.sessions.by_id.get(sid), "conn", None) is ws)
            if attached >= self.limits.max_sessions_per_connection:
                raise ProtocolError(protocol.TOO_MANY_SESSIONS, f"this connection already has {attached} "
                                    "sessions (limits.max_sessions_per_connection)", request_id=rid)
            st = await (self.resume(ws, msg) if "resume" in msg else self.create(ws, msg))
            owned.add(st.id)
            return
        st = self.sessions.attached(msg["session"], ws, rid)
        st.touch()
        st.close_at = None  # used again: a deferred close is off (a new one below sets it again)
        if kind == "message":
            await self.start_reply(st, msg)
        elif kind == "cancel":
            if not st.busy:  # nothing to stop (it may have just finished): say so, the id answered
                raise ProtocolError(protocol.NO_REPLY, "no reply is running in this session",
                                    session=st.id, request_id=rid)
            self.stop_reply(st)  # the reply ends with a `done` event, finish_reason "cancelled"
        elif kind == "session.close" and "after_s" in msg:
            # A page that is going away (reload or tab closed: it cannot tell which) asks for this:
            # a reload resumes within the delay and keeps the conversation, a closed tab's is closed.
            st.close_at = time.monotonic() + msg["after_s"]
            await self.send(ws, protocol.closing(st.id, msg["after_s"], rid))
        elif kind == "session.close":
            await self.drop(st)
            owned.discard(st.id)
            await self.send(ws, protocol.closed(st.id, "closed by client", rid))
            log.info("session %s closed (%d live)", st.id[:8], len(self.sessions))

    async def create(self, ws, msg: dict) -> ChatState:
        rid, system = msg.get("id"), msg.get("system")
        if system:
            await self.check_length(system, None, rid)
        session = await self.take_row(rid)
        history = [{"role": "system", "content": system}] if system else []
        st = self.sessions.add(session, history, msg.get("sampling", {}), ws)
        await self.persist(st)
        await self.send(ws, protocol.created(st.id, self.limits, resumed=False, request_id=rid,
                                             model=self.cfg.model_name, history=len(history)))
        log.info("session %s created (%d live)", st.id[:8], len(self.sessions))
        return st

    async def resume(self, ws, msg: dict) -> ChatState:
        rid = msg.get("id")
        if "system" in msg:
            raise ProtocolError(protocol.BAD_REQUEST, "session.create: 'system' cannot be "
                                "changed when resuming", request_id=rid)
        known = self.sessions.by_id.get(msg["resume"])
        st = known or await self._adopt_saved(msg["resume"])
        if st is None:
            st = self.sessions.get(msg["resume"], rid)  # (raises unknown_session)
        await self.unpark(st, rid)
        if known is None and self.shared_dir:
            await self.persist(st)  # taken over from another server: the file names this one from now on
        st.close_at = None
        old, st.conn = st.conn, ws
        if old is not None and old is not ws:
            await self.send(old, protocol.closed(st.id, protocol.RESUMED_ELSEWHERE))
        if "sampling" in msg:
            st.sampling = msg["sampling"]
        st.touch()
        await self.send(ws, protocol.created(st.id, self.limits, resumed=True, request_id=rid,
                                             model=self.cfg.model_name, history=len(st.history)))
        return st

    # ---- sessions on disk (--state-dir) ----

    async def _load_saved_sessions(self) -> None:
        """Register every valid saved session as parked on disk (its cache is read on resume)."""
        saved = await self.worker.run(self.store.scan, self._check_saved)
        for conv in saved:
            self._register_saved(conv)
        log.info("resumable from %s: %d saved sessions", self.store.path, len(saved))

    async def _adopt_saved(self, sid: str) -> ChatState | None:
        """A session this server does not know, registered from its file in --state-dir if there is
        a valid one (written by this server before a restart, or by another sharing the directory)."""
        if self.store is None or not SESSION_ID.match(sid):
            return None
        conv = await self.worker.run(self.store.load, sid, self._check_saved)
        if conv is None or sid in self.sessions.by_id:  # (or adopted meanwhile by another resume)
            return self.sessions.by_id.get(sid)
        log.info("session %s read from %s", sid[:8], self.store.path)
        return self._register_saved(conv)

    def _check_saved(self, tensors, meta, extra) -> None:
        """Raises unless a saved state fits this server's model and cache (StateDir's `check`)."""
        self.engine.check_saved(tensors, meta, extra)

    def _register_saved(self, conv) -> ChatState:
        """A session known from its file only: parked on disk until resumed."""
        st = ChatState(conv.session_id, None, conv.history, conv.sampling, None, seq=conv.seq, parked=ON_DISK,
                       taken_from=conv.owner)
        self.sessions.adopt(st)
        return st

    async def hand_off(self, sid: str) -> bool:
        """Let another server sharing --state-dir take the session over: after its running reply (if
        any) ends, its state is written, its row given back, and this server forgets it, keeping the
        file. False when there is no such session or no state directory."""
        st = self.sessions.by_id.get(sid)
        if st is None or self.store is None:
            return False
        if st.busy:
            await asyncio.gather(st.task, return_exceptions=True)
        async with st.lock:
            if st.closed or self.sessions.by_id.get(sid) is not st:
                return False
            written = (await self.persist(st, handing_off=True) if st.session is not None
                       else st.parked is ON_DISK or await self._write_state(st, st.parked, handing_off=True))
            if not written:  # its file would be older than its state: it stays here
                return False
            if st.session is not None:
                await self.engine.release(st.session)
                st.session = None
            self.sessions.by_id.pop(sid, None)
            st.released = st.closed = st.cancel = True  # (nothing of this server touches it or its file)
        log.info("session %s handed off (%d live)", sid[:8], len(self.sessions))
        return True

    async def disown(self, sid: str) -> bool:
        """Forget a session that another server sharing --state-dir has taken over (the --ray front
        door moved it while this server seemed to have failed): its reply stops and its row goes back,
        and its file, now the other server's, is neither written nor deleted here. False when there is
        no such session."""
        st = self.sessions.by_id.get(sid)
        if st is None:
            return False
        st.disowned = True
        await self.drop(st)
        log.info("session %s disowned: another server holds it (%d live)", sid[:8], len(self.sessions))
        return True

    async def persist(self, st: ChatState, *, handing_off: bool = False) -> bool:
        """Write the session's state and transcript to --state-dir (atomically), when there is one and
        the session holds a row. False when nothing was written: a failure is logged, never raised (a
        full or read-only disk must not break the chat), and the last good file stays."""
        if self.store is None or st.session is None or st.closed or st.released or st.disowned:
            return False
        try:
            snapshot = await self.engine.snapshot(st.session)
        except Exception as exc:
            log.error("could not save session %s: no snapshot (%s: %s)", st.id[:8], type(exc).__name__, exc)
            return False
        return await self._write_state(st, snapshot, handing_off=handing_off)

    async def _write_state(self, st: ChatState, snapshot, *, handing_off: bool = False) -> bool:
        """Write a snapshot of the session with its transcript; False (logged) when that failed, or when
        the file is another server's (`_owns_file`).

        The file also reserves the delta numbers of the session's next reply (`seq_high`): a server
        killed during that reply leaves this file, and whoever reads it back numbers on from the
        reservation, past every delta the client may have got. A session handed off sends nothing more
        here, so it reserves none."""
        if not await self._owns_file(st):
            return False
        # A reply sends at most one delta per token, and one more for the text its end flushes.
        seq_high = st.seq if handing_off else st.seq + self.limits.max_new_tokens_cap + 1
        try:
            conversation = {**conversation_of(st.history, st.sampling, st.seq, seq_high), "owner": self.owner}
            await self.writer.write(st.id, snapshot, conversation)
            return True
        except Exception as exc:  # whatever the file system or the file format library raised
            log.error("could not save session %s to %s: %s: %s", st.id[:8], self.store.path,
                      type(exc).__name__, exc)
            return False

    async def _owns_file(self, st: ChatState) -> bool:
        """Whether this server may write or delete the session's file: always, unless servers share the
        directory and the file names another owner; then the session is disowned here (its copy is
        stale: the other server took it over) and its file left alone."""
        if st.disowned:
            return False
        if not self.shared_dir or await self.worker.run(may_change, self.store.file(st.id), self.owner, st.taken_from):
            return True
        st.disowned = True
        log.warning("session %s is held by another server sharing %s: its file is left to it",
                    st.id[:8], self.store.path)
        return False

    # ---- detached sessions leave their rows ----

    def _park_soon(self, st: ChatState) -> None:
        """Park a session that was just left, in a task that `stop` waits for (it needs the engine)."""
        task = asyncio.create_task(self.park(st))
        self._parking.add(task)
        task.add_done_callback(self._parking.discard)
        task.add_done_callback(_log_failure)

    async def park(self, st: ChatState) -> None:
        """Move a detached, idle session's cache state to host memory and give its row back, so
        disconnected users never lock others out; `unpark` brings it back on resume. With --state-dir
        the file is the parked state; a state that could not be written stays in memory instead."""
        async with st.lock:
            if st.session is None or st.closed or st.busy or st.conn is not None or self.stopping:
                return
            try:
                snapshot = await self.engine.snapshot(st.session)
            except Exception as exc:  # (it keeps its row: nothing is lost)
                log.error("could not park session %s: %s: %s", st.id[:8], type(exc).__name__, exc)
                return
            parked = snapshot
            if self.store is not None and await self._write_state(st, snapshot):
                parked = ON_DISK  # nothing kept in memory
            await self.engine.release(st.session)
            st.session, st.parked = None, parked  # parked once its row is back: never both at once
        log.info("session %s parked%s (%d active, %d parked)", st.id[:8],
                 " in memory" if self.store is not None and st.parked is not ON_DISK else "",
                 self.sessions.active, len(self.sessions.parked()))
        in_memory = [x for x in self.sessions.parked() if x.parked is not ON_DISK]  # disk ones cost no memory
        over = len(in_memory) - self.limits.max_parked_sessions
        for old in sorted(in_memory, key=lambda x: x.last_active)[:max(0, over)]:
            self.sessions.remove(old)  # the least recently active first: as if it had expired
            log.info("session %s dropped: over %d parked sessions", old.id[:8], self.limits.max_parked_sessions)

    async def unpark(self, st: ChatState, rid) -> None:
        """Give a parked session a row again with its saved state (too_many_sessions if none is free)."""
        async with st.lock:
            if st.parked is None:
                return
            saved = st.parked if st.parked is not ON_DISK else await self._read_saved(st, rid)
            st.session = await self.take_row(rid, saved)
            st.parked = None

    async def _read_saved(self, st: ChatState, rid):
        """The state of a session parked on disk. A file that became unreadable since (damaged,
        truncated, deleted) is skipped as at start: logged, the session forgotten, the file kept."""
        try:
            saved = await self.worker.run(self.store.read, st.id)
            self._adopt_transcript(st, saved[2])
            return saved
        except CacheStateError as exc:
            log.warning("skipping saved session %s: %s", self.store.file(st.id), exc)
            self.sessions.remove(st)
            raise ProtocolError(protocol.UNKNOWN_SESSION, f"session {st.id[:64]!r} cannot be resumed: its "
                                "saved state is unreadable", session=st.id, request_id=rid) from None

    def _adopt_transcript(self, st: ChatState, extra: dict) -> None:
        """The cache state read back and the transcript held in memory must tell one conversation. When
        the file holds another one (a stale copy of the session on a server sharing the directory wrote
        it after this server parked the session), the transcript written with that state is taken."""
        conversation = extra.get("server") if isinstance(extra, dict) else None
        history = conversation.get("history") if isinstance(conversation, dict) else None
        if not isinstance(history, list) or history == st.history:
            return
        log.warning("session %s: its file holds %d messages where %d were parked; resuming what the file "
                    "holds", st.id[:8], len(history), len(st.history))
        st.history = history
        seqs = [v for v in (conversation.get("seq"), conversation.get("seq_high")) if isinstance(v, int)]
        st.seq = max([st.seq, *seqs])  # never a number a client may have seen

    async def take_row(self, rid, saved=None):
        """A pool session for a new chat, or for a parked one restored from `saved` (its state);
        the row counts against max_sessions from the start. too_many_sessions when none is free."""
        self.sessions.reserve(rid)
        session = None
        try:
            session = await self.engine.open_row()
            if saved is not None:
                await self.engine.restore(session, saved)
            return session
        except PoolFullError:  # a closed session's reply is still finishing: its row is not back yet
            raise ProtocolError(protocol.TOO_MANY_SESSIONS, "all session slots are in use; try again in a "
                                "moment", request_id=rid) from None
        except BaseException:
            if session is not None:
                await self.engine.release(session)
            raise
        finally:
            self.sessions.reserved -= 1  # counted as active (or given back) from here on

    async def check_length(self, text: str, sid: str | None, rid) -> int:
        n = await self.engine.count_tokens(text)
        if n > self.limits.max_prompt_tokens:
            raise ProtocolError(protocol.PROMPT_TOO_LONG,
                                f"prompt of {n} tokens is over the limit of "
                                f"{self.limits.max_prompt_tokens} tokens", session=sid,
                                request_id=rid)
        return n

    async def start_reply(self, st: ChatState, msg: dict) -> None:
        rid = msg.get("id")
        if st.busy:
            raise ProtocolError(protocol.BUSY, "a reply is already running in this session; "
                                "cancel it or wait for its `done` event", session=st.id,
                                request_id=rid)
        # Claim the session before awaiting, so a second message cannot slip in.
        st.task = asyncio.current_task()
        try:
            await self.check_length(msg["text"], st.id, rid)
        finally:
            st.task = None
        kw = {"max_new_tokens": self.limits.max_new_tokens, **st.sampling,
              **msg.get("sampling", {})}
        st.cancel = False
        st.replying = True  # from now on the reply, not drop(), gives the row back
        st.task = asyncio.create_task(self.reply(st, msg["text"], kw))

    # ---- one reply ----

    async def reply(self, st: ChatState, text: str, kw: dict) -> None:
        st.history.append({"role": "user", "content": text})
        parts, finish, handle, err, stats = [], "error", None, None, None
        prompt_tokens = generated = 0
        t0 = time.perf_counter()
        t_first = None
        ready = st.ready = asyncio.Event()
        try:
            handle = await self.engine.begin_chat(st.session, list(st.history), kw, ready)
            st.job = handle.job
            if st.cancel:  # cancelled while the turn was being prepared
                self.stop_reply(st)
            job = handle.job
            while True:
                await ready.wait()
                ready.clear()
                # Everything produced since the last wake-up goes out as one delta: a client that
                # falls behind gets fewer, larger events, never a growing queue.
                batch = []
                while job.responses:
                    batch.append(job.responses.popleft())
                if batch:
                    t_first = t_first or time.perf_counter()
                    prompt_tokens, generated = batch[-1].prompt_tokens, batch[-1].generated_tokens
                    delta = "".join(r.text for r in batch)
                    if delta:
                        parts.append(delta)
                        st.seq += 1
                        await self.send_to(st, protocol.delta(st.id, st.seq, delta))
                    finish = batch[-1].finish_reason or finish
                if job.finished and not job.responses:
                    if job.error is not None:
                        raise job.error
                    if job.cancelled:
                        finish = "cancelled"
                    break
        except ValueError as e:  # settings the runtime refused (e.g. top_k > vocab)
            err = protocol.error(protocol.BAD_REQUEST, f"message: {e}", session=st.id)
        except Exception as e:
            log.exception("reply failed in session %s", st.id[:8])
            err = protocol.error(protocol.INTERNAL, f"generation failed: {type(e).__name__}",
                                 session=st.id)
        finally:
            if handle is not None:
                # Records the turn in the session's chat state (a partial or empty reply included):
                # the history below says the same, so the next message extends the conversation.
                stats = await self.engine.end(handle)
                st.history.append({"role": "assistant", "content": "".join(parts)})
            else:
                st.history.pop()  # the session never saw the message: forget it
            st.job, st.ready = None, None
            st.touch()
            st.replying = False
            if st.closed:  # closed while replying: its row goes back to the pool now, exactly once
                await self.release(st)
        if err is not None:
            await self.send_to(st, err)
        await self.persist(st)  # durable before the client sees `done`
        if stats is None:  # no reply ran (its begin failed) or the engine is gone: `done` still comes
            try:
                stats = await self.engine.session_stats(st.session)
            except EngineProcessError:
                stats = SessionStats(tokens_seen=0, tokens_in_cache=0, cache_bytes=0, evictions=0)
        t1 = time.perf_counter()
        gen_time = t1 - t_first if t_first else 0.0
        usage = {
            "prompt_tokens": prompt_tokens, "completion_tokens": generated,
            "tokens_per_second": round((generated - 1) / gen_time, 2) if generated > 1 and gen_time > 0 else 0.0,
            "prompt_tokens_per_second": round(prompt_tokens / (t_first - t0), 2) if t_first else 0.0,
            "time_s": round(t1 - t0, 4), "tokens_in_cache": stats.tokens_in_cache,
            "tokens_seen": stats.tokens_seen, "cache_capacity": self.limits.sinks + self.limits.window,
            "evictions": stats.evictions,
        }
        await self.send_to(st, protocol.done(st.id, st.seq, finish, usage))
        if st.conn is None and not st.closed:  # the user left during the reply
            self._park_soon(st)

    def stop_reply(self, st: ChatState) -> None:
        """Cancel the session's running reply: the engine drops it before its next step (between
        prompt chunks too)."""
        st.cancel = True
        if st.job is not None:
            self.engine.cancel(st.job)
        if st.ready is not None:
            st.ready.set()

    async def drop(self, st: ChatState) -> None:
        """Forget a session; its cache row returns to the pool (after its reply, if one runs)."""
        self.sessions.remove(st)
        if st.replying:
            self.stop_reply(st)  # the reply's `finally` releases the row
        else:
            await self.release(st)

    async def release(self, st: ChatState) -> None:
        async with st.lock:
            if not st.released:
                st.released = True
                st.parked = None
                if st.session is not None:
                    await self.engine.release(st.session)
                if self.store is not None and await self._owns_file(st):  # closed or expired: the conversation is over
                    await self.writer.delete(st.id)

    # ---- sending ----

    async def send(self, ws, event: dict) -> bool:
        """Queue an event for a connection (written with the others of this loop iteration); waits only
        while the connection is backlogged. False when it has closed."""
        writer = self._writers.get(ws)
        if writer is not None:
            return await writer.send_and_wait(protocol.dumps(event))
        try:  # (a connection whose handler has ended)
            await ws.send(protocol.dumps(event))
            return True
        except ConnectionClosed:
            return False

    async def send_to(self, st: ChatState, event: dict) -> None:
        conn = st.conn
        if conn is None:
            self.stop_reply(st)  # nobody is listening: stop at the next step
        elif not await self.send(conn, event) and st.conn is conn:
            self.stop_reply(st)

    async def _reap_idle(self) -> None:
        timeout = self.limits.idle_timeout_s
        while True:
            await asyncio.sleep(max(0.05, min(timeout / 4, 1.0)))
            now = time.monotonic()
            for st in [x for x in self.sessions.by_id.values() if x.close_at is not None and x.close_at <= now]:
                await self.drop(st)
                if st.conn is not None:
                    await self.send(st.conn, protocol.closed(st.id, "closed by client (delayed close)"))
                log.info("session %s closed after its delay (%d live)", st.id[:8], len(self.sessions))
            for st in self.sessions.idle(timeout):
                await self.drop(st)
                if st.conn is not None:
                    await self.send(st.conn, protocol.error(
                        protocol.IDLE_TIMEOUT, f"session closed after {timeout:g}s without "
                        "activity", session=st.id))
                log.info("session %s expired (%d live)", st.id[:8], len(self.sessions))


def _log_failure(task: asyncio.Task) -> None:
    """A background task's exception, logged (it has no caller to raise it to)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_coro().__qualname__, exc_info=task.exception())


def _client(ws) -> str:
    """The client's address (what the rate limit counts by)."""
    address = getattr(ws, "remote_address", None)
    return str(address[0]) if address else "?"


@contextlib.asynccontextmanager
async def running(rt, cfg: ServerConfig):
    """`async with running(rt, cfg) as app:` serves until the block ends (app.url, app.port)."""
    app = ChatServer(rt, cfg)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()
