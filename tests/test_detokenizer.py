"""StreamingDetokenizer: deltas concatenate to Tokenizer.decode, never a cut character, O(1) state."""

import random

import pytest

from streaming.detokenizer import StreamingDetokenizer
from streaming.tokenizer import Tokenizer
from tests.tiny_tokenizer import make_byte_level_tokenizer, make_tiny_tokenizer

MULTILINGUAL = [
    "Hello, world! The quick brown fox.",
    "Ünïcödé façade naïve café",
    "日本語のテキストです。中文也可以。",
    "Привет, мир! Γειά σου κόσμε",
    "emoji 🎉🎉 and 👩‍👩‍👧 family 🇫🇷",
    "  spaces   inside\tand\nnewlines\n\n",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def stream(tok, ids):
    detok = StreamingDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush()


def test_encoded_text_streams_back_exactly(tok):
    for text in MULTILINGUAL:
        for add_bos in (False, True):
            ids = tok.encode(text, add_bos=add_bos)
            deltas, tail = stream(tok, ids)
            assert "".join(deltas) + tail == tok.decode(ids) == text
            assert tail == ""  # valid text leaves nothing held back
            assert all("\ufffd" not in d for d in deltas)  # never a cut multi-byte character


def test_partial_characters_are_held_back(tok):
    ids = tok.encode("🎉")  # four byte pieces
    detok = StreamingDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["", "", "", "🎉"]
    detok = StreamingDetokenizer(tok)
    for i in ids[:2]:
        detok.add(i)
    assert detok.flush() == "\ufffd"  # end of stream inside a character: one replacement


def test_sentencepiece_spaces(tok):
    ids = tok.encode("Hello world and more", add_bos=True)
    deltas, _ = stream(tok, ids)
    assert deltas[0] == ""  # BOS
    assert "".join(deltas) == "Hello world and more"
    assert any(d.startswith(" ") for d in deltas[2:])  # '▁' pieces become real spaces


@pytest.mark.parametrize("seed", range(5))
def test_random_ids_match_decode(tok, seed):
    rng = random.Random(seed)
    byte_ids = [i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1 and tok.token_bytes(i)[0] >= 0x80]
    for _ in range(20):
        n = rng.randint(1, 60)
        # half random ids, half high bytes: many cut and invalid UTF-8 sequences
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(tok.vocab_size) for _ in range(n)]
        deltas, tail = stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids)


def test_random_ids_byte_level(tmp_path):
    tok = Tokenizer.from_dir(make_byte_level_tokenizer(tmp_path))
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        deltas, tail = stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids)
    for text in MULTILINGUAL:
        ids = tok.encode(text)
        deltas, tail = stream(tok, ids)
        assert "".join(deltas) + tail == text and all("\ufffd" not in d for d in deltas)


def test_state_stays_bounded(tok):
    # 10k tokens, including long runs of invalid bytes: held-back state never exceeds 3 bytes
    rng = random.Random(1)
    cont = tok.encode("é")[1]  # a lone continuation byte (0xA9) is never valid on its own
    lead = tok.encode("日")[0]  # 0xE6 opens a 3-byte character
    detok = StreamingDetokenizer(tok)
    worst = 0
    for _ in range(10_000):
        detok.add(rng.choice([cont, lead, lead, rng.randrange(tok.vocab_size)]))
        worst = max(worst, detok.pending_bytes)
    assert worst <= 3
    assert 0 < worst  # the test did exercise held-back bytes


def test_reset_forgets_pending(tok):
    detok = StreamingDetokenizer(tok)
    detok.add(tok.encode("日")[0])
    assert detok.pending_bytes == 1
    detok.reset()
    assert detok.pending_bytes == 0 and detok.flush() == ""
