"""The server's scheduler thread: steps the engine while any stream has work, sleeps otherwise.

Every step advances every live reply by one token and ingests a bounded budget of prompt chunks
(`streaming.engine.Engine.step`), so one long prompt never stalls the other streams for more than a
chunk. A reply learns about its new tokens through its job's `notify` callback, which only records
it (`news`); after each step the loop hands all of a step's news to `deliver` at once. In the server's
process that is one hop to the asyncio thread (`wake_events`: one `call_soon_threadsafe` per step, not
one per stream: a thousand streams would otherwise cost a thousand self-pipe writes and event-loop
callbacks per step); in an engine process (apps/server/engine_child.py) it is one message per step.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("sinkstream.server")
# Steps longer than this are logged (INFO); $SINKSTREAM_SLOW_STEP_MS changes it (diagnosing gaps).
SLOW_STEP_S = float(os.environ.get("SINKSTREAM_SLOW_STEP_MS", "100")) / 1e3


@dataclass
class StepStats:
    """What the scheduler thread did since start: steps, seconds inside them, the longest one; and the
    pauses of Python's cyclic garbage collector (they stop every thread, the stepping one included)."""
    steps: int = 0
    busy_s: float = 0.0
    longest_s: float = 0.0
    collections: int = 0
    longest_collection_s: float = 0.0
    _collecting_since: float = 0.0

    def on_gc(self, phase: str, info: dict) -> None:
        """A `gc.callbacks` entry."""
        if phase == "start":
            self._collecting_since = time.perf_counter()
        else:
            self.collections += 1
            self.longest_collection_s = max(self.longest_collection_s, time.perf_counter() - self._collecting_since)

    def as_dict(self) -> dict:
        mean = self.busy_s / self.steps if self.steps else 0.0
        return {"steps": self.steps, "mean_step_ms": round(mean * 1e3, 3), "longest_step_ms": round(self.longest_s * 1e3, 3),
                "gc_collections": self.collections, "longest_gc_ms": round(self.longest_collection_s * 1e3, 3)}


def wake_events(loop: asyncio.AbstractEventLoop) -> Callable[[list], None]:
    """A `deliver` for news items that are asyncio.Events of `loop`: sets them all in one hop."""
    return lambda events: loop.call_soon_threadsafe(set_all, events)


class EngineLoop:
    """Steps `engine` on a thread of its own. `deliver(items)` gets, after each step, the items given
    to `notifier(item)` of every job that had news (in the stepping thread; distinct, in order)."""

    def __init__(self, engine, deliver: Callable[[list], None]) -> None:
        self.engine = engine
        self.stats = StepStats()
        self._deliver_items = deliver
        self._news: deque = deque()  # items of replies with news (appended by any stepping thread)
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sinkstream-engine", daemon=True)

    def start(self) -> None:
        gc.callbacks.append(self.stats.on_gc)
        self._thread.start()

    def notifier(self, item):
        """A job's `notify`: records that `item` has news, delivered after the step."""
        return lambda: self._news.append(item)

    def wake(self) -> None:
        """New work (a reply submitted, a cancel): step soon."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        if self.stats.on_gc in gc.callbacks:
            gc.callbacks.remove(self.stats.on_gc)

    def _deliver(self) -> None:
        batch = []
        while self._news:
            batch.append(self._news.popleft())
        if batch:
            self._deliver_items(list(dict.fromkeys(batch)))

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            self._deliver()  # news from steps run by other threads (a reply's end waits by stepping)
            while not self._stopping:
                t0, cpu0 = time.perf_counter(), time.thread_time()
                try:
                    more = self.engine.step()
                except Exception:  # the jobs of that step were told (job.error); the loop goes on
                    log.exception("engine step failed")
                    more = True
                took = time.perf_counter() - t0
                if took > SLOW_STEP_S:  # this thread's CPU time tells its own work from waiting (GIL, device)
                    log.info("slow engine step: %.0f ms, %.0f ms of it on the stepping thread's CPU (%s)",
                             took * 1e3, (time.thread_time() - cpu0) * 1e3, self.engine.last_step)
                self.stats.steps += 1
                self.stats.busy_s += took
                self.stats.longest_s = max(self.stats.longest_s, took)
                self._deliver()
                if not more:
                    break
                # Locks are not fair: stepping back to back, this thread would re-take the engine's
                # lock before a waiting API call (a new reply, a cancel's cleanup) ever got it.
                while self.engine.has_waiters() and not self._stopping:
                    time.sleep(0.0001)


def set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()
