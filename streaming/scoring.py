"""Scoring text in constant memory: log p of every fed token, one chunk's logits at a time.

`Session.score` and `Session.score_chunks` are thin wrappers around these functions. Text is
tokenized in pieces re-cut just before single spaces (where the tokenizer splits anyway) and the ids
are grouped into full chunks, so the scores do not depend on where the pieces were cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from .errors import InvalidInputError
from .text_pieces import blocks, word_aligned

if TYPE_CHECKING:
    from .session import Session


def score(session: "Session", source) -> torch.Tensor:
    """All scores of `source` as float32 [n] on the CPU (see `Session.score`)."""
    out, n = torch.empty(0), 0
    for lp in score_chunks(session, source):
        # Grow by doubling: a few large buffers. (Keeping one small tensor per chunk between the chunks'
        # freed logits fragmented the heap: +280 MB RSS over 96k tokens with an 8k vocabulary.)
        if n + len(lp) > len(out):
            grown = torch.empty(max(2 * len(out), n + len(lp), 4096))
            grown[:n] = out[:n]
            out = grown
        out[n : n + len(lp)] = lp
        n += len(lp)
    return out[:n].clone()


def score_chunks(session: "Session", source) -> Iterator[torch.Tensor]:
    """Scores of `source` one ingestion step at a time (see `Session.score_chunks`)."""
    runtime = session.runtime
    if isinstance(source, (bytes, bytearray)):
        raise InvalidInputError("score_chunks needs text, not bytes: decode it (or open the file in text mode)")
    if isinstance(source, str):  # tokenized block by block: the tokenizer's per-token records stay small
        runtime.require_tokenizer()
        return _score(session, _encode_pieces(session, blocks(source)))
    if isinstance(source, torch.Tensor) or (
        isinstance(source, (list, tuple)) and not (source and isinstance(source[0], str))
    ):
        return _score(session, [runtime.check_ids(source)])
    try:
        pieces = iter(source)
    except TypeError:
        raise InvalidInputError(
            f"expected text, token ids or an iterable of text pieces, got {type(source).__name__}"
        ) from None
    runtime.require_tokenizer()
    return _score(session, _encode_pieces(session, pieces))


def _encode_pieces(session: "Session", pieces: Iterator[str]) -> Iterator[list[int]]:
    """Ids of word-aligned text pieces; the first one starts with BOS when the session is empty."""
    tokenizer = session.runtime.tokenizer
    at_start = session.stats().tokens_seen == 0  # read when the first piece is needed, under the lock
    for text in word_aligned(pieces):
        yield tokenizer.encode(text, add_bos=at_start and tokenizer.bos_id is not None)
        at_start = False


def _score(session: "Session", id_lists: Iterable[list[int]]) -> Iterator[torch.Tensor]:
    """Ingest the ids in full chunks (however the lists are cut) and yield each chunk's scores."""
    chunk = session.chunk
    exclusive = session._exclusive()
    with exclusive:
        pending: list[int] = []  # fewer than `chunk` ids waiting for the next list
        for ids in id_lists:
            start = 0
            if pending:
                start = chunk - len(pending)
                pending.extend(ids[:start])
                if len(pending) < chunk:
                    continue
                yield from _score_step(session, pending)
            while len(ids) - start >= chunk:
                yield from _score_step(session, ids[start : start + chunk])
                start += chunk
            pending = list(ids[start:])
        if pending:
            yield from _score_step(session, pending)


def _score_step(session: "Session", ids: list[int]) -> Iterator[torch.Tensor]:
    """Ingest ids (at most one chunk); yield log p of each one that has a prediction, float32 [k] CPU."""
    before = session.next_logits  # [V]: predicts ids[0]; None in an empty session
    if before is not None:
        before = before.clone()  # the engine overwrites the row's logits in the step
    target = torch.tensor(ids, dtype=torch.long, device=session.runtime.device)
    scored = []

    def collect(logits):  # logits [c, V]: row j predicts ids[j + 1] (a graph buffer: use it now)
        scored.append(log_probs(logits[:-1], target[1:]))

    session.ingest(ids, on_logits=collect)
    out = scored[0]
    if before is not None:
        out = torch.cat([log_probs(before[None], target[:1]), out])
    if len(out):
        yield out.cpu()


def log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[j, targets[j]] for logits [k, V], targets [k]: float32 [k], without a [k, V] copy."""
    logits = logits.float()
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
