"""Cut an unbounded text stream into pieces that tokenize as they would inside the whole text.

A piece ends just before a single space that sits between two non-space characters. Where that
space goes depends on the tokenizer: byte-level BPE (GPT-2, Llama 3) puts it in front of the next
word (" world"); sentencepiece with a dummy prefix re-creates it at the start of each encode call,
so it is dropped. `probe_space_rule` asks the tokenizer which one holds.
"""

from __future__ import annotations

from typing import Iterator, TextIO

SPACE_NEXT = "space_next"      # the cut space starts the next piece
DUMMY_PREFIX = "dummy_prefix"  # the cut space is dropped; encode() adds it back


def probe_space_rule(tok) -> str:
    whole = tok.encode("hello world", add_bos=False)
    left = tok.encode("hello", add_bos=False)
    if left + tok.encode(" world", add_bos=False) == whole:
        return SPACE_NEXT
    if left + tok.encode("world", add_bos=False) == whole:
        return DUMMY_PREFIX
    return SPACE_NEXT


def last_cut(buf: str) -> int:
    """Index of the last ' ' with a non-space on both sides, or -1."""
    i = len(buf) - 1
    while True:
        i = buf.rfind(" ", 0, i)
        if i <= 0:
            return -1
        if not buf[i - 1].isspace() and i + 1 < len(buf) and not buf[i + 1].isspace():
            return i
        i -= 1  # search strictly before this space


class TextPieces:
    """Iterate `stream` (text, read `block` chars at a time) as whitespace-cut pieces.

    At most about two blocks are held: the block just read and the carry after the last cut.
    Text with no usable space for two blocks is cut hard (tokenization may differ there).
    """

    def __init__(self, stream: TextIO, block: int, rule: str = SPACE_NEXT) -> None:
        self.stream, self.block, self.rule = stream, block, rule
        self.chars_read = 0

    def __iter__(self) -> Iterator[str]:
        carry = ""
        while True:
            data = self.stream.read(self.block)
            if not data:
                break
            self.chars_read += len(data)
            buf = carry + data
            cut = last_cut(buf)
            if cut < 0:
                if len(buf) < 2 * self.block:
                    carry = buf
                    continue
                piece, carry = buf[:self.block], buf[self.block:]
            else:
                piece = buf[:cut]
                carry = buf[cut + 1:] if self.rule == DUMMY_PREFIX else buf[cut:]
            if piece:
                yield piece
        if carry:
            yield carry
