"""Text <-> token ids for one checkpoint directory, on top of transformers' tokenizer classes.

Two kinds of directories load, always from local files only (never the hub):

* a Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``): loaded with
  ``PreTrainedTokenizerFast.from_pretrained(dir, local_files_only=True)``, so the file's own
  normalizer / pre-tokenizer / decoder pipeline is used as written;
* a bare sentencepiece ``tokenizer.model`` (Llama-style BPE with byte fallback): its pieces and scores
  are read with the ``sentencepiece`` library and turned into a ``tokenizers`` BPE model wrapped in
  ``PreTrainedTokenizerFast``. transformers 5 can convert such a file itself, but only with the
  ``protobuf`` package installed (without it, it falls back to reading the file as tiktoken and
  fails), and the result depends on the ``tokenizer_class`` named in the config; doing it here needs
  only sentencepiece's public API. A probe string is encoded both ways at load time and a mismatch
  (a Unigram model, NFKC normalization, ...) raises ``CheckpointError``.

Leading spaces (sentencepiece's dummy prefix). Sentencepiece models prepend a space ('▁') to the
start of every text they encode, which breaks streaming: encoding "Hello" then " world" chunk by
chunk would give "▁Hello" + "▁▁world" and decode to "Hello  world". Here ``encode(text)`` is
*verbatim*: no space is added, so ``decode(encode(a) + encode(b)) == a + b`` for any split of a text.
Only ``encode(text, add_bos=True)`` - the start of a document - adds the dummy-prefix space the model
was trained with (``[bos] + tokens(" " + text)``), and ``decode`` drops that one space again right
after a BOS token, so ``decode(encode(t, add_bos=True)) == t`` as well.

Decoding works on bytes: every id maps to the exact bytes it stands for (``token_bytes``: '▁' -> space,
``<0xNN>`` byte pieces -> that byte, byte-level BPE characters -> their bytes, special tokens -> b"")
and a text is the UTF-8 decoding of the joined bytes, invalid or cut sequences becoming U+FFFD
(Python's ``errors="replace"``). The streaming detokenizer feeds the same bytes to an incremental
UTF-8 decoder, which is why both agree exactly.

Special-token strings inside a text (``"<s>"``, ``"<|im_start|>"``) are parsed into their ids, as
transformers does: chat templates rely on it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import CheckpointError, InvalidInputError

# Rendered by render_chat when the tokenizer config has no chat template. One block per message,
# "<|role|>" on its own line, the content on the next lines; add_generation_prompt appends the
# assistant marker. Plain text markers: with a sentencepiece vocabulary they are ordinary text.
PLAIN_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
PLAIN_GENERATION_PROMPT = "<|assistant|>\n"
# Stop strings that end an assistant turn under the plain template (the next turn's marker).
PLAIN_CHAT_STOPS = ("\n<|user|>", "\n<|system|>", "\n<|assistant|>")

CHAT_ROLES = ("system", "user", "assistant")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
SPIECE_SPACE = "\u2581"  # '▁'
# Encoded with sentencepiece and with the converted tokenizer at load time; they must agree.
_PROBE = "Hello  world!\nThe 3 cats, é 日本 🎉 end.  "


class Tokenizer:
    """A checkpoint's tokenizer: verbatim encoding, byte-exact decoding, chat rendering."""

    def __init__(self, hf_tokenizer, backend=None, *, dummy_prefix: bool = False):
        """Wrap a fast transformers tokenizer (prefer ``Tokenizer.from_dir``).

        ``backend``: the ``tokenizers.Tokenizer`` used for encoding; it must add no dummy prefix and
        no BOS/EOS (default: ``hf_tokenizer.backend_tokenizer``). ``dummy_prefix``: the model was
        trained with a space prepended to each document (sentencepiece ``add_dummy_prefix``).
        """
        self.hf = hf_tokenizer  # the transformers tokenizer, for apply_chat_template
        self._backend = backend if backend is not None else hf_tokenizer.backend_tokenizer
        self._dummy_prefix = dummy_prefix
        self._vocab_size = len(hf_tokenizer)
        self._special_ids = frozenset(hf_tokenizer.all_special_ids) | _special_added_ids(self._backend)
        self._to_bytes = _bytes_mapper(self._backend)
        self._bytes_cache: dict[int, bytes] = {}

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path) -> "Tokenizer | None":
        """Load from a local directory; None when it holds no tokenizer.json / tokenizer.model."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return _from_tokenizer_json(cls, path)
        if (path / "tokenizer.model").is_file():
            return _from_sentencepiece(cls, path)
        return None

    # -- properties ------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (base vocabulary + added tokens)."""
        return self._vocab_size

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def dummy_prefix(self) -> bool:
        """True when encode(add_bos=True) prepends a space and decode drops it after BOS."""
        return self._dummy_prefix

    @property
    def chat_stop_strings(self) -> tuple[str, ...]:
        """Stop strings that end an assistant turn: none with a real template (EOS does it)."""
        return () if self.has_chat_template else PLAIN_CHAT_STOPS

    # -- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``, verbatim: no space is prepended, no special token added.

        ``add_bos=True`` starts a document: ``[bos_id]`` (when the tokenizer has one) followed by the
        ids of ``" " + text`` for sentencepiece-style tokenizers (their dummy prefix), else of ``text``.
        """
        if not isinstance(text, str):
            raise InvalidInputError(f"text to encode must be a str, got {type(text).__name__}")
        check_unicode(text)
        if add_bos and self._dummy_prefix and text:  # sentencepiece adds no prefix to ""
            text = " " + text
        ids = self._backend.encode(text, add_special_tokens=False).ids if text else []
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one id stands for; b"" for special tokens (BOS, EOS, ...)."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            self._check_id(token_id)
            cached = b"" if token_id in self._special_ids else self._to_bytes(token_id)
            self._bytes_cache[token_id] = cached
        return cached

    def decode(self, ids) -> str:
        """Text of ``ids``: UTF-8 of the joined token bytes (invalid bytes -> U+FFFD).

        Special tokens produce no text; with a dummy prefix, one space right after a BOS is dropped.
        """
        out: list[str] = []
        segment = bytearray()
        after_bos = False
        for token_id in _as_id_list(ids):
            if token_id == self.bos_id and self._dummy_prefix:
                out.append(_finish_segment(segment, after_bos))
                segment = bytearray()
                after_bos = True
                continue
            segment += self.token_bytes(token_id)
        out.append(_finish_segment(segment, after_bos))
        return "".join(out)

    def _check_id(self, token_id) -> None:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise InvalidInputError(f"token id must be an int, got {type(token_id).__name__}")
        if not 0 <= token_id < self._vocab_size:
            raise InvalidInputError(f"token id {token_id} is outside the vocabulary [0, {self._vocab_size})")

    # -- chat ------------------------------------------------------------------------------------

    def render_chat(self, messages, *, add_generation_prompt: bool = True) -> str:
        """Render chat ``messages`` ([{"role": "system"|"user"|"assistant", "content": str}, ...]).

        With a chat template in the tokenizer config: ``apply_chat_template(tokenize=False)``.
        Without one, the plain template, for example::

            <|system|>
            You are terse.
            <|user|>
            Hi!
            <|assistant|>

        i.e. ``"<|{role}|>\\n{content}\\n"`` per message, then ``"<|assistant|>\\n"`` when
        ``add_generation_prompt``. Replies end at the next marker (``chat_stop_strings``).
        Malformed messages raise InvalidInputError naming the problem.
        """
        messages = validate_messages(messages)
        if self.has_chat_template:
            return self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        text = "".join(PLAIN_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
        return text + (PLAIN_GENERATION_PROMPT if add_generation_prompt else "")


def check_unicode(text: str) -> None:
    """Raise InvalidInputError at the first lone surrogate ('\\udcff': what Python makes of an
    undecodable byte with errors="surrogateescape", e.g. in sys.argv or os.listdir): not text."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(
            f"text has a lone surrogate {text[e.start]!r} at index {e.start}, which is not valid Unicode "
            "(an undecodable byte decoded with errors='surrogateescape'?): decode such input with "
            "errors='replace' first") from None


def validate_messages(messages) -> list[dict]:
    """Check a chat message list; return it as a list of {"role", "content"} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidInputError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidInputError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidInputError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        extra = set(m) - {"role", "content"}
        if extra:
            raise InvalidInputError(f"messages[{i}] has unknown keys {sorted(extra)}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise InvalidInputError(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidInputError(
                f"messages[{i}].content must be a str, got {type(content).__name__}"
            )
        out.append({"role": role, "content": content})
    return out


# -- helpers ---------------------------------------------------------------------------------------


def _as_id_list(ids) -> list:
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()
    if isinstance(ids, int):
        raise InvalidInputError("decode expects a sequence of token ids, got a single int")
    return list(ids)


def _finish_segment(segment: bytearray, after_bos: bool) -> str:
    text = segment.decode("utf-8", errors="replace")
    return text[1:] if after_bos and text.startswith(" ") else text


def _read_config(path: Path) -> dict:
    f = path / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return cfg


def _token_str(value) -> str | None:
    """A special token from tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_added_ids(backend) -> frozenset:
    return frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)


def _from_tokenizer_json(cls, path: Path) -> Tokenizer:
    from transformers import PreTrainedTokenizerFast

    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; name the file either way
        raise CheckpointError(f"{path / 'tokenizer.json'}: cannot be loaded ({e})") from e
    spec = json.loads(hf.backend_tokenizer.to_str())
    dummy_prefix = _strip_dummy_prefix(spec)
    spec["post_processor"] = None  # BOS/EOS are added by Tokenizer.encode, never implicitly
    from tokenizers import Tokenizer as _Backend

    return cls(hf, _Backend.from_str(json.dumps(spec)), dummy_prefix=dummy_prefix)


def _strip_dummy_prefix(spec: dict) -> bool:
    """Remove the prepended '▁' from a tokenizer.json spec in place; True if there was one."""
    found = False

    def walk(node, key):
        nonlocal found
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind == "Sequence":
            items = [walk(n, key) for n in node.get(key, [])]
            node[key] = [n for n in items if n is not None]
            return node
        if kind == "Prepend" and node.get("prepend") == SPIECE_SPACE:
            found = True
            return None
        if kind == "Metaspace":
            if node.get("prepend_scheme", "never") != "never" or node.get("add_prefix_space"):
                found = True
            node["prepend_scheme"] = "never"
            node.pop("add_prefix_space", None)
        return node

    spec["normalizer"] = walk(spec.get("normalizer"), "normalizers")
    spec["pre_tokenizer"] = walk(spec.get("pre_tokenizer"), "pretokenizers")
    return found


def _from_sentencepiece(cls, path: Path) -> Tokenizer:
    import sentencepiece as spm
    from tokenizers import Tokenizer as _Backend
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_file = path / "tokenizer.model"
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(model_file))
    except Exception as e:
        raise CheckpointError(f"{model_file}: not a sentencepiece model ({e})") from None
    n = sp.GetPieceSize()
    vocab = {sp.IdToPiece(i): i for i in range(n)}
    special = [sp.IdToPiece(i) for i in range(n) if sp.IsControl(i) or sp.IsUnknown(i)]
    unk = sp.IdToPiece(sp.unk_id()) if sp.unk_id() >= 0 else None
    backend = _Backend(
        models.BPE(vocab=vocab, merges=_bpe_merges(sp, set(special)), unk_token=unk,
                   fuse_unk=True, byte_fallback=True)
    )
    # verbatim: '▁' for spaces, no prepended space (see module docstring), no BOS/EOS post-processor
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )

    cfg = _read_config(path)
    tokens = {}
    for name, sp_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                        ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())):
        value = _token_str(cfg.get(name)) or (sp.IdToPiece(sp_id) if sp_id >= 0 else None)
        if value is not None:
            tokens[name] = value
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=cfg.get("chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(1e30),
        **tokens,
    )
    if special:  # control pieces (<s>, </s>, ...) are atomic and produce no text
        hf.add_special_tokens({"additional_special_tokens": [t for t in special if t not in tokens.values()]})

    dummy_prefix = sp.EncodeAsPieces("a")[0].startswith(SPIECE_SPACE)
    tok = cls(hf, dummy_prefix=dummy_prefix)
    expected = sp.EncodeAsIds(_PROBE)
    got = tok.encode(_PROBE, add_bos=True)[1 if tok.bos_id is not None else 0:]
    if got != expected:
        raise CheckpointError(
            f"{model_file}: this sentencepiece model does not convert to a byte-fallback BPE tokenizer "
            "(Unigram model or non-identity normalization?); provide a tokenizer.json"
        )
    return tok


def _bpe_merges(sp, skip: set) -> list[tuple[str, str]]:
    """BPE merge list of a sentencepiece BPE model: each piece split into two known pieces.

    Sentencepiece BPE scores pieces by merge order (higher = earlier), so merges are ranked by the
    score of the piece they produce; ties broken by the ids of the two halves.
    """
    vocab = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}
    ranked = []
    for piece, pid in vocab.items():
        if piece in skip or sp.IsByte(pid) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                ranked.append((-sp.GetScore(pid), vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# -- id -> bytes -----------------------------------------------------------------------------------


def _bytes_mapper(backend):
    """A function id -> bytes that matches the backend's decoder for the decoders we know.

    Sentencepiece-style (Replace '▁'->' ' / Metaspace, ByteFallback) and byte-level BPE (ByteLevel)
    are exact. Any other decoder falls back to decoding the id alone.
    """
    spec = json.loads(backend.to_str())
    kinds = _decoder_kinds(spec.get("decoder"))
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}

    if "ByteLevel" in kinds:
        table = _unicode_to_byte()

        def to_bytes(i):
            if i in added:
                return added[i].encode("utf-8")
            piece = backend.id_to_token(i)
            return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode("utf-8")

        return to_bytes

    if kinds & {"Replace", "Metaspace"} and ("ByteFallback" in kinds or "Metaspace" in kinds):
        byte_fallback = "ByteFallback" in kinds

        def to_bytes(i):
            if i in added:
                return added[i].encode("utf-8")
            piece = backend.id_to_token(i)
            if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            return piece.replace(SPIECE_SPACE, " ").encode("utf-8")

        return to_bytes

    return lambda i: backend.decode([i], skip_special_tokens=False).encode("utf-8")


def _decoder_kinds(node) -> set:
    if not isinstance(node, dict):
        return set()
    if node.get("type") == "Sequence":
        return set().union(*(_decoder_kinds(n) for n in node.get("decoders", [])))
    return {node.get("type")}


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict:
    """Inverse of GPT-2's byte -> printable unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}
