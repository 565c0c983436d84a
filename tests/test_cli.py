"""`sinkstream generate` and `sinkstream chat`, run as the real console script on a tiny model."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

SINKSTREAM = [shutil.which("sinkstream")] if shutil.which("sinkstream") else [sys.executable, "-m", "apps"]
# One thread: tiny models are overhead-bound and CI has two cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")


def sinkstream(*args, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(SINKSTREAM + [str(a) for a in args], input=input, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "lckv")


def model_args(ckpt):
    return ["--model", ckpt, "--device", "cpu", "--window", 60, "--chunk", 16, "--temperature", 0]


def test_generate_reads_piped_stdin_and_reports_stats(ckpt):
    piped = sinkstream("generate", *model_args(ckpt), "-n", 12, "--verbose", input="The river")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout  # streamed text
    for needle in ("prompt:", "tokens/s", "generation: 12 tokens", "tokens in cache", "peak memory",
                   "finish: length"):
        assert needle in piped.stderr, piped.stderr
    arg = sinkstream("generate", "The river", *model_args(ckpt), "-n", 12, input="ignored")
    assert arg.stdout == piped.stdout


def test_unbounded_generation_ends_at_a_stop_string(ckpt):
    # Greedy decoding of a random model is deterministic: pick a stop string from a first run.
    first = sinkstream("generate", "Once upon a time", *model_args(ckpt), "-n", 150)
    text = first.stdout
    stop = next(text[i:i + 4] for i in range(60, len(text) - 4)
                if text[i:i + 4].isascii() and text[i:i + 4].isprintable()
                and text.find(text[i:i + 4]) == i)
    run = sinkstream("generate", "Once upon a time", *model_args(ckpt), "--unbounded", "--stop",
                     stop, "-v")
    assert run.returncode == 0, run.stderr
    assert run.stdout == text[:text.index(stop)]
    assert "finish: stop" in run.stderr


def test_bad_flags_are_clear_errors(ckpt):
    r = sinkstream("generate", "x", "--model", ckpt, "--max-new-tokens", 0)
    assert r.returncode != 0 and "--unbounded" in r.stderr
    r = sinkstream("generate", "x", "--model", ckpt, "--window", 8, "--chunk", 16)
    assert r.returncode != 0 and "chunk" in r.stderr and "Traceback" not in r.stderr
    r = sinkstream("generate", "x", "--model", ckpt.parent / "missing")
    assert r.returncode != 0 and "cannot load model" in r.stderr


def test_ctrl_c_stops_cleanly_and_prints_stats(ckpt):
    p = subprocess.Popen(SINKSTREAM + ["generate", "Go", *map(str, model_args(ckpt)), "--unbounded"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        os.set_blocking(p.stdout.fileno(), False)
        got, deadline = b"", time.monotonic() + 60
        while len(got) < 20 and time.monotonic() < deadline:
            got += p.stdout.read() or b""
            time.sleep(0.05)
        assert got, "no output before the deadline"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    err = err.decode("utf-8", "replace")
    assert p.returncode == 130
    assert "Traceback" not in err
    assert "generation:" in err and "tokens in cache" in err and "finish: interrupted" in err


def test_chat_commands(ckpt, tmp_path):
    saved = tmp_path / "chat.safetensors"
    script = "\n".join(["Hello there", "/stats", f"/save {saved}", "/reset", "/stats",
                        f"/load {saved}", "How are you?", "/stats", "/nonsense", "/quit", ""])
    r = sinkstream("chat", *model_args(ckpt), "--system", "You are a terse assistant.", "-n", 8,
                   input=script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    stats = [line for line in out.splitlines() if line.startswith("[") and "tokens seen" in line]
    assert len(stats) == 3, out
    seen = [int(s[1:].split()[0]) for s in stats]
    assert seen[0] > 0 and seen[1] == 0  # /reset empties the cache
    assert seen[2] > seen[0]  # /load restored the first turn, the second turn added to it
    assert f"[saved to {saved}]" in out and "3 messages" in out
    assert "unknown or incomplete command" in out
    assert saved.exists()
