"""Saving and restoring one row's cache state (host memory or disk), so idle sessions free their slot.

A state is a dict of CPU tensors (`k.<layer>`, `v.<layer>`, `length`) plus a JSON-able `meta` dict that
says which cache layout it fits; restoring into a cache of another layout raises CacheStateError.
On disk it is one safetensors file (no pickle), the meta stored in its header with a checksum of the
whole (cache/state_file.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from . import state_file
from .buffers import KVBuffers
from .errors import CacheStateError
from .full import FullCache
from .sink_window import SinkWindowCache

FORMAT = "sinkstream-cache-v1"


def layout(cache: KVBuffers) -> dict:
    """What a state must match to be restored into `cache`."""
    meta = {
        "format": FORMAT,
        "kv_layers": list(cache.kv_layers),
        "num_kv_heads": cache.num_kv_heads,
        "head_dim": cache.head_dim,
        "dtype": str(cache.dtype).removeprefix("torch."),
    }
    if isinstance(cache, SinkWindowCache):
        meta.update(kind="sink_window", sinks=cache.sinks, window=cache.window)
    else:
        meta.update(kind="full")
    return meta


def capture(cache: KVBuffers, row: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Copy row `row`'s keys, values and length to host memory."""
    return capture_rows(cache, [row])[0]


CAPTURE_GROUP_BYTES = 64 << 20  # device memory one gather of `capture_rows` may take


def capture_rows(cache: KVBuffers, rows: list[int]) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """`capture` of many rows, reading the device a few times per group of rows, not 1 + 2 x KV layers
    times per row (on a GPU each read waits for the stream: a thousand sessions saved at the end of
    their replies paid thousands of waits). A full cache holds `length` slots of a row; a ring, all of
    its slots once full."""
    if not rows:
        return []
    index = torch.tensor(rows, dtype=torch.long, device=cache.lengths.device)
    lengths = cache.lengths.index_select(0, index).tolist()
    per_slot = 2 * len(cache.kv_layers) * cache.num_kv_heads * cache.head_dim * torch.empty(0, dtype=cache.dtype).element_size()
    meta = layout(cache)
    out = []
    start = 0
    while start < len(rows):
        # Rows are read up to the group's longest, so a group is as many rows as fit the byte cap.
        stop, longest = start, 0
        while stop < len(rows):
            longest_next = max(longest, min(lengths[stop], cache.slots))
            if stop > start and (stop - start + 1) * max(longest_next, 1) * per_slot > CAPTURE_GROUP_BYTES:
                break
            longest, stop = longest_next, stop + 1
        group = index[start:stop]
        gathered = {f"{kv}.{layer}": buffer[layer].index_select(0, group)[:, :, :longest].to("cpu")
                    for layer in cache.kv_layers for kv, buffer in (("k", cache.keys), ("v", cache.values))}
        for i in range(start, stop):
            used = min(lengths[i], cache.slots)
            tensors = {"length": torch.tensor([lengths[i]], dtype=torch.long)}
            for layer in cache.kv_layers:
                for kv in "kv":
                    tensors[f"{kv}.{layer}"] = gathered[f"{kv}.{layer}"][i - start, :, :used].clone()
            out.append((tensors, dict(meta)))
        start = stop
    return out


def check(cache: KVBuffers, tensors: dict[str, torch.Tensor], meta: dict) -> int:
    """Raise CacheStateError unless the state fits `cache` completely (layout, length, every tensor's
    presence, shape and dtype); returns the saved length. Nothing is written."""
    for key, value in layout(cache).items():
        if meta.get(key) != value:
            raise CacheStateError(f"saved cache field '{key}' is {meta.get(key)!r}, this cache has {value!r}")
    length_tensor = tensors.get("length")
    if length_tensor is None or length_tensor.shape != (1,) or length_tensor.dtype != torch.long or int(length_tensor[0]) < 0:
        raise CacheStateError("saved tensor 'length' is missing or malformed")
    length = int(length_tensor[0])
    used = min(length, cache.slots) if isinstance(cache, SinkWindowCache) else length
    want = (cache.num_kv_heads, used, cache.head_dim)
    for layer in cache.kv_layers:
        for prefix in ("k", "v"):
            saved = tensors.get(f"{prefix}.{layer}")
            if saved is None or tuple(saved.shape) != want or saved.dtype != cache.dtype:
                raise CacheStateError(f"saved tensor '{prefix}.{layer}' is missing or has the wrong shape or dtype")
    return length


def restore(cache: KVBuffers, tensors: dict[str, torch.Tensor], meta: dict, row: int = 0) -> None:
    """Write a captured state into row `row` of `cache` (in place, no reallocation of a ring). Every
    check runs before the first write: a bad state leaves the row as it was."""
    length = check(cache, tensors, meta)
    used = min(length, cache.slots) if isinstance(cache, SinkWindowCache) else length
    if isinstance(cache, FullCache) and length > cache.slots:
        cache._grow(length)
    for layer in cache.kv_layers:
        cache.keys[layer][row, :, :used].copy_(tensors[f"k.{layer}"])
        cache.values[layer][row, :, :used].copy_(tensors[f"v.{layer}"])
    cache.lengths[row] = length


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict, extra: dict | None = None) -> None:
    """Write a captured state (and optional JSON-able `extra` data) to one safetensors file, atomically
    (cache/state_file.py: a checksummed file under a unique temporary name, fsynced, renamed over
    `path`). OSError naming `path` when it cannot be written (a missing directory, a full disk, a
    target that is a directory, device or FIFO); the file that was there stays."""
    save_packed(path, to_bytes(tensors, meta, extra))


def to_bytes(tensors: dict[str, torch.Tensor], meta: dict, extra: dict | None = None) -> bytes:
    """The bytes of the file `save` would write, less its checksum: how a state crosses a process
    boundary (no pickle), and what `save_packed` writes without decoding it again."""
    return save_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=_header(meta, extra))


def from_bytes(blob: bytes) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The inverse of `to_bytes` (or the bytes of a file): (tensors, cache meta, extra); CacheStateError
    when it is not one, or its checksum does not match."""
    return _decoded("state", blob)


def save_packed(path: str | Path, blob: bytes, extra_updates: dict | None = None) -> None:
    """Write a state's `to_bytes` to a file as `save` does, its `extra` updated with `extra_updates`
    (keys replaced): only the header is rewritten, the tensor bytes are written as they came."""
    state_file.write(path, *_packed(blob, extra_updates))


def save_packed_temp(path: str | Path, blob: bytes, extra_updates: dict | None = None) -> tuple[Path, Path]:
    """The first half of `save_packed`: the file written and fsynced under a unique temporary name next
    to `path`; returns (that name, the target) for `state_file.commit`, which renames it (so that many
    files can be renamed, then their directory fsynced once)."""
    return state_file.write_temp(path, *_packed(blob, extra_updates))


def _packed(blob: bytes, extra_updates: dict | None) -> tuple[dict, memoryview]:
    header, data_start = state_file.read_header(blob)
    if extra_updates:
        fields = header.setdefault("__metadata__", {})
        fields["extra"] = json.dumps({**json.loads(fields.get("extra", "{}")), **extra_updates})
    return header, memoryview(blob)[data_start:]


def _header(meta: dict, extra: dict | None) -> dict[str, str]:
    return {"cache": json.dumps(meta), "extra": json.dumps(extra or {})}


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Read a state file written by `save` (or `save_packed`): (tensors, cache meta, extra).
    CacheStateError naming `path` when it is missing, unreadable, not a state, or damaged (its checksum
    does not match; files written before states had a checksum load unchecked)."""
    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        raise CacheStateError(f"{path}: no such cache state file") from None
    except OSError as exc:
        raise CacheStateError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return _decoded(str(path), blob)


def _decoded(origin: str, blob: bytes) -> tuple[dict[str, torch.Tensor], dict, dict]:
    header, data_start = state_file.read_header(blob, origin)
    state_file.verify(origin, header, memoryview(blob)[data_start:])
    fields = header.get("__metadata__") or {}
    try:
        tensors = load_bytes(blob)
        meta, extra = json.loads(fields["cache"]), json.loads(fields.get("extra", "{}"))
    except Exception as exc:
        raise CacheStateError(f"{origin}: not a sinkstream cache state ({exc})") from None
    return _checked(origin, tensors, meta, extra)


def _checked(origin: str, tensors: dict, meta: dict, extra: dict) -> tuple[dict[str, torch.Tensor], dict, dict]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "length" not in tensors:
        raise CacheStateError(f"{origin}: not a sinkstream cache state")
    if not isinstance(extra, dict):
        raise CacheStateError(f"{origin}: its extra data is not a JSON object")
    return tensors, meta, extra
