"""The CLI's automatic CPU dtype: a bfloat16 checkpoint runs in bfloat16 where the CPU has native
bfloat16 instructions, float32 otherwise; --dtype always wins."""

from __future__ import annotations

import json
import re
import subprocess

from apps.cpu_dtype import auto_cpu_dtype, checkpoint_dtype, cpu_has_native_bf16
from tests.test_cli import ENV, SINKSTREAM

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
OLD_XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_bf16 amx_tile\n"


def test_native_bf16_from_cpu_flags():
    assert cpu_has_native_bf16(ZEN4) and cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert not cpu_has_native_bf16(OLD_XEON) and not cpu_has_native_bf16("")


def test_auto_dtype_needs_a_bfloat16_checkpoint_and_a_native_cpu(tmp_path):
    for name, dtype in (("bf16", "bfloat16"), ("f32", "float32"), ("new_key", None), ("none", None)):
        (tmp_path / name).mkdir()
        config = {"torch_dtype": dtype} if name in ("bf16", "f32") else ({"dtype": "bfloat16"} if name == "new_key" else {})
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(tmp_path / "bf16") == "bfloat16" and checkpoint_dtype(tmp_path / "none") is None
    assert checkpoint_dtype(tmp_path / "missing") is None
    assert auto_cpu_dtype(tmp_path / "bf16", cpuinfo=ZEN4) == "bfloat16"
    assert auto_cpu_dtype(tmp_path / "new_key", cpuinfo=ZEN4) == "bfloat16"  # transformers 5 writes `dtype`
    assert auto_cpu_dtype(tmp_path / "bf16", cpuinfo=OLD_XEON) is None
    assert auto_cpu_dtype(tmp_path / "f32", cpuinfo=ZEN4) is None
    assert auto_cpu_dtype(tmp_path / "none", cpuinfo=ZEN4) is None


def _loaded(*flags) -> str:
    r = subprocess.run(SINKSTREAM + ["generate", "The river", "--device", "cpu", "-n", "2", "-v", *flags],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    return next(line for line in r.stderr.splitlines() if line.startswith("[loaded"))


def test_cli_runs_the_bundled_model_in_the_automatic_dtype_and_obeys_the_flag():
    expected = "bfloat16" if cpu_has_native_bf16() else "float32"  # the bundled model is saved in bfloat16
    auto = _loaded()
    assert re.search(rf"on cpu \({expected}\)", auto) and "dtype: automatic" in auto, auto
    forced = _loaded("--dtype", "float32")
    assert "on cpu (float32)" in forced and "dtype: --dtype" in forced, forced
