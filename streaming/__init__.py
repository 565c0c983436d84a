"""sinkstream's runtime: load a model, open constant-memory sessions, stream text in and out.

    import streaming
    rt = streaming.load()                      # the bundled default model (or a checkpoint path)
    s = rt.session(sinks=4, window=1020)
    for r in s.generate("Once upon a time", max_new_tokens=50):
        print(r.text, end="", flush=True)
    lp = s.score(" and they lived happily.")   # log p of each token given the stream: perplexity exp(-lp.mean())
"""

from .errors import (
    CheckpointError, ConfigError, InvalidInputError, PoolFullError, SessionBusyError, SinkstreamError, TokenizerMissingError,
)
from .engine import Engine
from .generate import Response
from .pool import SessionPool
from .runtime import Runtime, load
from .session import Session, SessionStats

__all__ = [
    "CheckpointError", "ConfigError", "Engine", "InvalidInputError", "PoolFullError", "Response", "Runtime", "Session", "SessionBusyError", "SessionPool", "SessionStats",
    "SinkstreamError", "TokenizerMissingError", "load",
]
