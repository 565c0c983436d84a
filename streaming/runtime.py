"""`streaming.load()` and the Runtime: one loaded model (weights, tokenizer, defaults) serving many sessions."""

from __future__ import annotations

import hashlib
from pathlib import Path
import torch

from cache import state as cache_state

from .checkpoint import load_model
from .engine import Engine
from .errors import CheckpointError, InvalidInputError, TokenizerMissingError
from .pool import SessionPool
from .sampling import SamplingParams, load_generation_defaults, load_max_new_tokens
from .session import Session
from .tokenizer import Tokenizer

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"
# Reply length when neither the call nor the checkpoint's generation_config.json gives one.
DEFAULT_MAX_NEW_TOKENS = 256

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"device {device!r} is not a torch device (try 'cpu' or 'cuda')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> float32 on CPU, bfloat16 on GPU; names like 'bf16' or torch dtypes are accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise InvalidInputError(f"dtype {dtype!r} is not supported; use float32, bfloat16 or float16")


def load(model: str | Path | None = None, *, device=None, dtype=None, compile: bool = False) -> "Runtime":
    """Load a checkpoint directory (None = the bundled default model) and return a Runtime.

    `compile=True` runs every layer's arithmetic through `torch.compile` (`CausalLM.compile_layers`):
    on a GPU, with CUDA graphs, batch-1 decode measured 1.45x faster (benchmarks/RESULTS.md), paid for
    with seconds of compiling at the first step of each new shape. On CPU it is slower (per-call guards)."""
    if model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise CheckpointError(
                f"no bundled default model is installed (looked in {DEFAULT_MODEL_DIR}); "
                "pass the path of a checkpoint directory"
            )
        model = DEFAULT_MODEL_DIR
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected config.json + *.safetensors)")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    network = load_model(path, device=device, dtype=dtype)
    network.compile_layers(bool(compile))
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer is not None and tokenizer.vocab_size > network.config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens but config 'vocab_size' is {network.config.vocab_size}"
        )
    defaults = SamplingParams().merged(**load_generation_defaults(path))
    defaults.validate()
    max_new_tokens = load_max_new_tokens(path) or DEFAULT_MAX_NEW_TOKENS
    return Runtime(network, tokenizer, device=device, dtype=dtype, path=path, sampling_defaults=defaults,
                   default_max_new_tokens=max_new_tokens)


class Runtime:
    """A loaded model. Create sessions with `session()`; sessions share the weights, not memory.

    `sampling_defaults` and `default_max_new_tokens` (the reply length a generation call uses when
    it gives none) come from the checkpoint's generation_config.json, else greedy and
    DEFAULT_MAX_NEW_TOKENS.
    """

    def __init__(self, model, tokenizer, *, device, dtype, path, sampling_defaults,
                 default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.model = model
        self.config = model.config
        self.tokenizer: Tokenizer | None = tokenizer
        self.device = device
        self.dtype = dtype
        self.path = path
        self.sampling_defaults: SamplingParams = sampling_defaults
        self.default_max_new_tokens: int = default_max_new_tokens
        # Decode steps of sink-window sessions on CUDA replay a captured graph (False: always eager).
        self.cuda_graphs = True
        self.eos_ids = set(self.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        self.bos_id = self.config.bos_token_id
        if self.bos_id is None and tokenizer is not None:
            self.bos_id = tokenizer.bos_id
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """What a saved session must match: sha256 (16 hex digits) of the model config and every
        weight as loaded (names, dtypes, shapes, bytes). It does not depend on where the checkpoint
        lies. Computed on first use (a session save or restore), then kept."""
        if self._fingerprint is None:
            digest = hashlib.sha256(repr(self.config).encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                data = tensor.detach().contiguous().cpu()
                digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
                digest.update(data.view(torch.uint8).numpy())  # raw bytes (bf16 has no numpy dtype)
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def session(self, sinks: int = 4, window: int = 1020, chunk: int | None = None, prefill: str = "iterative",
                seed: int | None = None, *, unbounded_cache: bool = False) -> Session:
        """A new stream with its own KV memory: `sinks` + `window` slots per KV-owning layer (an engine
        with one row).

        `window` counts the token being processed: a step sees the sinks and at most `window` recent
        tokens including itself. `chunk` tokens are ingested per step (at most `window`; default
        min(256, window) on CPU, min(1024, window) on CUDA). `prefill` "iterative" uses the LCKV
        parallel prefill, "sequential" feeds token by token (exact). `unbounded_cache=True` keeps every
        token instead (finite contexts). `seed` makes sampled replies reproducible (each reply's seed
        derives from it).
        """
        _check_seed(seed)
        engine = Engine(self, 1, sinks=sinks, window=window, chunk=chunk, prefill=prefill, unbounded=unbounded_cache)
        return Session(engine, engine.open_row(), seed=seed)

    def pool(self, slots: int, sinks: int = 4, window: int = 1020, chunk: int | None = None,
             prefill: str = "iterative", *, prefill_budget: int | None = None, pipelined: bool | None = None) -> SessionPool:
        """A pool of `slots` sessions on the rows of one engine: their steps run batched. Memory:
        `slots` x (sinks + window) slots per KV layer (plus one scratch row), allocated now.
        `pipelined`: see `streaming.engine.Engine`."""
        engine = Engine(self, slots, sinks=sinks, window=window, chunk=chunk, prefill=prefill,
                        prefill_budget=prefill_budget, pipelined=pipelined)
        return SessionPool(engine)

    def engine(self, rows: int, sinks: int = 4, window: int = 1020, chunk: int | None = None,
               prefill: str = "iterative", *, prefill_budget: int | None = None, pipelined: bool | None = None) -> Engine:
        """An engine of `rows` streams (see `streaming.engine.Engine`), for schedulers of their own."""
        return Engine(self, rows, sinks=sinks, window=window, chunk=chunk, prefill=prefill,
                      prefill_budget=prefill_budget, pipelined=pipelined)

    def restore_session(self, path) -> Session:
        """Re-open a session saved with `Session.save(path)`. CacheStateError naming `path` when the file
        is missing, not a state, damaged (its checksum does not match) or made for another model."""
        tensors, meta, extra = cache_state.load(path)  # (its errors name the path)
        try:
            if meta.get("kind") == "sink_window":
                session = self.session(meta["sinks"], meta["window"], chunk=extra.get("chunk"))
            else:
                session = self.session(unbounded_cache=True, chunk=extra.get("chunk"))
            if bool(extra.get("sequential", False)):
                session.engine.sequential = True
            session.restore(tensors, meta, extra)
        except cache_state.CacheStateError as exc:
            raise cache_state.CacheStateError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:  # settings no session can have
            raise cache_state.CacheStateError(f"{path}: not a usable session state ({exc!r})") from None
        return session

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerMissingError(
                f"{self.path} has no tokenizer (tokenizer.model or tokenizer.json): pass token ids instead of text"
            )
        return self.tokenizer

    def check_ids(self, ids) -> list[int]:
        """Validate token ids (a list/tuple of ints or a 1-D integer tensor) against the vocabulary."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
                raise InvalidInputError(f"token ids must be a 1-D integer tensor, got {tuple(ids.shape)} {ids.dtype}")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise InvalidInputError(f"expected text or a list of token ids, got {type(ids).__name__}")
        vocab = self.config.vocab_size
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
                raise InvalidInputError(f"token id {i!r} is not an integer in [0, {vocab})")
        return list(ids)


def _check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidInputError(f"seed must be an integer, got {seed!r}")
