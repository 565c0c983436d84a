"""What the server's model side is built from, as plain data (it crosses into the engine process),
and how a session's saved state crosses a process boundary without pickling tensors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSource:
    """Where the engine process loads the model from: the arguments of `streaming.load`.

    model: checkpoint directory (None: the bundled model); threads: torch's CPU threads there."""
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    compile: bool = False  # streaming.load's: layers through torch.compile

    @classmethod
    def of(cls, rt) -> "ModelSource":
        """The source of an already loaded runtime (its checkpoint directory, device and dtype)."""
        import torch

        return cls(model=str(rt.path), device=str(rt.device), dtype=str(rt.dtype).removeprefix("torch."),
                   threads=torch.get_num_threads(), compile=rt.model.layers_compiled)


@dataclass(frozen=True)
class EngineSettings:
    """The pool the server's sessions share: `rows` cache rows of sinks + window slots, prompt chunks
    of `chunk` tokens and `prefill_budget` prompt tokens per engine step (None: the engine's default)."""
    rows: int
    sinks: int
    window: int
    chunk: int
    prefill_budget: int | None
    cpu_mmap_threshold: int | None = None  # see ServerConfig.cpu_mmap_threshold
    pipelined: bool | None = None  # see ServerConfig.pipelined


@dataclass(frozen=True)
class PackedState:
    """A session snapshot as it came from the engine process: the bytes of its state file
    (`cache.state.to_bytes`). The server writes it to --state-dir, parks it, or sends it back for a
    restore without decoding it (decoding and re-encoding a thousand snapshots a second was about
    40 % of a busy server's time on the H200); `unpack` decodes it where the tensors are needed."""
    blob: bytes

    def unpack(self) -> tuple[dict, dict, dict]:
        from cache.state import from_bytes

        return from_bytes(self.blob)


def pack_state(state: tuple[dict, dict, dict]) -> bytes:
    """A session snapshot (tensors, meta, extra) as the bytes of its state file (no pickle)."""
    from cache.state import to_bytes

    return to_bytes(*state)


def unpack_state(packed: bytes) -> tuple[dict, dict, dict]:
    """The inverse of `pack_state` (CacheStateError when the bytes are not a state)."""
    from cache.state import from_bytes

    return from_bytes(packed)
