"""Large native blocks straight from the system and back (glibc's M_MMAP_THRESHOLD).

A CPU server's engine steps allocate large temporaries whose sizes change every step (the gathered
and rotated KV of the stepped rows: [rows, kv heads, visible slots, head dim], with rows and slots
varying). glibc serves blocks below its mmap threshold from its heaps, and that threshold rises by
itself up to 32 MiB after the first large free; freed blocks of ever new sizes then stay in the heaps
as fragments. Measured in a 200-session server (bfloat16, 7 minutes): memory in use stayed at
~410-490 MiB while glibc's free-but-kept heap memory grew from 11 to 328 MiB, and `malloc_trim` did
not give it back. With a fixed threshold of 128 KiB the large blocks are mapped and unmapped, and the
kept free memory stayed at 4-14 MiB (benchmarks/DECISIONS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("sinkstream.server")

M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)


def map_large_blocks(threshold_bytes: int) -> bool:
    """Fix glibc's mmap threshold (which also stops its automatic rise). Process-wide; a no-op
    returning False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    log.debug("glibc mmap threshold %d bytes: %s", threshold_bytes, "set" if ok else "refused")
    return ok
