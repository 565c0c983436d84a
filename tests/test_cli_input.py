"""The console script on bad input: invalid UTF-8, empty stdin, bad paths, codecs and cache flags.

Each case must end as one clear line (an `error:` with a non-zero exit, or a `warning:` when the
command goes on), never a traceback, and flags must be rejected before the model loads.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.test_cli import ENV, SINKSTREAM, model_args, sinkstream


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "lckv")


def run_bytes(*args, stdin: bytes) -> subprocess.CompletedProcess:
    """The console script with raw bytes on stdin (sinkstream() sends text)."""
    r = subprocess.run(SINKSTREAM + [str(a) for a in args], input=stdin, capture_output=True,
                       env=ENV, timeout=120)
    r.stdout = r.stdout.decode("utf-8", "replace")
    r.stderr = r.stderr.decode("utf-8", "replace")
    return r


def no_traceback(r) -> None:
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_invalid_utf8_is_replaced_with_one_warning_in_generate_and_stream(ckpt):
    bad = b"Hello \xff\xfe world"
    replaced = "Hello \ufffd\ufffd world"  # one U+FFFD per invalid byte, as errors="replace"
    warning = "warning: stdin had 2 invalid utf-8 byte(s) (--encoding utf-8); replaced with U+FFFD"

    gen = run_bytes("generate", "-", *model_args(ckpt), "-n", 5, "-v", stdin=bad)
    assert gen.returncode == 0, gen.stderr
    no_traceback(gen)
    assert gen.stderr.count(warning) == 1, gen.stderr
    assert f"[prompt] {replaced!r}" in gen.stderr
    # Exactly the text a user would get by typing the replacement characters themselves.
    same = sinkstream("generate", replaced, *model_args(ckpt), "-n", 5)
    assert same.returncode == 0 and same.stdout == gen.stdout and "warning" not in same.stderr

    st = run_bytes("stream", "--model", ckpt, "--no-progress", stdin=bad)
    assert st.returncode == 0, st.stderr
    no_traceback(st)
    assert st.stderr.count(warning) == 1, st.stderr
    clean = run_bytes("stream", "--model", ckpt, "--no-progress", stdin=replaced.encode())
    assert "warning" not in clean.stderr
    ppl = re.compile(r"perplexity [0-9.]+")
    assert ppl.search(st.stderr).group() == ppl.search(clean.stderr).group()


def test_latin1_stdin_with_encoding_flag_needs_no_replacement(ckpt):
    r = run_bytes("generate", "-", "--encoding", "latin-1", *model_args(ckpt), "-n", 3, "-v",
                  stdin="Caf\u00e9 cr\u00e8me".encode("latin-1"))
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr and "[prompt] 'Caf\u00e9 cr\u00e8me'" in r.stderr


def test_empty_stdin_is_a_clear_error(ckpt):
    gen = run_bytes("generate", "-", *model_args(ckpt), "-n", 5, stdin=b"")
    assert gen.returncode != 0
    no_traceback(gen)
    assert gen.stderr.strip() == "error: the prompt is empty (stdin gave no text)"
    assert gen.stdout == ""
    blank = run_bytes("generate", "-", *model_args(ckpt), "-n", 5, stdin=b" \n\n")
    assert blank.returncode != 0 and "prompt is empty (only whitespace)" in blank.stderr

    st = run_bytes("stream", "--model", ckpt, "--no-progress", stdin=b"")
    assert st.returncode != 0
    no_traceback(st)
    assert st.stderr.startswith("error: no input on stdin"), st.stderr
    assert "nan" not in st.stderr


def test_bad_stream_paths_and_codecs_fail_before_the_model_loads(ckpt, tmp_path):
    missing_model = tmp_path / "no-such-model"
    for flags, message in [
        (["--ppl-jsonl", "/nonexistent/dir/x.jsonl"],
         "error: cannot write --ppl-jsonl /nonexistent/dir/x.jsonl: No such file or directory"),
        (["--encoding", "nosuchcodec"], "error: unknown --encoding 'nosuchcodec'"),
        (["--encoding", "rot13"], "error: --encoding 'rot13' is not a text encoding"),
    ]:
        # A model that does not exist: the flag's error must come first, so it came before loading.
        r = run_bytes("stream", "--model", missing_model, *flags, stdin=b"some text")
        assert r.returncode != 0
        no_traceback(r)
        assert r.stderr.startswith(message), r.stderr
        assert "cannot load model" not in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--window", 0], "error: bad cache flags --sinks 4 --window 0: window must be >= 1, got 0"),
    (["--sinks", 2000, "--window", 10],
     "error: bad cache flags --sinks 2000 --window 10: sinks (2000) must not exceed window (10)"),
    (["--chunk", 5000], "error: --chunk must be between 1 and --window (1020), got 5000"),
    (["--chunk", 0], "error: --chunk must be between 1 and --window (1020), got 0"),
    (["--threads", 0], "error: --threads must be >= 1, got 0"),
])
def test_impossible_cache_flags_fail_before_the_model_loads(flags, message, tmp_path):
    # --model names nothing: if the model were loaded first, "cannot load model" would win.
    r = run_bytes("generate", "x", "--model", tmp_path / "missing", *flags, stdin=b"")
    assert r.returncode != 0
    no_traceback(r)
    assert r.stderr.startswith(message), r.stderr


@pytest.mark.parametrize("command", ["stream", "chat", "serve"])
def test_every_command_checks_cache_flags_first(command, tmp_path):
    r = run_bytes(command, "--model", tmp_path / "missing", "--sinks", 20, "--window", 10,
                  stdin=b"text")
    assert r.returncode != 0
    no_traceback(r)
    assert r.stderr.startswith("error: bad cache flags --sinks 20 --window 10"), r.stderr


def test_cache_flags_are_checked_before_loading_a_real_model(ckpt):
    r = run_bytes("generate", "x", "--model", ckpt, "--window", 8, "--chunk", 16, "-v", stdin=b"")
    assert r.returncode != 0
    assert r.stderr.startswith("error: --chunk must be between 1 and --window (8), got 16")
    assert "[loaded" not in r.stderr


def test_chat_survives_a_failed_save_and_load(ckpt, tmp_path):
    failing = ["hello", "/save /nonexistent/dir/s.safetensors", "/stats",
               f"/load {tmp_path / 'never-saved.safetensors'}", "hello again", ""]
    r = sinkstream("chat", *model_args(ckpt), "-n", 6, input="\n".join(failing))
    assert r.returncode == 0, r.stderr
    no_traceback(r)
    lines = r.stdout.splitlines()
    save = [line for line in lines if line.startswith("[save failed: ")]
    load = [line for line in lines if line.startswith("[load failed: ")]
    assert len(save) == len(load) == 1, r.stdout
    assert "/nonexistent/dir" in save[0] or "No such file" in save[0], save[0]
    assert "never-saved" in load[0] or "No such file" in load[0], load[0]
    # Reference: the same conversation without the failed commands (greedy, so reproducible).
    # Both replies must be there, the second one conditioned on the first turn as before.
    clean = sinkstream("chat", *model_args(ckpt), "-n", 6,
                       input="\n".join(["hello", "/stats", "hello again", ""]))
    assert clean.returncode == 0, clean.stderr

    def transcript(out: str) -> list[str]:
        kept = [line for line in out.splitlines() if not line.startswith(("[save failed", "[load failed"))]
        return [re.sub(r"peak memory [^\]]*", "peak memory", line) for line in kept]

    assert transcript(r.stdout) == transcript(clean.stdout)
    assert sum("tokens seen" in line and "2 messages" in line for line in lines) == 1, r.stdout
