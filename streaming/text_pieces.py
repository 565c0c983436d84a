"""Re-cut a stream of text pieces so every cut falls where tokenizing the whole text would split anyway.

Tokenizers split text into words before merging: sentencepiece in front of a space ('▁world'),
byte-level BPE too (' world'). A piece cut inside a word ('hel' + 'lo') tokenizes differently from
the whole text; a cut just before a single space between two non-space characters ('hello' +
' world') does not, because `Tokenizer.encode` is verbatim (it adds no space at a piece's start).
Only text after the last such space is held back, so memory is one piece plus one word.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from .errors import InvalidInputError

# Characters held back at most: text with no usable space for this long is cut hard (its
# tokenization may differ at that cut).
MAX_CARRY = 1 << 16
# Characters per block when one long string is tokenized piece by piece.
BLOCK = 1 << 16


def blocks(text: str, size: int = BLOCK) -> Iterator[str]:
    """`text` in slices of `size` characters (to be re-cut by `word_aligned`)."""
    for start in range(0, len(text), size):
        yield text[start : start + size]


def last_cut(text: str) -> int:
    """Index of the last ' ' with a non-space character on both sides, or -1."""
    i = len(text) - 1
    while True:
        i = text.rfind(" ", 0, i)
        if i <= 0:
            return -1
        if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
            return i
        i -= 1  # search strictly before this space


def word_aligned(pieces: Iterable[str], max_carry: int = MAX_CARRY) -> Iterator[str]:
    """Yield the text of `pieces`, unchanged when joined, cut only before a single inner space."""
    carry = ""
    for piece in pieces:
        if not isinstance(piece, str):
            raise InvalidInputError(
                f"text pieces must be str, got {type(piece).__name__} (open files in text mode)"
            )
        buf = carry + piece
        cut = last_cut(buf)
        if cut > 0:
            out, carry = buf[:cut], buf[cut:]
        elif len(buf) > max_carry:
            out, carry = buf, ""
        else:
            carry = buf
            continue
        yield out
    if carry:
        yield carry
