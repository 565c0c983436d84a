"""Check that a cache fits its device's available memory before allocating it.

An impossible size (a window of 10^8 slots) would otherwise reach the allocator, which fails with
a traceback, or on a host that overcommits, the process is killed once the pages are touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CacheMemoryError


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Raise CacheMemoryError saying how much `what` needs and how much `device` has available;
    quiet when it fits, or when the available memory cannot be told (other device types)."""
    available = available_bytes(device)
    if available is not None and nbytes > available:
        raise CacheMemoryError(
            f"{what} needs {gib(nbytes)} but {device} has {gib(available)} available: "
            "use a smaller window or fewer rows (sessions)")


def available_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device; on the CPU, the host's available memory (MemAvailable, within
    a cgroup's limit when there is one); None when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    host = _meminfo_available()
    limit = _cgroup_room()
    if host is None or limit is None:
        return host if limit is None else limit
    return min(host, limit)


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.2f} GiB"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:  # other Unix systems: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2); None when unlimited or unknown."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None
