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


def pack_state(state: tuple[dict, dict, dict]) -> tuple[bytes, dict, dict]:
    """A session snapshot (tensors, meta, extra) with its tensors as safetensors bytes."""
    from safetensors.torch import save

    tensors, meta, extra = state
    return save({name: t.contiguous() for name, t in tensors.items()}), meta, extra


def unpack_state(packed: tuple[bytes, dict, dict]) -> tuple[dict, dict, dict]:
    """The inverse of `pack_state`."""
    from safetensors.torch import load

    blob, meta, extra = packed
    return load(blob), meta, extra
