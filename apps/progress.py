"""A one-line progress display on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

from __future__ import annotations

import time
from typing import TextIO


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


class Progress:
    def __init__(self, out: TextIO, every: float | None = None) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every = every if every is not None else (0.2 if self.tty else 10.0)
        self.t0 = self.last = time.perf_counter()

    def line(self, tokens: int, chars: int, ppl) -> str:
        dt = time.perf_counter() - self.t0
        seg = ppl.last_seg_ppl
        seg_s = f" (last segment {seg:.2f})" if seg == seg else ""  # NaN check
        return (f"{_human(tokens)} tokens | {_human(tokens / dt if dt > 0 else 0)} tokens/s | "
                f"ppl {ppl.ppl:.2f}{seg_s} | {_human(chars)} chars read | {dt:.0f}s")

    def update(self, tokens: int, chars: int, ppl) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        self._write(self.line(tokens, chars, ppl))

    def finish(self, tokens: int, chars: int, ppl) -> None:
        self._write(self.line(tokens, chars, ppl))
        if self.tty:
            self.out.write("\n")
            self.out.flush()

    def _write(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + text)  # return + clear to end of line
        else:
            self.out.write(text + "\n")
        self.out.flush()
