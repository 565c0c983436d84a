"""Constant memory: streaming 200k tokens allocates no new cache memory once the session exists.

Through the public API (streaming.load -> Runtime.session -> Session.feed/stats), for a plain and an
LCKV tiny model: the key/value buffers are the same tensors (same data_ptr, shape) before and after,
`cache_bytes` equals S+W slots x KV layers and never changes, and the process RSS stays flat.
"""

from __future__ import annotations

import gc

import pytest
import torch

import streaming
from tests.runtime_helpers import rss_kib
from tests.tiny_checkpoint import lckv_config, plain_config, random_weights, write_checkpoint

TOTAL = 200_000
SINKS, WINDOW, CHUNK = 4, 252, 200  # chunks wrap the ring at ever-changing offsets
FEED = 4096  # tokens per feed() call; the session splits them into CHUNK-token steps
RSS_MARGIN_KIB = 16 * 1024

# Small, so 200k tokens take seconds on CPU; the LCKV one still iterates (2 passes per 200-token chunk).
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
CONFIGS = {"plain": plain_config(2, **SMALL), "lckv": lckv_config(4, m=1, b=1, **SMALL)}


def _buffers(session) -> dict:
    cache = session.cache
    return {(kind, layer): (t.data_ptr(), tuple(t.shape), t.dtype)
            for kind, table in (("k", cache.keys), ("v", cache.values)) for layer, t in table.items()}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_streaming_200k_tokens_in_constant_memory(tmp_path, kind):
    config = CONFIGS[kind]
    path = write_checkpoint(tmp_path / kind, config, random_weights(config))
    rt = streaming.load(path, device="cpu", dtype="float32")
    s = rt.session(sinks=SINKS, window=WINDOW, chunk=CHUNK)
    kv_layers = rt.config.kv_layers
    assert kv_layers == ([0, 1] if kind == "plain" else [0, 2, 3])  # LCKV: bottom, target, top
    expected_bytes = len(kv_layers) * 2 * (SINKS + WINDOW) * config["num_key_value_heads"] * config["head_dim"] * 4
    at_start = _buffers(s)
    assert s.stats().cache_bytes == expected_bytes

    ids = torch.randint(0, config["vocab_size"], (TOTAL,), generator=torch.Generator().manual_seed(0))
    # Warm up well past the first window fill (allocator caches, lazily built tables).
    warm = 8 * FEED
    for a in range(0, warm, FEED):
        s.feed(ids[a : a + FEED])
    assert _buffers(s) == at_start
    gc.collect()
    rss_before = rss_kib()

    for a in range(warm, TOTAL, FEED):
        s.feed(ids[a : a + FEED])
    gc.collect()
    rss_after = rss_kib()

    assert _buffers(s) == at_start
    stats = s.stats()
    assert stats.tokens_seen == TOTAL
    assert stats.tokens_in_cache == SINKS + WINDOW
    assert stats.evictions == TOTAL - SINKS - WINDOW
    assert stats.cache_bytes == expected_bytes
    assert int(s.cache.lengths[0]) == TOTAL
    assert rss_after - rss_before < RSS_MARGIN_KIB, f"RSS grew by {rss_after - rss_before} KiB"
    # Still a working stream: the next prediction is finite.
    logits = s.feed([1, 2, 3], return_logits=True)
    assert logits.shape == (3, config["vocab_size"]) and torch.isfinite(logits).all()
