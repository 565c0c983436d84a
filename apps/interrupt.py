"""Ctrl-C that stops between decode steps, never inside one (so the cache stays consistent)."""

from __future__ import annotations

import signal
import threading


class StopOnCtrlC:
    """`with StopOnCtrlC() as stop:` ... `if stop.requested: break`.

    The first Ctrl-C only sets `requested`; the loop finishes the current step and stops cleanly.
    A second Ctrl-C raises KeyboardInterrupt at once (for a step that takes too long, e.g. a huge
    prompt). Outside the main thread it does nothing and Ctrl-C behaves as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
