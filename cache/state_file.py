"""A cache state's file on disk: the checksum that proves it whole, and writing it atomically.

The file is a safetensors file: an 8-byte header length, a JSON header (the tensor table and
`__metadata__`, a dict of strings), then the tensor data. `__metadata__["checksum"]` is
"crc32:<8 hex digits>" of the header without that field (canonical JSON: sorted keys, no spaces)
followed by the tensor data, so it covers every tensor's bytes, name, dtype and shape, and the cache
meta and extra data. It detects damage (a disk's, a copy's), not tampering: whoever can write the file
can write a matching checksum too. CRC-32 rather than sha256: 0.6 ms against 1.5 ms for a 1.5 MB state
on a 2-core CPU, paid on every write of a busy server. A file without the field (written before it
existed) loads unchecked.

A write goes to a temporary file of a unique name (the writer's pid and a random suffix) in the target's
directory, flushed to disk, then renamed over the target: a crash leaves the old file or the new one,
never a mix, and writers sharing a directory never write into one temporary file. The target must be a
regular file or absent: a directory, device, FIFO or socket there is refused, never replaced.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import struct
import zlib
from pathlib import Path

from .errors import CacheStateError

CHECKSUM = "checksum"  # the __metadata__ field


def read_header(blob: bytes, origin: str = "state") -> tuple[dict, int]:
    """A safetensors blob's header (JSON) and where its tensor data starts (CacheStateError if none)."""
    if len(blob) < 8:
        raise CacheStateError(f"{origin}: not a sinkstream cache state (too short)")
    (size,) = struct.unpack_from("<Q", blob)
    if size > len(blob) - 8:
        raise CacheStateError(f"{origin}: not a sinkstream cache state (its header runs past its end)")
    try:
        header = json.loads(bytes(memoryview(blob)[8:8 + size]))
    except ValueError:
        raise CacheStateError(f"{origin}: not a sinkstream cache state (its header is not JSON)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise CacheStateError(f"{origin}: not a sinkstream cache state (its header is not a JSON object)")
    return header, 8 + size


def checksum(header: dict, data) -> str:
    """The checksum of a header (its own checksum field left out) and the tensor data after it."""
    fields = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != CHECKSUM}
    unsealed = {**header, "__metadata__": fields}
    crc = zlib.crc32(json.dumps(unsealed, sort_keys=True, separators=(",", ":")).encode())
    return f"crc32:{zlib.crc32(data, crc):08x}"


def verify(origin: str, header: dict, data) -> None:
    """CacheStateError naming `origin` when the header carries a checksum its contents do not match."""
    saved = (header.get("__metadata__") or {}).get(CHECKSUM)
    if saved is not None and saved != checksum(header, data):
        raise CacheStateError(f"{origin}: its checksum does not match its contents (the file is damaged)")


def sealed(header: dict, data) -> bytes:
    """The bytes before the tensor data of a file holding `header`, with its checksum set."""
    metadata = {**(header.get("__metadata__") or {})}
    metadata[CHECKSUM] = checksum(header, data)
    text = json.dumps({**header, "__metadata__": metadata}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def write(path: str | Path, header: dict, data) -> None:
    """Atomically replace (or create) the file at `path` with `header` (sealed) and `data`: durable
    when this returns. OSError naming `path` when it cannot be written; the old file stays."""
    temp, target = write_temp(path, header, data)
    commit(temp, target, shown=path)
    fsync_dir(target.parent)


def write_temp(path: str | Path, header: dict, data) -> tuple[Path, Path]:
    """Write the file next to `path`'s target (see `writable_target`) under a unique temporary name,
    fsynced; return (that name, the target) for `commit`. Nothing is left behind when this raises."""
    shown, target = path, writable_target(path)
    temp = target.with_name(f"{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # a file rewritten keeps its permissions
    except FileNotFoundError:
        mode = 0o600  # a new one is its owner's only: it holds a conversation
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write a cache state file there ({exc.strerror})", str(shown)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # (the umask narrowed what os.open gave)
            handle.write(sealed(header, data))
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write a cache state file ({exc.strerror})", str(shown)) from None
        raise
    return temp, target


def commit(temp: Path, target: Path, *, shown=None) -> None:
    """Rename a `write_temp` file over its target (the temporary file is removed if that fails)."""
    try:
        os.replace(temp, target)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot replace the cache state file ({exc.strerror})",
                      str(target if shown is None else shown)) from None


def writable_target(path: str | Path) -> Path:
    """Where a write to `path` lands: the file a symlink names (the link stays), which must be a
    regular file or not exist yet. OSError naming `path` otherwise."""
    target = Path(os.path.realpath(path))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such directory to save a cache state in", str(path)) from None
        return target
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a cache state file", str(path))
    if not stat.S_ISREG(mode):
        raise FileExistsError(errno.EEXIST, f"exists and is not a regular file ({_kind(mode)}); refusing to "
                              "replace it with a cache state", str(path))
    return target


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "an unknown kind of file"


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform has directory handles)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
