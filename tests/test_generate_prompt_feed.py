"""`sinkstream generate` feeds a long prompt in pieces: stdin is read a block at a time, and the reply
is the one the whole prompt given to `Session.generate` at once gives (same ids, same chunks)."""

from __future__ import annotations

import io
import sys

import pytest

import streaming
from apps import cli, prompt_feed
from streaming.text_pieces import blocks
from tests.test_cli import model_args, sinkstream
from tests.tiny_tokenizer import TRAINING_LINES

WINDOW, CHUNK = 60, 16  # as model_args: the prompt below spans dozens of chunks and evicts
PROMPT = " ".join(TRAINING_LINES[:12]) + "  two  spaces,\ttabs\nand lines \n" + " ".join(TRAINING_LINES[12:24])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "lckv")


@pytest.fixture(scope="module")
def whole_prompt_reply(ckpt):
    """The reference: the whole prompt handed to Session.generate in one call (greedy)."""
    rt = streaming.load(ckpt, device="cpu", dtype="float32")
    return rt.session(sinks=4, window=WINDOW, chunk=CHUNK).generate_text(PROMPT, max_new_tokens=12, temperature=0)


def test_a_prompt_fed_in_pieces_gives_the_whole_prompts_reply(ckpt, whole_prompt_reply):
    rt = streaming.load(ckpt, device="cpu", dtype="float32")
    for size in (7, 100, 5000):  # pieces cut inside words, and larger than a chunk's text
        s = rt.session(sinks=4, window=WINDOW, chunk=CHUNK)
        last, fed = prompt_feed.feed_prompt(s, blocks(PROMPT, size))
        assert fed % CHUNK == 0 and 1 <= len(last) <= CHUNK
        assert fed + len(last) == len(rt.tokenizer.encode(PROMPT, add_bos=True))
        assert s.generate_text(last, max_new_tokens=12, temperature=0) == whole_prompt_reply


def test_generate_from_stdin_gives_the_whole_prompts_reply(ckpt, whole_prompt_reply):
    for source in (dict(input=PROMPT), dict(prompt=PROMPT)):
        args = ["generate", *([source["prompt"]] if "prompt" in source else ["-"]), *model_args(ckpt),
                "--dtype", "float32", "-n", 12]
        r = sinkstream(*args, input=source.get("input"))
        assert r.returncode == 0, r.stderr
        assert r.stdout == whole_prompt_reply


class RecordingStdin:
    """sys.stdin stand-in over `data` that records the size of every read."""

    def __init__(self, data: bytes) -> None:
        self.reads: list[int] = []
        self.buffer = self
        self._raw = io.BytesIO(data)
        self._text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")

    def read1(self, size: int = -1) -> bytes:
        data = self._raw.read1(size)
        self.reads.append(len(data))
        return data

    def read(self, size: int = -1) -> str:  # the text layer (a prompt read whole)
        text = self._text.read(size)
        self.reads.append(len(text.encode()))
        return text

    def reconfigure(self, **kw) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_stdin_is_read_a_block_at_a_time(ckpt, whole_prompt_reply, monkeypatch, capsys):
    data = PROMPT.encode()
    monkeypatch.setattr(prompt_feed, "BLOCK_BYTES", 256)  # so a test-sized prompt spans many blocks
    stdin = RecordingStdin(data)
    monkeypatch.setattr(sys, "stdin", stdin)
    code = cli.main(["generate", "-", *map(str, model_args(ckpt)), "--dtype", "float32", "-n", "12",
                     "--threads", "1"])
    assert code == 0
    assert sum(stdin.reads) == len(data)
    assert max(stdin.reads) <= 256  # never the whole prompt at once
    assert capsys.readouterr().out == whole_prompt_reply
