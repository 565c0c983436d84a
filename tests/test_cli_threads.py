"""--threads and the automatic thread count: one thread for small models, all CPUs but one for large ones."""

from __future__ import annotations

import argparse
import re
import subprocess

import pytest

from tests.test_cli import ENV, SINKSTREAM


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "lckv")


def loaded_line(ckpt, *flags, env: dict) -> str:
    r = subprocess.run(SINKSTREAM + ["generate", "The river", "--model", str(ckpt), "--device", "cpu",
                                     "-n", "2", "-v", *map(str, flags)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return next(line for line in r.stderr.splitlines() if line.startswith("[loaded"))


def test_auto_threads_rule():
    from apps.threads import SMALL_MODEL_PARAMS, auto_threads

    assert auto_threads(12_900_000, 2) == 1        # the bundled model
    assert auto_threads(SMALL_MODEL_PARAMS - 1, 64) == 1
    assert auto_threads(SMALL_MODEL_PARAMS, 16) == 15  # one CPU left for the rest of the machine
    assert auto_threads(10**9, 2) == 1
    assert auto_threads(10**9, 1) == 1
    assert auto_threads(None, 8) == 1              # unreadable checkpoint: the safe choice


def test_checkpoint_params_reads_headers_only(tmp_path):
    from safetensors.torch import load_file

    from apps.threads import checkpoint_params, model_dir
    from tests.tiny_checkpoint import lckv_config, random_weights, write_checkpoint

    config = lckv_config()
    sharded = write_checkpoint(tmp_path / "sharded", config, random_weights(config), shards=3)
    expected = sum(t.numel() for f in sharded.glob("*.safetensors") for t in load_file(f).values())
    assert checkpoint_params(sharded) == expected > 0
    bundled = model_dir(None)
    assert checkpoint_params(bundled) == sum(
        t.numel() for f in bundled.glob("*.safetensors") for t in load_file(f).values())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    assert checkpoint_params(tmp_path / "broken") is None
    assert checkpoint_params(tmp_path) is None  # no weights at all


def test_cli_thread_count_from_flag_env_or_rule(ckpt):
    no_omp = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    from apps.threads import available_cpus

    auto = loaded_line(ckpt, env=no_omp)
    assert re.search(r"; 1 thread\(s\) \(automatic: 0\.\dM parameters, "
                     rf"{available_cpus()} CPUs\); dtype: automatic\]", auto), auto
    assert "2 thread(s) (--threads)" in loaded_line(ckpt, "--threads", 2, env=no_omp)
    # An explicit --threads wins over $OMP_NUM_THREADS, which wins over the rule.
    assert "2 thread(s) ($OMP_NUM_THREADS)" in loaded_line(ckpt, env=dict(no_omp, OMP_NUM_THREADS="2"))
    assert "1 thread(s) (--threads)" in loaded_line(ckpt, "--threads", 1,
                                                     env=dict(no_omp, OMP_NUM_THREADS="2"))


def test_large_models_get_every_cpu_but_one(monkeypatch):
    import torch

    from apps import threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "checkpoint_params", lambda path: 2 * threads.SMALL_MODEL_PARAMS)
    try:
        note = threads.configure_threads(argparse.Namespace(threads=None, model=None))
        expected = max(1, threads.available_cpus() - 1)
        assert torch.get_num_threads() == expected == int(note.split()[0]), note
        assert f"{2 * threads.SMALL_MODEL_PARAMS / 1e6:.1f}M parameters" in note
    finally:
        torch.set_num_threads(before)
