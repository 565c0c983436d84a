"""Token ids -> UTF-8-safe text deltas, one id at a time, at constant cost per token.

Each id is turned into the exact bytes it stands for (``Tokenizer.token_bytes``: '▁' is a space,
``<0xNN>`` byte-fallback pieces are single bytes, byte-level BPE characters are their bytes) and fed
to an incremental UTF-8 decoder. The decoder holds back at most 3 bytes of an unfinished character,
so a delta never ends in a cut multi-byte character or a spurious U+FFFD; bytes that can never form
a character become U+FFFD exactly as ``bytes.decode("utf-8", errors="replace")`` would.

This replaces vLLM's window of recent ids with prefix/read offsets (re-decode a few ids, diff the
strings): working on bytes, the held-back state is the decoder's byte buffer, nothing is re-decoded,
and the concatenated deltas equal ``Tokenizer.decode(all ids)`` by construction, including its one
rule beyond bytes: with a sentencepiece dummy prefix, the space right after a BOS is dropped.
"""

from __future__ import annotations

import codecs

from .tokenizer import Tokenizer


class StreamingDetokenizer:
    """Incremental ``Tokenizer.decode``: ``"".join(add(i) for i in ids) + flush() == decode(ids)``."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._bos = tokenizer.bos_id if tokenizer.dummy_prefix else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._after_bos = False  # drop one leading space from the next text (dummy prefix)

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes ("" while a character is still partial)."""
        if token_id == self._bos and self._bos is not None:
            text = self.flush()  # decode() also ends the byte run at a BOS
            self._after_bos = True
            return text
        return self._strip(self._utf8.decode(self._tok.token_bytes(token_id)))

    def flush(self) -> str:
        """End of stream: return the held-back bytes (an unfinished character becomes U+FFFD)."""
        text = self._strip(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        self._after_bos = False
        return text

    def reset(self) -> None:
        """Forget everything held back."""
        self._utf8.reset()
        self._after_bos = False

    @property
    def pending_bytes(self) -> int:
        """Bytes held back for an unfinished character: never more than 3."""
        return len(self._utf8.getstate()[0])

    def _strip(self, text: str) -> str:
        if self._after_bos and text:
            self._after_bos = False
            if text[0] == " ":
                return text[1:]
        return text
