"""Server-side session state and the model worker.

Each session owns a row of one SessionPool (an engine). The engine's steps run on the scheduler
thread (apps/server/engine_loop.py); every other model call (creating a session, tokenizing,
starting and ending a reply, stats) runs on one worker thread, one at a time, in arrival order.
A cancel takes effect before the engine's next step.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from apps import protocol
from apps.protocol import ProtocolError


class ModelWorker:
    """One thread that owns the model; `await worker.run(fn, ...)` queues a call on it."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sinkstream-model")

    async def run(self, fn, *args, **kwargs):
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.pool, call)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


ON_DISK = "on disk"  # ChatState.parked of a session whose state is only in the server's --state-dir


@dataclass(eq=False)
class ChatState:
    """One chat: the runtime session, its transcript and the connection it reports to."""
    id: str
    session: Any                         # streaming Session (owned by the model worker)
    history: list[dict]                  # transcript: what Session.chat() has been given
    sampling: dict                       # the session's default sampling settings
    conn: Any = None                     # attached websocket connection, or None while detached
    task: asyncio.Task | None = None     # the running reply, if any
    cancel: bool = False                 # set by cancel / disconnect / close
    closed: bool = False
    replying: bool = False               # a reply holds the session (cleared before its row may go back)
    released: bool = False               # the session's row went back to the pool
    disowned: bool = False               # another server sharing --state-dir holds it: its file is not ours
    taken_from: str | None = None        # owner named in its file when read from there (ownership.py)
    job: Any = None                      # the running reply's engine job
    ready: asyncio.Event | None = None   # set when the running reply has news
    seq: int = 0                         # last delta sequence number sent (per session)
    parked: tuple | str | None = None    # detached, no row held: (tensors, meta, extra) in memory, or ON_DISK
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # park / unpark / release, one at a time
    last_active: float = field(default_factory=time.monotonic)
    close_at: float | None = None        # session.close with after_s: closed then unless resumed or used

    def touch(self) -> None:
        self.last_active = time.monotonic()

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()


class Registry:
    """All live sessions, by id. Ids are 128-bit random: knowing one is the right to resume it.

    `max_sessions` bounds the *active* sessions (those holding a cache row); a detached session is
    parked in host memory without a row (see ChatServer.park) and does not count."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self.by_id: dict[str, ChatState] = {}
        self.reserved = 0  # rows being taken right now, for a new or a resumed session (counted)

    def __len__(self) -> int:
        return len(self.by_id)

    @property
    def active(self) -> int:
        return sum(1 for st in self.by_id.values() if st.session is not None)

    def parked(self) -> list[ChatState]:
        return [st for st in self.by_id.values() if st.parked is not None]

    def adopt(self, st: ChatState) -> None:
        """Register a session read back from disk (its id kept)."""
        self.by_id[st.id] = st

    def reserve(self, request_id=None) -> None:
        if self.active + self.reserved >= self.max_sessions:
            raise ProtocolError(protocol.TOO_MANY_SESSIONS,
                                f"the server is full: {self.max_sessions} active sessions; "
                                "close one (session.close) or try again later",
                                request_id=request_id)
        self.reserved += 1

    def add(self, session, history: list[dict], sampling: dict, conn) -> ChatState:
        sid = secrets.token_urlsafe(16)
        st = ChatState(sid, session, history, sampling, conn)
        self.by_id[sid] = st
        return st

    def get(self, sid: str, request_id=None) -> ChatState:
        st = self.by_id.get(sid)
        if st is None:
            raise ProtocolError(protocol.UNKNOWN_SESSION,
                                f"no session {sid[:64]!r} (closed, expired or never created)",
                                session=sid, request_id=request_id)
        return st

    def attached(self, sid: str, conn, request_id=None) -> ChatState:
        st = self.get(sid, request_id)
        if st.conn is not conn:
            raise ProtocolError(protocol.UNKNOWN_SESSION,
                                f"session {sid[:64]!r} is not open on this connection; resume it "
                                "with {\"type\": \"session.create\", \"resume\": id}",
                                session=sid, request_id=request_id)
        return st

    def remove(self, st: ChatState) -> None:
        st.closed = st.cancel = True
        self.by_id.pop(st.id, None)

    def idle(self, timeout: float) -> list[ChatState]:
        now = time.monotonic()
        return [st for st in self.by_id.values() if not st.busy and now - st.last_active > timeout]
