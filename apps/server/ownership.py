"""One owner per session file in a state directory that several servers share (`serve --ray`).

Every server that writes a session's file puts its own random id in the file's transcript ("owner").
A server sharing the directory writes or deletes a session's file only while the file names it, or
names the server it took the session over from (until its own first write claims it), or names
nobody. A server that finds another owner there has been superseded: its copy of the session is
stale, and the file is left to the owner. So a copy left behind on a replica that only seemed to fail
can never overwrite or delete the file its successor resumes from.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 64 << 20  # a safetensors header past this is not one of ours


def file_owner(path: str | Path) -> str | None:
    """The owner named in a session file's transcript; None when the file is missing, unreadable, or
    names nobody (written before files named their owner). Reads only the file's header."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > MAX_HEADER_BYTES:
                return None
            header = json.loads(handle.read(size))
        owner = json.loads(header["__metadata__"]["extra"])["server"].get("owner")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return None
    return owner if isinstance(owner, str) else None


def may_change(path: str | Path, me: str, taken_from: str | None) -> bool:
    """Whether server `me`, holding a session taken over from `taken_from` (None: created here), may
    write or delete its file now."""
    owner = file_owner(path)
    return owner is None or owner == me or (taken_from is not None and owner == taken_from)
