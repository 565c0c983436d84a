"""A cache is checked against its device's available memory before it is allocated: a window too
large for the machine is a CacheMemoryError saying how much is needed and how much there is, for a
session, a pool and an engine alike, instead of a failure inside the allocator."""

from __future__ import annotations

import pytest
import torch

import streaming
from cache import CacheConfigError, CacheMemoryError, FullCache, SinkWindowCache
from cache import memory_check
from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return streaming.load(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "lckv"), device="cpu",
                          dtype="float32")


def test_the_host_reports_some_available_memory():
    available = memory_check.available_bytes(torch.device("cpu"))
    assert available is None or available > 0


def test_a_window_larger_than_memory_is_refused_before_allocating(rt):
    huge = 10**11  # slots: terabytes for any model
    for make in (lambda: rt.session(sinks=4, window=huge),
                 lambda: rt.pool(2, sinks=4, window=huge)):
        with pytest.raises(CacheMemoryError, match=r"needs [\d,.]+ GiB but cpu has [\d,.]+ GiB available"):
            make()
    # A documented subclass of the cache's config error (a ValueError) and of MemoryError.
    assert issubclass(CacheMemoryError, CacheConfigError) and issubclass(CacheMemoryError, ValueError)
    assert issubclass(CacheMemoryError, MemoryError)


def test_the_size_checked_is_the_caches_size(monkeypatch):
    asked = []
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: asked.append(device) or 10**12)
    cache = SinkWindowCache([0, 2], 3, 2, 8, sinks=4, window=60, dtype=torch.bfloat16, device="cpu")
    assert asked == [torch.device("cpu")]
    # The limit is exactly the cache's bytes: one byte less is refused, that many is accepted.
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: cache.nbytes - 1)
    with pytest.raises(CacheMemoryError, match="a cache of 3 row"):
        SinkWindowCache([0, 2], 3, 2, 8, sinks=4, window=60, dtype=torch.bfloat16, device="cpu")
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: cache.nbytes)
    SinkWindowCache([0, 2], 3, 2, 8, sinks=4, window=60, dtype=torch.bfloat16, device="cpu")


def test_an_unbounded_cache_is_checked_when_it_grows(monkeypatch):
    cache = FullCache([0], 1, 2, 8, dtype=torch.float32, device="cpu", initial_slots=4)
    monkeypatch.setattr(memory_check, "available_bytes", lambda device: cache.nbytes)
    cache.plan(8)  # doubling to 8 slots adds as many bytes as there are: fits
    with pytest.raises(CacheMemoryError, match="growing a cache"):
        cache.plan(64)
    assert cache.slots == 8  # nothing was reallocated
