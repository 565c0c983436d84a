"""The generation loop in three layers: token ids -> response objects -> a string.

`token_steps` samples one id at a time from a session's next-token logits and ingests it (so the
cache always holds everything produced, and a stopped reply can be continued); `responses` turns
ids into UTF-8-safe text deltas, holds back possible stop-string prefixes and reports counters and
the finish reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from .detokenizer import StreamingDetokenizer
from .sampling import SamplingParams, apply_repetition_penalty, sample
from .stops import StopMatcher

if TYPE_CHECKING:
    from .session import Session


@dataclass
class Response:
    """One step of a streamed reply."""

    text: str  # UTF-8-safe text delta (may be "")
    token_ids: list[int]  # ids produced in this step
    prompt_tokens: int  # tokens fed for this call's prompt
    generated_tokens: int  # tokens generated so far in this call
    tokens_in_cache: int
    finish_reason: str | None = None  # None while running; "eos" | "stop" | "length" at the end


def token_steps(session: "Session", params: SamplingParams, generator: torch.Generator) -> Iterator[int]:
    """Endless ids sampled from the session's next-token logits; each is ingested before it is yielded."""
    while True:
        logits = session.next_logits[None]  # [1, V]
        if params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, session.recent_ids()[None], params.repetition_penalty)
        token = int(sample(logits, params, generator)[0])
        session.ingest([token])
        yield token


def responses(
    session: "Session", steps: Iterator[int], *, prompt_tokens: int, max_new_tokens: int | None,
    stop: list[str] | None, eos_ids: set[int],
) -> Iterator[Response]:
    """Wrap an id stream into Responses, stopping on EOS, a stop string or `max_new_tokens`."""
    tokenizer = session.runtime.tokenizer
    detok = StreamingDetokenizer(tokenizer) if tokenizer is not None else None
    stops = StopMatcher(stop) if stop else None
    generated = 0

    def response(text: str, ids: list[int], reason: str | None = None) -> Response:
        return Response(text, ids, prompt_tokens, generated, session.tokens_in_cache(), reason)

    def held_back() -> str:
        text = detok.flush() if detok else ""
        if stops is None:
            return text
        emitted, _ = stops.push(text)
        return emitted + stops.flush()

    while max_new_tokens is None or generated < max_new_tokens:
        token = next(steps)
        generated += 1
        if token in eos_ids:
            yield response(held_back(), [token], "eos")
            return
        delta = detok.add(token) if detok else ""
        if stops is not None:
            delta, stopped = stops.push(delta)
            if stopped:
                yield response(delta, [token], "stop")
                return
        yield response(delta, [token])
    yield response(held_back(), [], "length")
