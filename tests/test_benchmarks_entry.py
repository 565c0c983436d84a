"""`python -m benchmarks`: every benchmark script in the tree is listed, and a bad name is refused."""

from __future__ import annotations

from pathlib import Path

from benchmarks.__main__ import BENCHMARKS, main

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_script_is_listed_and_nothing_else():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "__main__"}
    assert set(BENCHMARKS) == scripts


def test_help_lists_every_benchmark(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in BENCHMARKS)


def test_unknown_benchmark_is_an_error_naming_it(capsys):
    assert main(["no_such_benchmark"]) == 2
    assert "no benchmark 'no_such_benchmark'" in capsys.readouterr().err
