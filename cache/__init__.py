"""KV memory for sinkstream: sink+window ring buffers, an unbounded cache, state save/restore.

This package knows nothing about models or apps: it stores keys/values for a list of KV-owning layers
and tells a step where to write and which in-cache position every slot holds.
"""

from .buffers import KVBuffers, StepPlan
from .errors import CacheConfigError, CacheMemoryError, CacheStateError
from .full import FullCache
from .sink_window import SinkWindowCache, check_chunk, check_sink_window

__all__ = ["CacheConfigError", "CacheMemoryError", "CacheStateError", "FullCache", "KVBuffers", "SinkWindowCache", "StepPlan", "check_chunk", "check_sink_window"]
