"""How late an event loop runs its callbacks: the websocket side's share of a stream's pauses (the
engine's share is in its step statistics). Reported in /healthz of the server and the front door."""

from __future__ import annotations

import asyncio
import time

PERIOD_S = 0.01


class LoopLag:
    """A task that wakes every PERIOD_S and records how late it woke. `as_dict()`: the worst lateness
    since start and over the last ten seconds, in ms."""

    def __init__(self) -> None:
        self.worst_s = 0.0
        self._recent: list[tuple[float, float]] = []  # (when, lateness) of the late wake-ups, last 10 s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            due = time.monotonic() + PERIOD_S
            await asyncio.sleep(PERIOD_S)
            now = time.monotonic()
            late = now - due
            self.worst_s = max(self.worst_s, late)
            if late > PERIOD_S:
                self._recent.append((now, late))
                while self._recent and self._recent[0][0] < now - 10:
                    self._recent.pop(0)

    def as_dict(self) -> dict:
        now = time.monotonic()
        recent = max((late for when, late in self._recent if when >= now - 10), default=0.0)
        return {"worst_loop_lag_ms": round(self.worst_s * 1e3, 1), "loop_lag_last_10s_ms": round(recent * 1e3, 1)}
