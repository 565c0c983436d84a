"""The server's model side in the server's own process (the default on CPU; `EngineProcess` runs the
same calls in a process of its own, apps/server/engine_process.py).

The engine's steps run on the scheduler thread (apps/server/engine_loop.py); every other model call
(creating a session, tokenizing, starting and ending a reply, snapshots, stats) runs on the server's
model worker thread, one at a time, in arrival order. A cancel takes effect before the next step.
"""

from __future__ import annotations

import asyncio
import os

from apps.server import native_heap
from apps.server.engine_loop import EngineLoop, wake_events
from apps.server.engine_spec import EngineSettings


class LocalEngine:
    """A pool of `settings.rows` sessions on one engine of `rt`, stepped by an `EngineLoop`.
    Handles are the pool's Sessions; a reply is the pool's OpenReply (its `job` is the engine Job)."""

    def __init__(self, rt, settings: EngineSettings, worker) -> None:
        self.rt, self.settings, self.worker = rt, settings, worker
        self.pool = None
        self.loop: EngineLoop | None = None
        self.graphs = 0

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def has_tokenizer(self) -> bool:
        return self.rt.tokenizer is not None

    async def start(self) -> None:
        from streaming.sampling import SamplingParams

        s = self.settings
        if self.rt.device.type == "cpu" and s.cpu_mmap_threshold is not None:
            native_heap.map_large_blocks(s.cpu_mmap_threshold)
        self.pool = await self.worker.run(self.rt.pool, s.rows, sinks=s.sinks, window=s.window, chunk=s.chunk,
                                          prefill_budget=s.prefill_budget, pipelined=s.pipelined)
        if self.rt.device.type == "cuda":  # capture the step graphs now, not in the first requests
            self.graphs = await self.worker.run(self.pool.engine.warm_up,
                                                [self.rt.sampling_defaults, SamplingParams()])

    def run(self) -> None:
        """Start stepping (after start-up work the collector should not see: ChatServer.start)."""
        self.loop = EngineLoop(self.pool.engine, wake_events(asyncio.get_running_loop()))
        self.loop.start()

    async def stop(self) -> None:
        if self.loop:
            await asyncio.to_thread(self.loop.stop)

    async def open_row(self):
        return await self.worker.run(self.pool.session)

    async def release(self, session) -> None:
        await self.worker.run(self.pool.release, session)

    async def snapshot(self, session) -> tuple[dict, dict, dict]:
        return await self.worker.run(session.snapshot)

    async def restore(self, session, state: tuple[dict, dict, dict]) -> None:
        await self.worker.run(session.restore, *state)

    def check_saved(self, tensors: dict, meta: dict, extra: dict) -> None:
        """Raises unless a saved state fits this model and cache (any thread)."""
        from streaming.session import check_state

        check_state(self.rt, self.pool.engine.cache, tensors, meta, extra)

    async def begin_chat(self, session, history: list[dict], kw: dict, ready: asyncio.Event):
        reply = await self.worker.run(self.pool.begin_chat, session, history, **kw,
                                      notify=self.loop.notifier(ready))
        self.loop.wake()
        return reply

    async def end(self, reply):
        """Finish a reply (records the chat turn); the session's stats after it."""
        def end_and_measure():
            self.pool.end(reply)
            return reply.session.stats()
        stats = await self.worker.run(end_and_measure)
        self.loop.wake()  # news of other replies from steps the end ran (delivered by the loop)
        return stats

    def cancel(self, job) -> None:
        self.pool.engine.cancel(job)
        self.loop.wake()

    async def session_stats(self, session):
        return await self.worker.run(session.stats)

    async def count_tokens(self, text: str) -> int:
        tokenizer = self.rt.tokenizer
        return len(await self.worker.run(tokenizer.encode, text)) if tokenizer is not None else len(text)

    def step_stats(self) -> dict | None:
        return self.loop.stats.as_dict() if self.loop else None

    async def current_stats(self) -> dict:
        return {**(self.step_stats() or {}), "free_rows": self.pool.free_slots}

    async def free_rows(self) -> int:
        return self.pool.free_slots
