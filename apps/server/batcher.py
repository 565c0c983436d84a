"""Batches the decode steps of concurrent replies into one model call.

Each running reply asks for its next step with `await batcher.step(handle)`. One loop takes every
step asked for so far and runs them as one batched decode step on the model worker
(`SessionPool.step`), so N streaming replies cost about one step per token instead of N. Steps asked
for while a batch runs go into the next one.
"""

from __future__ import annotations

import asyncio


class DecodeBatcher:
    def __init__(self, worker, pool) -> None:
        self.worker, self.pool = worker, pool
        self._pending: list[tuple[object, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, future in self._pending:
            if not future.done():
                future.cancel()

    async def step(self, handle):
        """The next Response of `handle`'s reply (one token), computed in the next batch."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((handle, future))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let replies that are ready in this loop turn join the batch
            batch, self._pending = self._pending, []
            # A reply cancelled while waiting (its task was cancelled) takes no part.
            batch = [(h, f) for h, f in batch if not f.done()]
            if not batch:
                continue
            try:
                responses = await self.worker.run(self.pool.step, [h for h, _ in batch])
            except Exception as exc:  # every reply of the batch sees the failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), response in zip(batch, responses):
                if not future.done():
                    future.set_result(response)
