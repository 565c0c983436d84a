"""Saving and restoring one row's cache state (host memory or disk), so idle sessions free their slot.

A state is a dict of CPU tensors (`k.<layer>`, `v.<layer>`, `length`) plus a JSON-able `meta` dict that
says which cache layout it fits; restoring into a cache of another layout raises CacheStateError.
On disk it is one safetensors file (no pickle), the meta stored in its header.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

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
    """Write a captured state (and optional JSON-able `extra` data) to one safetensors file."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=_header(meta, extra))


def to_bytes(tensors: dict[str, torch.Tensor], meta: dict, extra: dict | None = None) -> bytes:
    """The bytes of the file `save` would write: how a state crosses a process boundary (no pickle),
    and what `save_packed` writes without decoding it again."""
    return save_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=_header(meta, extra))


def from_bytes(blob: bytes) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The inverse of `to_bytes`: (tensors, cache meta, extra); CacheStateError when it is not one."""
    header = _read_header(blob)[0].get("__metadata__") or {}
    try:
        tensors = load_bytes(blob)
        meta, extra = json.loads(header["cache"]), json.loads(header.get("extra", "{}"))
    except Exception as exc:
        raise CacheStateError(f"not a sinkstream cache state ({exc})") from None
    return _checked("state", tensors, meta, extra)


def save_packed(path: str | Path, blob: bytes, extra_updates: dict | None = None, *, fsync: bool = False) -> None:
    """Write a state's `to_bytes` to a file, its `extra` updated with `extra_updates` (keys replaced):
    only the header is rewritten, the tensor bytes are written as they came. `fsync`: the file's
    contents are on disk when this returns."""
    header, data_start = _read_header(blob)
    if extra_updates:
        fields = header.setdefault("__metadata__", {})
        fields["extra"] = json.dumps({**json.loads(fields.get("extra", "{}")), **extra_updates})
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.write(memoryview(blob)[data_start:])
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


def _header(meta: dict, extra: dict | None) -> dict[str, str]:
    return {"cache": json.dumps(meta), "extra": json.dumps(extra or {})}


def _read_header(blob: bytes) -> tuple[dict, int]:
    """A safetensors blob's header (JSON) and where its tensor data starts."""
    if len(blob) < 8:
        raise CacheStateError("not a sinkstream cache state (too short)")
    (size,) = struct.unpack_from("<Q", blob)
    if size > len(blob) - 8:
        raise CacheStateError("not a sinkstream cache state (its header runs past its end)")
    try:
        header = json.loads(bytes(memoryview(blob)[8:8 + size]))
    except ValueError:
        raise CacheStateError("not a sinkstream cache state (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CacheStateError("not a sinkstream cache state (its header is not a JSON object)")
    return header, 8 + size


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Read a state file written by `save` (or `save_packed`): (tensors, cache meta, extra)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        meta, extra = json.loads(header["cache"]), json.loads(header.get("extra", "{}"))
    except FileNotFoundError:
        raise CacheStateError(f"{path}: no such cache state file") from None
    except Exception as exc:
        raise CacheStateError(f"{path}: not a sinkstream cache state ({exc})") from None
    return _checked(str(path), tensors, meta, extra)


def _checked(origin: str, tensors: dict, meta: dict, extra: dict) -> tuple[dict[str, torch.Tensor], dict, dict]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "length" not in tensors:
        raise CacheStateError(f"{origin}: not a sinkstream cache state")
    if not isinstance(extra, dict):
        raise CacheStateError(f"{origin}: its extra data is not a JSON object")
    return tensors, meta, extra
