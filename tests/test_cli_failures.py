"""The console script when something around it fails: undecodable arguments, a checkpoint without
tokenizer, a full disk under stdout or --ppl-jsonl, impossible sampling flags, a cache larger than
memory. Each ends as one `error:` (or `warning:`) line, never a traceback."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.test_cli import ENV, SINKSTREAM, model_args, sinkstream

COMMANDS_WITH_SAMPLING = ("generate", "chat", "stream")
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "lckv")


def run_raw(args: list, *, stdin: bytes = b"", stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """The console script with raw bytes in argv and on stdin (sinkstream() passes text)."""
    argv = SINKSTREAM + [a if isinstance(a, bytes) else str(a).encode() for a in args]
    r = subprocess.run(argv, input=stdin, stdout=stdout, stderr=subprocess.PIPE, env=ENV, timeout=120)
    r.stderr = r.stderr.decode("utf-8", "replace")
    r.stdout = (r.stdout or b"").decode("utf-8", "replace")
    return r


def one_error_line(r, needle: str) -> None:
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr


def test_undecodable_argument_bytes_are_replaced_with_a_warning(ckpt):
    warning = "warning: PROMPT had 2 invalid utf-8 byte(s); replaced with U+FFFD"
    bad = run_raw(["generate", b"Hello \xff\xfe world", *model_args(ckpt), "-n", 5])
    assert bad.returncode == 0, bad.stderr
    assert bad.stderr.count(warning) == 1, bad.stderr
    # The same reply as for the replacement characters typed in.
    same = sinkstream("generate", "Hello \ufffd\ufffd world", *model_args(ckpt), "-n", 5)
    assert same.returncode == 0 and same.stdout == bad.stdout and "warning" not in same.stderr

    chat = run_raw(["chat", "--system", b"sys \xff", *model_args(ckpt), "-n", 3], stdin=b"hi\n")
    assert chat.returncode == 0 and "error" not in chat.stdout, chat.stderr + chat.stdout
    assert "warning: --system had 1 invalid utf-8 byte(s)" in chat.stderr

    stream = run_raw(["stream", "--question", b"why \xff?", "--no-progress", *model_args(ckpt), "-n", 3],
                     stdin=b"Some document text to read.")
    assert stream.returncode == 0, stream.stderr
    assert "warning: --question had 1 invalid utf-8 byte(s)" in stream.stderr


def test_every_text_command_without_a_tokenizer_is_one_error_line(tmp_path):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    bare = make_tiny_checkpoint(tmp_path, "plain", with_tokenizer=False)
    for command in ("generate", "chat", "stream"):
        r = run_raw([command, *(["x"] if command == "generate" else []), "--model", bare, "-n", 2],
                    stdin=b"some text\n")
        one_error_line(r, "no tokenizer")


@needs_dev_full
def test_a_full_disk_under_stdout_is_one_error_line(ckpt):
    with open("/dev/full", "wb") as full:
        for args, stdin in (
            (["generate", "Hello", "-n", 5], b""),
            (["chat", "-n", 5], b"hello\n"),
            (["stream", "--no-progress", "--continue", "-n", 5], b"A document to continue."),
            (["stream", "--no-progress", "--ppl-jsonl", "-", "--segment", 2], b"A document to score."),
        ):
            r = run_raw([*args, *model_args(ckpt)], stdin=stdin, stdout=full)
            one_error_line(r, "cannot write to stdout: No space left on device")


@needs_dev_full
def test_a_full_disk_under_ppl_jsonl_is_one_error_line(ckpt):
    r = run_raw(["stream", "--no-progress", "--ppl-jsonl", "/dev/full", "--segment", 2, *model_args(ckpt)],
                stdin=b"A document to score, long enough for a few segments.")
    one_error_line(r, "cannot write --ppl-jsonl /dev/full: No space left on device")


@pytest.mark.parametrize("flag,value,needle", [
    ("--temperature", -1, "temperature must be >= 0"),
    ("--top-p", 1.5, "top_p must be in (0, 1]"),
    ("--top-k", -2, "top_k must be >= 0"),
    ("--repetition-penalty", 0, "repetition_penalty must be > 0"),
    ("--temperature", "nan", "temperature must be a finite number"),
    ("--seed", 2**70, "--seed must be between"),
    ("--stop", "", "--stop needs a non-empty string"),
])
def test_bad_sampling_flags_are_refused_before_the_model_loads(tmp_path, flag, value, needle):
    # A checkpoint that does not exist: the flag must be refused before any load is tried.
    missing = tmp_path / "no-such-model"
    for command in COMMANDS_WITH_SAMPLING:
        extra = ["x"] if command == "generate" else ["--continue"] if command == "stream" else []
        r = run_raw([command, *extra, "--model", missing, flag, value], stdin=b"a document\n")
        one_error_line(r, needle)


def test_chat_with_a_bad_temperature_exits_with_an_error_not_error_replies(ckpt):
    r = sinkstream("chat", *model_args(ckpt)[:-2], "--temperature", -1, input="hello\nagain\n")
    one_error_line(r, "temperature must be >= 0")
    assert "[error" not in r.stdout


def test_a_window_larger_than_memory_is_one_error_line_with_the_sizes(ckpt):
    for command, stdin in (("generate", b""), ("chat", b"hi\n"), ("stream", b"text")):
        extra = ["x"] if command == "generate" else []
        r = run_raw([command, *extra, "--model", ckpt, "--device", "cpu", "--window", 10**11, "-n", 2],
                    stdin=stdin)
        one_error_line(r, "GiB but cpu has")
        assert "needs" in r.stderr and "available" in r.stderr


def test_serve_with_a_window_larger_than_memory_is_one_error_line(ckpt):
    r = run_raw(["serve", "--model", ckpt, "--device", "cpu", "--port", 0, "--window", 10**11,
                 "--no-engine-process"])
    one_error_line(r, "GiB but cpu has")

