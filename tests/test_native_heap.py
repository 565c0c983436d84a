"""The server's fixed glibc mmap threshold. Without it, glibc raises its threshold to the size of a
large block once that block is freed, so the next blocks of that size come from the heap (where
ever-changing sizes fragment it); with it, they keep their own mappings, returned on free. Checked in
fresh processes with glibc's own accounting (mallinfo2), not with our function's answer."""

from __future__ import annotations

import ast
import ctypes.util
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, ctypes.util, sys
from apps.server.native_heap import map_large_blocks

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fixed":
    assert map_large_blocks(128 << 10)
mapped = []
for _ in range(3):  # a 4 MiB block, freed, and again: mapped each time?
    before = libc.mallinfo2().hblks
    block = libc.malloc(4 << 20)
    mapped.append(libc.mallinfo2().hblks - before)
    libc.free(block)
print(mapped)
"""


def _mapped(mode: str) -> list[int]:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return ast.literal_eval(r.stdout.strip())  # the list of ints the probe printed


@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2"),
                    reason="needs glibc >= 2.33")
def test_large_blocks_keep_their_own_mappings_with_the_fixed_threshold():
    assert _mapped("default") == [1, 0, 0]  # glibc's own rule: mapped once, then from the heap
    assert _mapped("fixed") == [1, 1, 1]
