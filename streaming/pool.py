"""A pool of sessions sharing one batched cache, so many streams decode in one step.

Every session of a pool owns one row of a `SinkWindowCache(batch=slots)`, allocated once: a session's
memory is constant, so the pool needs no paging, only a free list of rows. Each session works on its
own row exactly like a standalone session (feed, generate, chat, save...); `SessionPool.generate`
runs the decode steps of several replies as one batched forward, the rows not in the step left
untouched (tests/test_pool.py shows the batched replies equal the same replies run one by one).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from cache import SinkWindowCache, check_sink_window

from .cuda_graph import StepGraph, graph_capable
from .errors import InvalidInputError, PoolFullError
from .forward import forward_step
from .generate import Reply, Response, next_token
from .session import Session

if TYPE_CHECKING:
    from .runtime import Runtime


@dataclass(eq=False)
class PooledReply:
    """A reply in progress on a pooled session (see `SessionPool.begin`)."""

    session: Session
    request: object  # the session's ReplyRequest
    reply: Reply
    exclusive: ExitStack  # holds the session's lock from begin() to end()
    turn: object = None  # the ChatTurn, for chat replies
    ids: list[int] = field(default_factory=list)  # tokens generated so far
    closed: bool = False


class SessionPool:
    """`slots` sessions' worth of KV memory; create with `Runtime.pool()`."""

    def __init__(self, runtime: "Runtime", slots: int, *, sinks: int, window: int, chunk: int, prefill: str):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise InvalidInputError(f"slots must be an integer >= 1, got {slots!r}")
        check_sink_window(sinks, window)
        config = runtime.config
        self.runtime = runtime
        self.cache = SinkWindowCache(config.kv_layers, slots, config.num_key_value_heads, config.head_dim,
                                     sinks=sinks, window=window, dtype=runtime.dtype, device=runtime.device)
        self.chunk, self.prefill = chunk, prefill
        self._free = list(range(slots))
        self._rows: dict[Session, int] = {}
        self._graph: StepGraph | None = None  # the batched decode step, captured at first use on CUDA

    @property
    def slots(self) -> int:
        return self.cache.batch

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def session(self, seed: int | None = None) -> Session:
        """A new session on a free row of the pool (PoolFullError when every row is taken)."""
        if not self._free:
            raise PoolFullError(f"all {self.slots} slots of the pool are in use; release() a session first")
        row = self._free.pop(0)
        self.cache.reset(row)
        session = self.runtime.session(self.cache.sinks, self.cache.window, chunk=self.chunk, prefill=self.prefill,
                                       seed=seed, _cache=self.cache.row(row))
        self._rows[session] = row
        return session

    def release(self, session: Session) -> None:
        """Return a session's row to the pool; the session must not be used afterwards.

        Raises SessionBusyError (and keeps the row) while one of the session's replies is open."""
        row = self._rows.get(session)
        if row is None:
            raise InvalidInputError("this session does not belong to the pool (or was released already)")
        with session._exclusive():
            session.released = True
        del self._rows[session]
        self.cache.reset(row)
        self._free.append(row)

    def generate(self, requests: Sequence[tuple[Session, object]], **settings) -> Iterator[tuple[Session, Response]]:
        """Generate replies for several sessions at once: (session, prompt or None) pairs, shared settings
        (the keyword arguments of `Session.generate`). Yields (session, Response) as tokens arrive; all
        live replies advance together, one batched decode step per token."""
        for session, _ in requests:
            self._check_member(session)
        if len({id(s) for s, _ in requests}) != len(requests):
            raise InvalidInputError("a session may appear only once per pool.generate() call")
        prepared = [(session, session.prepare_reply(prompt, **settings)) for session, prompt in requests]
        return self._generate(prepared)

    def _generate(self, prepared) -> Iterator[tuple[Session, Response]]:
        handles = []
        try:
            for session, request in prepared:
                handles.append(self._begin(session, request))
            live = list(handles)
            while live:
                for handle, response in zip(live, self.step(live)):
                    yield handle.session, response
                live = [h for h in live if not h.reply.finished]
        finally:
            for handle in handles:
                self.end(handle)

    # ---- replies driven from outside (a server's scheduler) ---------------------------------------

    def begin(self, session: Session, prompt=None, **settings) -> "PooledReply":
        """Start a reply whose decode steps the caller drives with `step()`; finish with `end()`."""
        self._check_member(session)
        return self._begin(session, session.prepare_reply(prompt, **settings))

    def begin_chat(self, session: Session, messages: list[dict], *, stop=None, **sampling) -> "PooledReply":
        """`begin()` for a chat turn (see `Session.chat`); `end()` records the reply in the conversation."""
        self._check_member(session)
        turn = session.chat_turn(messages, stop=stop)
        return self._begin(session, session.prepare_reply(turn.prompt, stop=turn.stop, **sampling), turn)

    def step(self, handles: Sequence["PooledReply"]) -> list[Response]:
        """Advance every open reply by one token in one batched decode step: a Response per handle
        (a reply that has reached max_new_tokens gets its final "length" Response, no step)."""
        out: list[Response | None] = [None] * len(handles)
        stepping = []
        for i, handle in enumerate(handles):
            if handle.closed or handle.reply.finished:
                raise InvalidInputError("step() on a reply that has finished or ended")
            if handle.reply.wants_token():
                stepping.append(i)
            else:
                out[i] = handle.reply.end()
        if stepping:
            tokens = [next_token(handles[i].session, handles[i].request.params, handles[i].session._generator)
                      for i in stepping]
            self._decode([handles[i].session for i in stepping], tokens)
            for i, token in zip(stepping, tokens):
                handles[i].ids.append(token)
                out[i] = handles[i].reply.push(token)
        return out

    def end(self, handle: "PooledReply") -> None:
        """Finish a reply (idempotent): record a chat turn and free the session for other calls."""
        if handle.closed:
            return
        handle.closed = True
        try:
            if handle.turn is not None:
                handle.session.record_chat_reply(handle.turn, handle.ids)
        finally:
            handle.exclusive.close()

    def _begin(self, session: Session, request, turn=None) -> "PooledReply":
        exclusive = ExitStack()
        exclusive.enter_context(session._exclusive())
        try:
            reply = session.start_reply(request)
        except BaseException:
            exclusive.close()
            raise
        return PooledReply(session, request, reply, exclusive, turn)

    def _check_member(self, session: Session) -> None:
        if session not in self._rows:
            raise InvalidInputError("every session must come from this pool (and not be released)")

    def _decode(self, sessions: list[Session], tokens: list[int]) -> None:
        """One decode step for `sessions` (tokens[i] into sessions[i]'s row); the other rows do not move.

        One session steps alone on its own row (its CUDA graph on GPU); all rows step as the whole
        batch (one graph on GPU); a subset steps in place, its rows addressed by an index tensor, so
        idle rows cost nothing.
        """
        if len(sessions) == 1:
            sessions[0].ingest(tokens)
            return
        device = self.runtime.device
        rows = [self._rows[s] for s in sessions]
        with torch.inference_mode():
            ids = torch.tensor(tokens, dtype=torch.long)[:, None].to(device)  # [k, 1]
            if len(rows) == self.slots:
                order = torch.tensor(rows).argsort()
                ids = ids[order.to(device)]  # row order
                logits = self._full_step(ids)
                index = torch.tensor(rows, device=device)
                logits = logits.index_select(0, index)  # back to the sessions' order
            else:  # the rows step in place, addressed by index
                index = torch.tensor(rows, device=device)
                logits = forward_step(self.runtime.model, self.cache, ids, passes=1, all_logits=False, rows=index)
            for session, token, row_logits in zip(sessions, tokens, logits[:, 0]):
                session.accept_decoded(token, row_logits)

    def _full_step(self, ids: torch.Tensor) -> torch.Tensor:
        """Every row steps: ids [slots, 1] in row order -> logits [slots, 1, V] (a graph on CUDA)."""
        if self.runtime.cuda_graphs and graph_capable(self.cache):
            if self._graph is None:
                self._graph = StepGraph(self.runtime.model, self.cache, 1, passes=1, all_logits=False)
            return self._graph(ids)
        return forward_step(self.runtime.model, self.cache, ids, passes=1, all_logits=False)
