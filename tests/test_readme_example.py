"""The README's Python API example runs as written: on the bundled model, with a small book.txt.

The ```python block under "## Python API" is extracted from README.md and run in a fresh interpreter
in a temporary directory. It must finish (generation and chat have finite default lengths), print a
finite perplexity of the book and write the session file.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streaming.runtime import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "tests" / "data" / "heldout.txt"

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="no bundled model")


def python_api_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)
    assert len(section) == 2, "README.md has no '## Python API' section"
    block = re.search(r"^```python\n(.*?)^```$", section[1].split("\n## ", 1)[0], re.S | re.M)
    assert block, "no ```python block in the README's Python API section"
    return block.group(1)


def test_readme_python_example_runs_as_written(tmp_path):
    code = python_api_example()
    book = BOOK.read_text(encoding="utf-8").replace("<|endoftext|>", "")[:4000]
    (tmp_path / "book.txt").write_text(book, encoding="utf-8")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ppl = re.search(r"^perplexity (\S+)$", r.stdout, re.M)
    assert ppl, r.stdout[-2000:]
    assert math.isfinite(float(ppl.group(1))) and 1 < float(ppl.group(1)) < 1000
    assert "SessionStats(tokens_seen=" in r.stdout
    assert (tmp_path / "session.safetensors").is_file()
