"""A pool of sessions on the rows of one engine, so many streams advance in one batched step.

Every session of a pool owns one row of the engine's cache, allocated once: a session's memory is
constant, so the pool needs no paging, only the engine's free list of rows. Each session works on
its own row exactly like a standalone session (feed, generate, chat, save...); `SessionPool.generate`
runs the replies of several sessions together: their decode steps are one batched step and their
prompts are ingested in batched chunks (tests/test_pool.py shows they equal the replies run alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

from .errors import InvalidInputError
from .generate import Response
from .session import OpenReply, Session

if TYPE_CHECKING:
    from .engine import Engine


class SessionPool:
    """`slots` sessions' worth of KV memory; create with `Runtime.pool()`."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.runtime = engine.runtime
        self._sessions: set[Session] = set()

    @property
    def slots(self) -> int:
        return self.engine.rows

    @property
    def free_slots(self) -> int:
        return self.engine.free_rows

    @property
    def cache(self):
        return self.engine.cache

    def session(self, seed: int | None = None) -> Session:
        """A new session on a free row of the pool (PoolFullError when every row is taken)."""
        session = Session(self.engine, self.engine.open_row(), seed=seed)
        self._sessions.add(session)
        return session

    def release(self, session: Session) -> None:
        """Return a session's row to the pool; the session must not be used afterwards.

        Raises SessionBusyError (and keeps the row) while one of the session's replies is open."""
        if session not in self._sessions:
            raise InvalidInputError("this session does not belong to the pool (or was released already)")
        exclusive = session._exclusive()  # SessionBusyError while a reply is open
        with exclusive:
            session.released = True
        self._sessions.discard(session)
        self.engine.close_row(session.row)

    def generate(self, requests: Sequence[tuple[Session, object]], **settings) -> Iterator[tuple[Session, Response]]:
        """Generate replies for several sessions at once: (session, prompt or None) pairs, shared settings
        (the keyword arguments of `Session.generate`, the length defaulting the same way). Yields
        (session, Response) as tokens arrive; all live replies advance together, one batched step each."""
        for session, _ in requests:
            self._check_member(session)
        if len({id(s) for s, _ in requests}) != len(requests):
            raise InvalidInputError("a session may appear only once per pool.generate() call")
        prepared = [(session, session.prepare_reply(prompt, **settings)) for session, prompt in requests]
        return self._generate(prepared)

    def _generate(self, prepared) -> Iterator[tuple[Session, Response]]:
        replies: list[OpenReply] = []
        try:
            for session, request in prepared:
                replies.append(session.begin_reply(request))
            while True:
                for reply in replies:
                    while reply.job.responses:
                        yield reply.session, reply.job.responses.popleft()
                live = [r for r in replies if not r.job.finished]
                for reply in replies:
                    if reply.job.error is not None:
                        raise reply.job.error
                if not live:
                    return
                self.engine.step()
        finally:
            for reply in replies:
                reply.session.end_reply(reply)

    # ---- replies driven from outside ----------------------------------------------------------------

    def begin(self, session: Session, prompt=None, **settings) -> OpenReply:
        """Start a reply whose steps the caller drives with `step()`; finish with `end()`."""
        self._check_member(session)
        return session.begin_reply(session.prepare_reply(prompt, **settings))

    def begin_chat(self, session: Session, messages: list[dict], *, stop=None, notify=None, **sampling) -> OpenReply:
        """`begin()` for a chat turn (see `Session.chat`); `end()` records the reply in the conversation.
        `notify`: see `Session.begin_reply` (for a scheduler that steps the engine in its own thread)."""
        self._check_member(session)
        turn = session.chat_turn(messages, stop=stop)
        return session.begin_reply(session.prepare_reply(turn.prompt, stop=turn.stop, **sampling), turn,
                                   notify=notify)

    def step(self, replies: Sequence[OpenReply]) -> list[Response]:
        """The next Response of every open reply: engine steps (each advancing every live stream of
        the pool, prompts included) run until each reply has one."""
        for reply in replies:
            if reply.ended or (reply.job.finished and not reply.job.responses):
                raise InvalidInputError("step() on a reply that has finished or ended")
        while any(not r.job.responses and not r.job.finished for r in replies):
            self.engine.step()
        for reply in replies:
            if reply.job.error is not None and not reply.job.responses:
                raise reply.job.error
        return [reply.job.responses.popleft() for reply in replies]

    def end(self, reply: OpenReply) -> None:
        """Finish a reply (idempotent): stop it if it still runs, record a chat turn, free the session."""
        reply.session.end_reply(reply)

    def _check_member(self, session: Session) -> None:
        if session not in self._sessions:
            raise InvalidInputError("every session must come from this pool (and not be released)")

