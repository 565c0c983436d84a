"""What a reply looks like to its consumer: `Response` objects built by `Reply`.

The engine samples and ingests each token (so the cache holds everything produced and a stopped
reply can be continued); `Reply` turns the ids into UTF-8-safe text deltas, holds back possible
stop-string prefixes and reports counters and the finish reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .detokenizer import StreamingDetokenizer
from .stops import StopMatcher


@dataclass
class Response:
    """One step of a streamed reply."""

    text: str  # UTF-8-safe text delta (may be "")
    token_ids: list[int]  # ids produced in this step
    prompt_tokens: int  # tokens fed for this call's prompt
    generated_tokens: int  # tokens generated so far in this call
    tokens_in_cache: int
    finish_reason: str | None = None  # None while running; "eos" | "stop" | "length" at the end


class Reply:
    """One reply's bookkeeping: ids -> Responses with text deltas, stop strings, EOS and length.

    `push(token)` is called after the token was sampled and ingested; `finished` turns True on EOS or
    a stop string; `end()` closes a reply that ran out of `max_new_tokens`.
    """

    def __init__(self, tokenizer, tokens_in_cache: Callable[[], int], *, prompt_tokens: int,
                 max_new_tokens: int | None, stop: list[str] | None, eos_ids: set[int]):
        self.tokens_in_cache = tokens_in_cache  # the stream's count, reported in every Response
        self.detok = StreamingDetokenizer(tokenizer) if tokenizer is not None else None
        self.stops = StopMatcher(stop) if stop else None
        self.prompt_tokens, self.max_new_tokens, self.eos_ids = prompt_tokens, max_new_tokens, eos_ids
        self.generated = 0
        self.finished = False

    def wants_token(self) -> bool:
        return self.may_take(self.generated)

    def may_take(self, tokens: int) -> bool:
        """Whether a reply not yet finished, with `tokens` generated or queued, may have one more."""
        return not self.finished and (self.max_new_tokens is None or tokens < self.max_new_tokens)

    def push(self, token: int) -> Response:
        self.generated += 1
        if token in self.eos_ids:
            return self._response(self._held_back(), [token], "eos")
        delta = self.detok.add(token) if self.detok else ""
        if self.stops is not None:
            delta, stopped = self.stops.push(delta)
            if stopped:
                return self._response(delta, [token], "stop")
        return self._response(delta, [token])

    def end(self) -> Response:
        """The final Response of a reply that reached max_new_tokens."""
        return self._response(self._held_back(), [], "length")

    def _response(self, text: str, ids: list[int], reason: str | None = None) -> Response:
        self.finished = reason is not None
        return Response(text, ids, self.prompt_tokens, self.generated, self.tokens_in_cache(), reason)

    def _held_back(self) -> str:
        text = self.detok.flush() if self.detok else ""
        if self.stops is None:
            return text
        emitted, _ = self.stops.push(text)
        return emitted + self.stops.flush()
