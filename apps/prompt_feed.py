"""A `generate` prompt of any length, read and fed in pieces: memory stays bounded by a block.

The prompt is tokenized in word-aligned pieces (`streaming.text_pieces.word_aligned`, cut where
the tokenizer splits anyway) and fed in whole chunks, holding back the last 1..chunk ids for
`generate()`. The ids and the chunk bounds are those of the whole prompt given to `generate()` at
once, so the reply is the same; only one block of text and one chunk of ids are held.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from apps.interrupt import StopOnCtrlC
from apps.stdin_text import StdinText

BLOCK_BYTES = 1 << 16  # stdin bytes read at a time, at most
PREVIEW_CHARS = 200    # of a long prompt, --verbose prints this much


class StdinPrompt:
    """The prompt on stdin as text blocks of at most BLOCK_BYTES bytes, decoded as StdinText does.

    `start()` reads up to the first non-whitespace text (before the model loads, so an empty prompt
    is an error at once); iterating yields the blocks read so far, then the rest of stdin.
    """

    def __init__(self, encoding: str, block: int | None = None) -> None:
        self.stdin, self.block = StdinText(encoding), block or BLOCK_BYTES
        self.head: list[str] = []  # blocks read by start(): whitespace, then one with text
        self.chars = 0
        self.preview = ""  # the first PREVIEW_CHARS + 1 characters, for --verbose
        self.stop: StopOnCtrlC | None = None  # set: a stop signal ends a blocking read at once

    def start(self) -> bool:
        """Read until some non-whitespace text arrives; False if stdin held none."""
        while data := self._read():
            self.head.append(data)
            if not data.isspace():
                return True
        return False

    def _read(self) -> str:
        if self.stop is None:
            data = self.stdin.read(self.block)
        else:
            with self.stop.interruptible():
                data = self.stdin.read(self.block)
        self.chars += len(data)
        if len(self.preview) <= PREVIEW_CHARS:
            self.preview += data[:PREVIEW_CHARS + 1 - len(self.preview)]
        return data

    def __iter__(self) -> Iterator[str]:
        while self.head:
            yield self.head.pop(0)
        while data := self._read():
            yield data
        self.stdin.warn()

    def describe(self) -> str:
        """The prompt for --verbose: whole when short, else its start and its length."""
        if len(self.preview) <= PREVIEW_CHARS:
            return repr(self.preview)
        return f"{self.preview[:PREVIEW_CHARS]!r}... ({self.chars} characters from stdin)"


def feed_prompt(session, pieces: Iterable[str], stop: StopOnCtrlC | None = None) -> tuple[list[int], int]:
    """Feed the prompt's text pieces into `session` in whole chunks, as `generate(prompt)` would.

    Returns (the last 1..chunk ids, left for `generate(ids)` to feed and continue from; the number
    of ids fed before them). A stop signal ends the feeding between chunks (KeyboardInterrupt).
    """
    from streaming.text_pieces import word_aligned

    tokenizer, chunk = session.runtime.require_tokenizer(), session.chunk
    at_start = session.stats().tokens_seen == 0
    pending: list[int] = []  # ids not fed yet: at most a chunk plus one piece's ids
    fed = 0
    for text in word_aligned(pieces):
        pending += tokenizer.encode(text, add_bos=at_start and tokenizer.bos_id is not None)
        at_start = False
        if len(pending) > chunk:
            n = (len(pending) - 1) // chunk * chunk  # whole chunks, keeping 1..chunk ids back
            session.feed(pending[:n])
            del pending[:n]
            fed += n
        if stop is not None and stop.requested:
            raise KeyboardInterrupt
    return pending, fed
