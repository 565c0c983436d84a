"""Stdin and text arguments for every subcommand: invalid bytes become U+FFFD, counted, reported once.

All subcommands decode stdin the same way: with `--encoding` (default utf-8), replacing each
invalid byte sequence by U+FFFD as Python's "replace" error handler does, and counting the
replaced bytes so the command can say so on stderr instead of replacing them unseen. Text arguments
(a prompt, --system, --question, --stop) get the same treatment with the locale's encoding, in
which Python decoded the command line.
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import os
import sys

_names = itertools.count()


def check_encoding(encoding: str) -> str:
    """The codec's canonical name; a clean error for unknown or non-text codecs (e.g. rot13)."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        raise SystemExit(f"error: unknown --encoding {encoding!r} "
                         "(Python codec names: utf-8, latin-1, cp1252, utf-16 ...)") from None
    if not getattr(info, "_is_text_encoding", True):  # bytes-to-bytes codecs such as hex, zlib
        raise SystemExit(f"error: --encoding {encoding!r} is not a text encoding")
    return info.name


class StdinText:
    """Decode stdin with `encoding`, replacing invalid bytes with U+FFFD and counting them.

    Two ways to read, one per kind of command:
    - `reconfigure()` makes sys.stdin itself decode this way, so input() (line editing
      included) and sys.stdin.read() work as usual: `generate` and `chat`.
    - `read(size)` returns whatever text has arrived, as soon as some has (a slow pipe is not
      waited on until `size` characters are there); line endings are kept as they are: `stream`.
    """

    def __init__(self, encoding: str = "utf-8") -> None:
        self.encoding = check_encoding(encoding)
        self.flag = encoding  # as the user wrote it, for messages
        self.replaced = 0     # invalid bytes replaced so far
        self._reported = 0
        # A handler per instance: the codec registry is global and cannot forget a name.
        self.errors = f"sinkstream-count-{next(_names)}"
        codecs.register_error(self.errors, self._replace)
        self._decoder = codecs.getincrementaldecoder(self.encoding)(errors=self.errors)

    def reconfigure(self) -> "StdinText":
        sys.stdin.reconfigure(encoding=self.encoding, errors=self.errors)
        return self

    def read(self, size: int) -> str:
        """Text from at most `size` bytes that have arrived; '' only at the end of stdin."""
        while True:
            data = sys.stdin.buffer.read1(size)  # returns as soon as any bytes are there
            text = self._decoder.decode(data, final=not data)
            if text or not data:  # '' with data: a character split across reads, read on
                return text

    def _replace(self, exc: UnicodeError):
        if not isinstance(exc, UnicodeDecodeError):
            raise exc
        self.replaced += exc.end - exc.start
        return "\ufffd", exc.end

    def warn(self) -> None:
        """One warning line on stderr if bytes were replaced since the last warning.

        Piped input is decoded a buffer ahead of what was consumed, so the count can include
        bytes of lines not yet read; on a terminal it is exact per line.
        """
        n, self._reported = self.replaced - self._reported, self.replaced
        if n:
            print(f"warning: stdin had {n} invalid {self.flag} byte(s) (--encoding {self.flag}); "
                  "replaced with U+FFFD", file=sys.stderr, flush=True)


# Text flags whose invalid bytes are replaced (paths such as --model are left as the OS gave them).
TEXT_ARGUMENTS = {"prompt": "PROMPT", "system": "--system", "question": "--question", "stop": "--stop"}


def repair_text_arguments(args: argparse.Namespace) -> None:
    """Replace the invalid bytes of the text arguments with U+FFFD, one warning line per argument.

    Python hands undecodable argv bytes over as lone surrogates ('\\udcff'), which no tokenizer
    takes; the original bytes come back with os.fsencode and are decoded as stdin is.
    """
    for attr, flag in TEXT_ARGUMENTS.items():
        value = getattr(args, attr, None)
        if isinstance(value, list):
            setattr(args, attr, [_repair(v, flag) for v in value])
        elif isinstance(value, str):
            setattr(args, attr, _repair(value, flag))


def _repair(value: str, flag: str) -> str:
    try:
        value.encode("utf-8")
        return value  # valid text (the common case)
    except UnicodeEncodeError:
        pass
    decoder = StdinText(sys.getfilesystemencoding())
    text = os.fsencode(value).decode(decoder.encoding, decoder.errors)
    if decoder.replaced:
        print(f"warning: {flag} had {decoder.replaced} invalid {decoder.encoding} byte(s); replaced "
              "with U+FFFD", file=sys.stderr, flush=True)
    return text


ENCODING_HELP = ("stdin encoding (default utf-8); invalid bytes are replaced with U+FFFD and "
                 "counted in one warning on stderr")
