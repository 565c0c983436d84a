"""Stop strings over a stream of text deltas, without ever leaking a stop string.

``push`` holds back the longest tail of the text that could still grow into a stop string (a
prefix of one), so nothing of a stop string reaches the user even when it arrives split over many
deltas. When a stop string is complete, the text before it is emitted and the stream is stopped;
when the stream ends without one, ``flush`` returns the held-back tail. The held tail is shorter than
the longest stop string, so the work per delta is bounded by its length plus the delta's.
"""

from __future__ import annotations

from .errors import InvalidInputError


class StopMatcher:
    """Cut a text stream at the first occurrence of any of ``stop_strings``."""

    def __init__(self, stop_strings=None):
        """``stop_strings``: a str, an iterable of str, or None (no stops). Empty strings are rejected."""
        self.stops = _validate(stop_strings)
        self._max = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream

    def push(self, delta: str) -> tuple[str, bool]:
        """Add a text delta; return (text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        cut, hit = _first_stop(text, self.stops)
        if hit is not None:
            self._held = ""
            self.stopped, self.matched = True, hit
            return text[:cut], True
        keep = _partial_tail(text, self.stops, self._max)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """End of stream: return the held-back text ("" after a stop)."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    @property
    def held(self) -> str:
        """Text held back because it may be the start of a stop string."""
        return self._held


def _validate(stop_strings) -> tuple[str, ...]:
    if stop_strings is None:
        return ()
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    try:
        items = list(stop_strings)
    except TypeError:
        raise InvalidInputError(
            f"stop must be a string or a list of strings, got {type(stop_strings).__name__}"
        ) from None
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise InvalidInputError(f"stop[{i}] must be a string, got {type(s).__name__}")
        if not s:
            raise InvalidInputError(f"stop[{i}] is an empty string")
    return tuple(dict.fromkeys(items))  # unique, in order


def _first_stop(text: str, stops) -> tuple[int, str | None]:
    """(start index, stop string) of the earliest complete stop in text, or (-1, None)."""
    best, hit = -1, None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best == -1 or i < best):
            best, hit = i, s
    return best, hit


def _partial_tail(text: str, stops, max_len: int) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    for k in range(min(len(text), max_len - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0
