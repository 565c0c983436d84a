"""The server's scheduler thread: steps the engine while any stream has work, sleeps otherwise.

Every step advances every live reply by one token and ingests a bounded budget of prompt chunks
(`streaming.engine.Engine.step`), so one long prompt never stalls the other streams for more than a
chunk. Replies learn about their new tokens through their job's `notify` callback, which wakes the
asyncio side with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("sinkstream.server")


class EngineLoop:
    def __init__(self, engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sinkstream-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New work (a reply submitted, a cancel): step soon."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            while not self._stopping:
                try:
                    more = self.engine.step()
                except Exception:  # the jobs of that step were told (job.error); the loop goes on
                    log.exception("engine step failed")
                    more = True
                if not more:
                    break
                # Locks are not fair: stepping back to back, this thread would re-take the engine's
                # lock before a waiting API call (a new reply, a cancel's cleanup) ever got it.
                while self.engine.has_waiters() and not self._stopping:
                    time.sleep(0.0001)
