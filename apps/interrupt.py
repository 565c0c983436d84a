"""Ctrl-C (and SIGTERM) that stop between steps, never inside one (so the cache stays consistent)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class StopOnCtrlC:
    """`with StopOnCtrlC() as stop:` ... `if stop.requested: break`.

    The first Ctrl-C only sets `requested`; the loop finishes the current step and stops cleanly.
    A second one raises KeyboardInterrupt at once (for a step that takes too long, e.g. a huge
    prompt), and so does one that arrives while the loop waits for input (`interruptible()`).
    With `term=True` SIGTERM is handled the same way, so a command that is told to stop can
    still write its summary. `exit_code` is 128 + the signal's number (130 for SIGINT, 143 for
    SIGTERM), as a shell reports a process ended by that signal. Outside the main thread it does
    nothing and the signals behave as usual.
    """

    def __init__(self, *, term: bool = False) -> None:
        self.requested = False
        self.signum: int | None = None
        self._signals = (signal.SIGINT, signal.SIGTERM) if term else (signal.SIGINT,)
        self._previous: dict[int, object] = {}
        self._waiting = False  # inside interruptible(): no step is running

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handler(self, signum, frame) -> None:
        first = not self.requested
        self.requested = True
        self.signum = self.signum or signum
        if not first or self._waiting:
            raise KeyboardInterrupt

    @contextmanager
    def interruptible(self):
        """A stop signal inside this block raises KeyboardInterrupt at once: for blocking reads
        (a slow stdin), where no step is in progress and waiting for more input would not end."""
        if self.requested:
            raise KeyboardInterrupt
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def __enter__(self) -> "StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class InterruptibleReader:
    """A text stream whose blocking read() ends at once on a stop signal (see interruptible())."""

    def __init__(self, stream, stop: StopOnCtrlC) -> None:
        self.stream, self.stop = stream, stop

    def read(self, size: int = -1) -> str:
        with self.stop.interruptible():
            return self.stream.read(size)
