"""Session.score / score_chunks: log p of every fed token, equal to log_softmax of feed()'s logits.

A tiny random model (std 0.2, so a wrong row or an off-by-one changes the numbers a lot), a 2+30 slot
cache and 8-token chunks: the scored text crosses many chunk boundaries and evictions.
"""

from __future__ import annotations

import io
import random

import pytest
import torch

import streaming
from streaming.errors import InvalidInputError, SessionBusyError
from streaming.text_pieces import word_aligned
from tests.tiny_checkpoint import make_tiny_checkpoint
from tests.tiny_tokenizer import TRAINING_LINES

CACHE = dict(sinks=2, window=30, chunk=8)
TEXT = " ".join(random.Random(3).choice(TRAINING_LINES) for _ in range(6))  # ~150 tokens: 5 windows


@pytest.fixture(scope="module", params=["lckv", "plain"])
def runtime(request, tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, std=0.2)
    return streaming.load(path, device="cpu", dtype="float32")


def reference_scores(runtime, prefix: list[int], ids: list[int]) -> torch.Tensor:
    """log_softmax of feed(..., return_logits=True) gathered at the next tokens, after `prefix`."""
    s = runtime.session(**CACHE)
    rows = []
    if prefix:
        rows.append(s.feed(prefix, return_logits=True)[-1:])  # predicts ids[0]
    rows.append(s.feed(ids, return_logits=True)[:-1])  # row j predicts ids[j + 1]
    lp = torch.log_softmax(torch.cat(rows), dim=-1)
    targets = torch.tensor(ids if prefix else ids[1:])
    return lp.gather(1, targets[:, None])[:, 0]


def test_score_of_text_equals_log_softmax_of_feed_logits(runtime):
    ids = runtime.tokenizer.encode(TEXT, add_bos=True)
    assert len(ids) > 4 * (CACHE["sinks"] + CACHE["window"])  # many evictions
    s = runtime.session(**CACHE)
    lp = s.score(TEXT)
    expected = reference_scores(runtime, [], ids)
    assert lp.dtype == torch.float32 and lp.device.type == "cpu"
    assert lp.shape == (len(ids) - 1,)  # every token but the BOS, which has no prediction
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-5)
    assert lp.std() > 0.5  # the random model's scores vary: agreement is not an accident
    assert s.stats().tokens_seen == len(ids)


@pytest.mark.parametrize("prefix_len", [1, 13])  # one token (a BOS) / a prefix that leaves a partial chunk
def test_score_in_a_session_that_already_holds_tokens(runtime, prefix_len):
    rng = random.Random(prefix_len)
    vocab = runtime.config.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    ids = [rng.randrange(3, vocab) for _ in range(90)]
    s = runtime.session(**CACHE)
    s.feed(prefix)
    lp = s.score(ids)
    assert lp.shape == (len(ids),)  # the first id is predicted by the prefix
    torch.testing.assert_close(lp, reference_scores(runtime, prefix, ids), rtol=1e-5, atol=1e-5)
    # The stream goes on as if fed: the next prediction equals a session fed the same ids.
    ref = runtime.session(**CACHE)
    ref.feed(prefix)
    ref.feed(ids)
    torch.testing.assert_close(s.next_logits, ref.next_logits)
    assert s.stats() == ref.stats()


def test_score_of_ids_in_an_empty_session_skips_only_the_first(runtime):
    ids = runtime.tokenizer.encode(TEXT, add_bos=True)[:50]
    lp = runtime.session(**CACHE).score(ids)
    torch.testing.assert_close(lp, reference_scores(runtime, [], ids), rtol=1e-5, atol=1e-5)
    assert runtime.session(**CACHE).score([]).shape == (0,)
    assert runtime.session(**CACHE).score(ids[:1]).shape == (0,)


def test_score_chunks_of_text_pieces_equal_the_whole_text(runtime):
    whole = runtime.session(**CACHE).score(TEXT)
    cuts = {
        "7-char blocks": (TEXT[i : i + 7] for i in range(0, len(TEXT), 7)),
        "file lines": io.StringIO(TEXT.replace(". ", ".\n")),
        "list of pieces": [TEXT[:40], TEXT[40:41], TEXT[41:]],
    }
    for name, pieces in cuts.items():
        s = runtime.session(**CACHE)
        chunks = list(s.score_chunks(pieces))
        expected = whole if name != "file lines" else runtime.session(**CACHE).score(TEXT.replace(". ", ".\n"))
        assert all(1 <= len(c) <= CACHE["chunk"] for c in chunks), name
        torch.testing.assert_close(torch.cat(chunks), expected, rtol=1e-6, atol=1e-6, msg=name)


def test_score_chunks_yield_chunk_by_chunk_and_keep_the_session_busy(runtime):
    s = runtime.session(**CACHE)
    it = s.score_chunks(TEXT)
    first = next(it)
    assert len(first) == CACHE["chunk"] - 1  # the first chunk's BOS is not scored
    assert s.stats().tokens_seen == CACHE["chunk"]  # ingested chunk by chunk, not all at once
    with pytest.raises(SessionBusyError):
        s.feed("more")
    it.close()
    s.feed("more")


def test_bad_scoring_input_names_the_problem(runtime):
    s = runtime.session(**CACHE)
    with pytest.raises(InvalidInputError, match="bytes"):
        s.score(b"raw bytes")
    with pytest.raises(InvalidInputError, match="str"):
        s.score(iter(["text", b"bytes"]))
    with pytest.raises(InvalidInputError, match="token id"):
        s.score([runtime.config.vocab_size])
    with pytest.raises(InvalidInputError, match="iterable"):
        s.score(3.5)


def test_word_aligned_pieces_join_back_and_tokenize_like_the_whole(runtime):
    tok = runtime.tokenizer
    rng = random.Random(0)
    text = "  ".join(rng.sample(TRAINING_LINES, 20)) + "  tail  with   spaces \n"
    for trial in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 30))
        blocks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        pieces = list(word_aligned(blocks))
        assert "".join(pieces) == text
        for piece in pieces[1:]:  # each cut sits right before a single space between non-spaces
            assert piece[0] == " " and not piece[1].isspace()
        ids = tok.encode(pieces[0], add_bos=True) + [i for p in pieces[1:] for i in tok.encode(p)]
        assert ids == tok.encode(text, add_bos=True), trial
    # No usable space for more than max_carry characters: cut hard rather than hold it all.
    assert list(word_aligned(["x" * 10] * 5, max_carry=25)) == ["x" * 30, "x" * 20]
