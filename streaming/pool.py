"""A pool of sessions sharing one batched cache, so many streams decode in one step.

Every session of a pool owns one row of a `SinkWindowCache(batch=slots)`, allocated once: a session's
memory is constant, so the pool needs no paging, only a free list of rows. Each session works on its
own row exactly like a standalone session (feed, generate, chat, save...); `SessionPool.generate`
runs the decode steps of several replies as one batched forward, the rows not in the step left
untouched (tests/test_pool.py shows the batched replies equal the same replies run one by one).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from cache import SinkWindowCache, check_sink_window

from .cuda_graph import StepGraph, graph_capable
from .errors import InvalidInputError, PoolFullError
from .forward import forward_step
from .generate import Response, next_token
from .session import Session

if TYPE_CHECKING:
    from .runtime import Runtime


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
        """Return a session's row to the pool; the session must not be used afterwards."""
        row = self._rows.pop(session, None)
        if row is None:
            raise InvalidInputError("this session does not belong to the pool (or was released already)")
        with session._exclusive():
            session.released = True
        self.cache.reset(row)
        self._free.append(row)

    def generate(self, requests: Sequence[tuple[Session, object]], **settings) -> Iterator[tuple[Session, Response]]:
        """Generate replies for several sessions at once: (session, prompt or None) pairs, shared settings
        (the keyword arguments of `Session.generate`). Yields (session, Response) as tokens arrive; all
        live replies advance together, one batched decode step per token."""
        prepared = []
        for session, prompt in requests:
            if session not in self._rows:
                raise InvalidInputError("every session must come from this pool")
            prepared.append((session, session.prepare_reply(prompt, **settings)))
        if len({id(s) for s, _ in prepared}) != len(prepared):
            raise InvalidInputError("a session may appear only once per pool.generate() call")
        return self._generate(prepared)

    def _generate(self, prepared) -> Iterator[tuple[Session, Response]]:
        with ExitStack() as stack:
            for session, _ in prepared:
                stack.enter_context(session._exclusive())
            live = [(session, request, session.start_reply(request)) for session, request in prepared]
            while live:
                stepping = []
                for session, request, reply in live:
                    if reply.wants_token():
                        stepping.append((session, request, reply))
                    elif not reply.finished:
                        yield session, reply.end()
                if not stepping:
                    return
                tokens = [next_token(s, request.params, s._generator) for s, request, _ in stepping]
                self._decode([s for s, _, _ in stepping], tokens)
                for (session, _, reply), token in zip(stepping, tokens):
                    yield session, reply.push(token)
                live = [entry for entry in stepping if not entry[2].finished]

    def _decode(self, sessions: list[Session], tokens: list[int]) -> None:
        """One batched decode step: tokens[i] goes into sessions[i]'s row; other rows do not advance."""
        rows = [self._rows[s] for s in sessions]
        ids = torch.zeros(self.slots, 1, dtype=torch.long)
        active = torch.zeros(self.slots, dtype=torch.bool)
        ids[rows, 0] = torch.tensor(tokens)
        active[rows] = True
        ids, active = ids.to(self.runtime.device), active.to(self.runtime.device)
        with torch.inference_mode():
            if self.runtime.cuda_graphs and graph_capable(self.cache):
                if self._graph is None:
                    self._graph = StepGraph(self.runtime.model, self.cache, 1, passes=1, all_logits=False,
                                            batched=True)
                logits = self._graph(ids, active)
            else:
                logits = forward_step(self.runtime.model, self.cache, ids, passes=1, all_logits=False, active=active)
            for session, row, token in zip(sessions, rows, tokens):
                session.accept_decoded(token, logits[row, 0])
