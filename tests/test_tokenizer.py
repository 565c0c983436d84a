"""Tokenizer: loading from local files, verbatim chunk-safe encoding, byte-exact decoding, chat."""

import pytest
import sentencepiece as spm

from streaming.errors import CheckpointError, InvalidInputError
from streaming.tokenizer import PLAIN_CHAT_STOPS, Tokenizer, _bpe_merges
from tests.tiny_tokenizer import TRAINING_LINES, make_byte_level_tokenizer, make_tiny_tokenizer

TEXTS = TRAINING_LINES[:20] + [
    "  two  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\n",
    "Ünïcödé façade naïve",
    "日本語のテキストです",
    "emoji 🎉🎉 and 👩‍👩‍👧 family",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def sp(tiny_dir):
    return spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))


def test_from_dir_without_files_is_none(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert Tokenizer.from_dir(tmp_path) is None


def test_properties(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.vocab_size == 512
    assert tok.dummy_prefix
    assert not tok.has_chat_template
    assert tok.chat_stop_strings == PLAIN_CHAT_STOPS


def test_document_encoding_matches_sentencepiece(tok, sp):
    # add_bos=True = start of a document: BOS + exactly what sentencepiece produces
    for text in TEXTS:
        assert tok.encode(text, add_bos=True) == [1] + sp.encode(text), text


def test_roundtrip(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, add_bos=True)) == text


def test_encode_is_verbatim_no_leading_space_artefact(tok):
    # chunk-by-chunk encoding must decode to the joined text: no dummy space per chunk
    text = "The quick brown fox jumps over the lazy dog. 日本 🎉 ok"
    for cut_every in (1, 3, 7):
        chunks = [text[i:i + cut_every] for i in range(0, len(text), cut_every)]
        ids = [i for c in chunks for i in tok.encode(c)]
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("Hello") + tok.encode("world")) == "Helloworld"
    assert tok.decode(tok.encode("Hello") + tok.encode(" world")) == "Hello world"
    assert tok.encode("") == []
    assert tok.encode("", add_bos=True) == [1]


def test_decode_skips_special_tokens_and_drops_space_after_bos(tok):
    ids = tok.encode("Hi there", add_bos=True) + [tok.eos_id]
    assert tok.decode(ids) == "Hi there"
    # a BOS in the middle starts a new document: its dummy-prefix space is dropped again
    assert tok.decode(tok.encode("One.", add_bos=True) + tok.encode("Two.", add_bos=True)) == "One.Two."


def test_byte_fallback_decoding_is_utf8_safe(tok):
    ids = tok.encode("日")  # three <0xNN> byte pieces
    assert [tok.token_bytes(i) for i in ids] == [b"\xe6", b"\x97", b"\xa5"]
    assert tok.decode(ids[:2]) == "\ufffd"  # a cut character decodes to one replacement char
    assert tok.decode(ids) == "日"


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        tok.decode([5, 512])
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(InvalidInputError, match="must be an int"):
        tok.decode([1.5])
    with pytest.raises(InvalidInputError, match="must be a str"):
        tok.encode(b"bytes")


def test_decode_accepts_tensors(tok):
    import torch

    ids = tok.encode("Hello world")
    assert tok.decode(torch.tensor(ids)) == "Hello world"


def test_plain_chat_template(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.render_chat(messages)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\nHello.\n<|user|>\nBye\n<|assistant|>\n"
    assert tok.render_chat(messages, add_generation_prompt=False).endswith("<|user|>\nBye\n")
    assert tok.decode(tok.encode(text)) == text  # markers are plain text for this vocabulary


def test_jinja_chat_template(tmp_path):
    tok = Tokenizer.from_dir(make_tiny_tokenizer(tmp_path, with_chat_template=True))
    assert tok.has_chat_template and tok.chat_stop_strings == ()
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "### user:\nhi\n### assistant:\n"
    assert tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "### user:\nhi\n"


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "must be a list"),
        ([], "empty"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\].role"),
        ([{"content": "x"}], r"messages\[0\].role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\].content"),
        ([{"role": "user", "content": "x", "extra": 1}], "unknown keys"),
    ],
)
def test_chat_validation(tok, messages, match):
    with pytest.raises(InvalidInputError, match=match):
        tok.render_chat(messages)


def test_tokenizer_json_llama_style(tiny_dir, sp, tmp_path):
    # a tokenizer.json as transformers writes it for Llama (Metaspace prepend "first", Strip decoder)
    from transformers import LlamaTokenizer

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    hf = LlamaTokenizer(vocab=vocab, merges=_bpe_merges(sp, {"<unk>", "<s>", "</s>"}), legacy=False)
    hf.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.dummy_prefix and (tok.bos_id, tok.eos_id) == (1, 2)
    for text in TEXTS:
        assert tok.encode(text, add_bos=True) == [1] + sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text
        if not text.startswith(" "):  # HF's own decode strips a leading space
            assert tok.decode(tok.encode(text)) == hf.decode(tok.encode(text))


def test_tokenizer_json_byte_level(tmp_path):
    tok = Tokenizer.from_dir(make_byte_level_tokenizer(tmp_path))
    assert not tok.dummy_prefix and tok.bos_id is None and tok.eos_id == 0
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text == tok.hf.decode(ids)
        assert tok.encode(text, add_bos=True) == ids  # no BOS token, no dummy prefix
    assert b"".join(tok.token_bytes(i) for i in tok.encode("日本")) == "日本".encode()


def test_unconvertible_sentencepiece_model_is_rejected(tmp_path):
    # a Unigram model cannot be expressed as the BPE we build: refuse instead of mis-tokenizing
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_LINES), model_writer=buf, model_type="unigram", vocab_size=400,
        byte_fallback=True, minloglevel=2, num_threads=1,
    )
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_garbage_model_file_is_rejected(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


def test_text_with_a_lone_surrogate_is_invalid_input_naming_it(tok):
    # What Python makes of an undecodable byte with errors="surrogateescape" (sys.argv, os.listdir).
    with pytest.raises(InvalidInputError, match=r"lone surrogate '\\udcff' at index 4"):
        tok.encode("abc \udcff def")
    assert tok.encode("abc \ufffd def") == tok.encode("abc \ufffd def")  # U+FFFD itself is fine


def test_session_text_with_a_lone_surrogate_is_invalid_input():
    import streaming

    s = streaming.load(device="cpu").session(sinks=2, window=16)
    for call in (lambda: s.feed("abc \udcff"), lambda: s.generate("abc \udcff", max_new_tokens=1),
                 lambda: s.chat([{"role": "user", "content": "hi \udcff"}], max_new_tokens=1)):
        with pytest.raises(InvalidInputError, match="lone surrogate"):
            call()
    assert s.stats().tokens_seen == 0  # nothing was fed
