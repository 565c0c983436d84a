"""Small helpers shared by the correctness tests: load a tiny checkpoint, make caches, read RSS."""

from __future__ import annotations

import torch

from cache.full import FullCache
from cache.sink_window import SinkWindowCache
from streaming.checkpoint import load_model
from tests.tiny_checkpoint import random_weights, write_checkpoint

CPU = torch.device("cpu")

# Tiny matrices: extra intra-op threads only contend (on a busy 2-core runner a 64x128 matmul went
# from ~50 us to ~10 ms with 2 threads). One thread keeps these tests fast and their timing stable.
torch.set_num_threads(1)


def build(tmp_path, config: dict, *, seed: int = 0, std: float = 0.2, shards: int = 1):
    """Write a random checkpoint, load it in float32; return (model, weights)."""
    weights = random_weights(config, std=std, seed=seed)
    directory = write_checkpoint(tmp_path / f"ckpt-{seed}", config, weights, shards=shards)
    return load_model(directory, device=CPU, dtype=torch.float32), weights


def full_cache(model, batch: int = 1, initial_slots: int = 8) -> FullCache:
    c = model.config
    return FullCache(c.kv_layers, batch, c.num_key_value_heads, c.head_dim, dtype=torch.float32,
                     device=CPU, initial_slots=initial_slots)


def sink_cache(model, sinks: int, window: int, batch: int = 1) -> SinkWindowCache:
    c = model.config
    return SinkWindowCache(c.kv_layers, batch, c.num_key_value_heads, c.head_dim, sinks=sinks,
                           window=window, dtype=torch.float32, device=CPU)


def rss_kib() -> int:
    """Resident set size of this process in KiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found")
