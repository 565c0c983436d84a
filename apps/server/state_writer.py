"""Group commit for --state-dir: every session file write and delete of the server goes through one
queue, and whatever queued while the previous batch was on disk goes down as one batch.

A reply's `done` waits until its session's file is durable (fsynced file, rename, fsynced
directory). One by one on one thread, a thousand replies ending together waited for two thousand
fsyncs in a row. Here a batch writes its files on several threads (concurrent fsyncs share journal
commits) and fsyncs the directory once; each caller still returns only once its own file is durable.
Order is kept: a session's write queued before its delete never lands after it (they share the queue,
and in one batch only a session's last operation counts).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from apps.server.state_dir import StateDir

WRITE_THREADS = 8  # files written and fsynced at once within a batch


class StateWriter:
    """Queues `StateDir` writes and deletes from the event loop and applies them in batches."""

    def __init__(self, store: StateDir, threads: int = WRITE_THREADS) -> None:
        self.store = store
        self._pending: list[tuple[tuple, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._coordinator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sinkstream-state")
        self._files = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sinkstream-state-file")
        self.batches = 0  # (for tests and health: how many group commits ran)

    async def write(self, session_id: str, snapshot, conversation: dict) -> None:
        """Return once the session's file holds this state durably; raise what writing it raised."""
        await self._submit(("write", session_id, (snapshot, conversation)))

    async def delete(self, session_id: str) -> None:
        """Return once the session's file is gone (durably)."""
        await self._submit(("delete", session_id, ()))

    async def _submit(self, op: tuple) -> None:
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # a caller cancelled meanwhile leaves no "never retrieved" log
        self._pending.append((op, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(future)  # (a cancelled caller does not cancel the others' commit)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await loop.run_in_executor(self._coordinator, self.store.apply,
                                                     [op for op, _ in batch], self._files)
            except Exception as exc:  # (apply reports per-op failures; this is a bug or a dead pool)
                results = [exc] * len(batch)
            self.batches += 1
            for (_, future), error in zip(batch, results):
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    async def close(self) -> None:
        """Finish what is queued, then stop the threads."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        self._coordinator.shutdown(wait=True)
        self._files.shutdown(wait=True)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
