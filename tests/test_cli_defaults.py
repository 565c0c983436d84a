"""Defaults the console script states: serve's limits in --help, the cache's dtype, the reply length."""

from __future__ import annotations

import re

from tests.test_cli import sinkstream


def test_serve_help_shows_every_limit_default():
    from apps.protocol import Limits

    d = Limits()
    r = sinkstream("serve", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps help lines
    for flag, value in [("--max-sessions", d.max_sessions), ("--max-message-bytes", d.max_message_bytes),
                        ("--max-prompt-tokens", d.max_prompt_tokens), ("--max-new-tokens", d.max_new_tokens),
                        ("--max-new-tokens-cap", d.max_new_tokens_cap),
                        ("--idle-timeout SECONDS", f"{d.idle_timeout_s:g}")]:
        assert re.search(re.escape(flag) + r" [^-]*?\(default " + re.escape(str(value)) + r"\)", text), flag


def test_cache_size_states_its_dtype(tmp_path):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "lckv")
    mib = {}
    for dtype in ("float32", "bfloat16"):
        r = sinkstream("generate", "The river", "--model", ckpt, "--device", "cpu", "--dtype", dtype,
                       "-n", 3, "--temperature", 0, "-v")
        assert r.returncode == 0, r.stderr
        m = re.search(r"cache: .* evicted, ([0-9.]+) MiB (\w+)", r.stderr)
        assert m and m.group(2) == dtype, r.stderr
        mib[dtype] = float(m.group(1))
    # Same slots (4 + 1020), twice the bytes per value; MiB are printed to 0.01.
    assert mib["bfloat16"] > 0.1 and abs(mib["float32"] - 2 * mib["bfloat16"]) <= 0.011, mib


def test_default_reply_length_is_the_checkpoints(tmp_path):
    import json

    from apps.common import RUNTIME_DEFAULT_MAX_NEW_TOKENS
    from streaming.runtime import DEFAULT_MAX_NEW_TOKENS
    from tests.tiny_checkpoint import make_tiny_checkpoint

    assert RUNTIME_DEFAULT_MAX_NEW_TOKENS == DEFAULT_MAX_NEW_TOKENS  # what --help says
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "lckv")
    (ckpt / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    r = sinkstream("generate", "The river", "--model", ckpt, "--device", "cpu", "--temperature", 0,
                   "-v")
    assert r.returncode == 0, r.stderr
    assert "generation: 7 tokens" in r.stderr and "finish: length" in r.stderr, r.stderr
    explicit = sinkstream("generate", "The river", "--model", ckpt, "--device", "cpu",
                          "--temperature", 0, "-n", 9, "-v")
    assert "generation: 9 tokens" in explicit.stderr, explicit.stderr


def test_compiled_layers_by_default_only_for_a_server_on_a_gpu(monkeypatch):
    import argparse

    import torch

    from apps.common import add_model_args, wants_compile

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        for serving in (True, False):
            assert wants_compile(parser.parse_args(["--compile"]), serving=serving) is True
            assert wants_compile(parser.parse_args(["--no-compile"]), serving=serving) is False
            assert wants_compile(parser.parse_args(["--device", "cpu"]), serving=serving) is False
        # Unset: a server on a GPU (the default device there, or named) compiles; a one-off command not.
        assert wants_compile(parser.parse_args([]), serving=True) is gpu
        assert wants_compile(parser.parse_args(["--device", "cuda:0"]), serving=True) is gpu
        assert wants_compile(parser.parse_args([]), serving=False) is False


def test_load_with_compile_marks_every_layer_and_the_engine_process_gets_it(tmp_path):
    import streaming
    from apps.server.engine_spec import ModelSource
    from tests.tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "m", "lckv", with_tokenizer=False)
    rt = streaming.load(path, device="cpu", compile=True)  # torch.compile is lazy: nothing runs yet
    assert all(layer.math.compiled for layer in rt.model.model.layers)
    assert ModelSource.of(rt).compile is True
    assert ModelSource.of(streaming.load(path, device="cpu")).compile is False
