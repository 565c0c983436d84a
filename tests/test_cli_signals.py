"""The console script and signals: a closed stdout (SIGPIPE) and SIGTERM / SIGINT on `stream`.

A reader that goes away (`| head`) must end every command quietly with exit status 141, like
`generate` always did: no traceback, no "Exception ignored" at interpreter exit. SIGTERM on
`stream` stops between steps like Ctrl-C and still writes the last partial perplexity segment and
the summary (exit 143; 130 for SIGINT).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time

import pytest

from tests.test_cli import ENV, SINKSTREAM, model_args
from tests.tiny_tokenizer import TRAINING_LINES


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "lckv")


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """About 300 KB of the tiny tokenizer's own words: a few seconds of ingestion at least."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("book") / "book.txt"
    path.write_text(" ".join(rng.choice(TRAINING_LINES) for _ in range(6000)))
    return path


def spawn(args, stdin) -> subprocess.Popen:
    return subprocess.Popen(SINKSTREAM + [str(a) for a in args], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)


def close_after(p: subprocess.Popen, *, nbytes: int | None = None, lines: int | None = None) -> str:
    """Read `nbytes` bytes or `lines` lines of stdout, then close it as `head` does; the stderr."""
    if lines is not None:
        for _ in range(lines):
            assert p.stdout.readline(), "stdout ended before the reader left"
    else:
        got = b""
        while len(got) < nbytes:
            chunk = p.stdout.read1(nbytes - len(got))
            assert chunk, f"stdout ended after {len(got)} bytes"
            got += chunk
    p.stdout.close()
    try:
        err = p.stderr.read()  # until the child exits
        p.wait(timeout=120)
    finally:
        p.kill()
    return err.decode("utf-8", "replace")


def assert_quiet_sigpipe(p: subprocess.Popen, err: str) -> None:
    assert p.returncode == 141, (p.returncode, err)
    assert "Traceback" not in err and "Exception ignored" not in err and "Error" not in err, err


def test_stream_ppl_jsonl_to_a_closed_stdout(ckpt, book):
    with open(book, "rb") as f:
        p = spawn(["stream", "--model", ckpt, "--ppl-jsonl", "-", "--segment", 16, "--no-progress"], f)
        err = close_after(p, lines=1)
    assert_quiet_sigpipe(p, err)


def test_stream_continue_to_a_closed_stdout(ckpt):
    p = spawn(["stream", "--continue", *model_args(ckpt), "-n", 300, "--no-progress"],
              subprocess.PIPE)
    p.stdin.write(b"Once upon a time.\n")
    p.stdin.close()
    err = close_after(p, nbytes=50)
    assert_quiet_sigpipe(p, err)
    assert "ingested" in err  # the summary came before the answer


def test_chat_to_a_closed_stdout(ckpt):
    p = spawn(["chat", *model_args(ckpt), "-n", 40], subprocess.PIPE)
    p.stdin.write(b"Hello\nHow are you?\n" * 10)
    p.stdin.close()
    err = close_after(p, nbytes=50)
    assert_quiet_sigpipe(p, err)


def test_generate_to_a_closed_stdout(ckpt):
    p = spawn(["generate", "Once upon a time", *model_args(ckpt), "-n", 400], subprocess.DEVNULL)
    err = close_after(p, nbytes=50)
    assert_quiet_sigpipe(p, err)


def wait_for_lines(path, n: int, p: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert p.poll() is None, p.stderr.read().decode()
        time.sleep(0.05)
    pytest.fail(f"{path} did not reach {n} lines")


SUMMARY = re.compile(r"ingested (\d+) tokens .* stopped by (SIG\w+)")


def check_interrupted(p: subprocess.Popen, jsonl, signum: int, segment: int) -> None:
    err = p.stderr.read().decode("utf-8", "replace")
    assert p.returncode == 128 + signum, (p.returncode, err)
    assert "Traceback" not in err, err
    m = SUMMARY.search(err)
    assert m and m.group(2) == signal.Signals(signum).name, err
    tokens_seen = int(m.group(1))
    segments = [json.loads(line) for line in jsonl.read_text().splitlines()]
    # Every fed token but BOS was scored, and the scores are all in the file: the last, partial
    # segment was written too, and the segments follow each other without a gap.
    assert sum(s["tokens"] for s in segments) == tokens_seen - 1, (tokens_seen, segments[-3:])
    assert [s["first_token"] for s in segments] == [segment * i for i in range(len(segments))]
    assert all(s["tokens"] == segment for s in segments[:-1])


def test_sigterm_during_ingestion_keeps_the_summary_and_the_last_segment(ckpt, book, tmp_path):
    jsonl, segment = tmp_path / "ppl.jsonl", 100
    with open(book, "rb") as f:
        p = spawn(["stream", "--model", ckpt, "--ppl-jsonl", jsonl, "--segment", segment,
                   "--score-tokens", 37, "--no-progress"], f)
        try:
            wait_for_lines(jsonl, 2, p)
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)
        finally:
            p.kill()
    check_interrupted(p, jsonl, signal.SIGTERM, segment)
    last = json.loads(jsonl.read_text().splitlines()[-1])
    assert last["tokens"] < segment  # stopped mid-stream: this run really cut a segment short


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_waiting_for_slow_stdin_stops_at_once(ckpt, tmp_path, signum):
    jsonl, segment = tmp_path / "ppl.jsonl", 8
    # Chunks of 16: the session feeds full chunks, so a first segment needs only a few words.
    p = spawn(["stream", "--model", ckpt, "--window", 60, "--chunk", 16, "--ppl-jsonl", jsonl,
               "--segment", segment, "--no-progress"], subprocess.PIPE)
    try:
        # A slow producer: some text, then nothing more (the pipe stays open).
        p.stdin.write(" ".join(TRAINING_LINES[:4]).encode() + b" ")
        p.stdin.flush()
        wait_for_lines(jsonl, 1, p)
        t0 = time.monotonic()
        p.send_signal(signum)
        p.wait(timeout=60)
        assert time.monotonic() - t0 < 30  # did not wait for more input
    finally:
        p.kill()
        p.stdin.close()
    check_interrupted(p, jsonl, signum, segment)
