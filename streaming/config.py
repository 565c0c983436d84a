"""Model configuration: a dataclass whose fields mirror a checkpoint's config.json.

Three families are accepted (DESIGN.md, "The model"):
- `llama` / `mistral` (no sliding window): every layer keeps its own keys/values.
- `lckv-llama`: `layer_types` is an underscore string, entry i = the layer whose KV layer i reads.
- `opt-llama` (ACL-2024 LCKV): `layer_types` codes 0 own KV, 1 reads the target, 2 is the target.
All are reduced to the same per-layer data: `kv_sources[i]` and `nodiag[i]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "lckv-llama", "opt-llama")

# Keys that describe training or bookkeeping only; they never change inference.
HARMLESS_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "use_cache", "attention_dropout", "_name_or_path", "auto_map", "output_attentions",
    "output_hidden_states", "return_dict", "tie_encoder_decoder", "is_encoder_decoder",
    "pad_token_id", "model_type", "use_sequential", "_attn_implementation",
    "_attn_implementation_autoset", "train_kv", "num_trained_encoders", "num_encoders",
    "target_layer", "forward_passes", "backward_passes", "force_nodiag", "layer_types",
    "rope_theta", "rope_scaling", "rope_parameters", "sliding_window", "max_window_layers",
    "use_sliding_window", "chunk_size_feed_forward", "problem_type", "id2label", "label2id",
    "bos_token_id", "eos_token_id", "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp",
    "head_dim", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps",
    "max_position_embeddings", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "layer_type_codes",
}


@dataclass
class RopeConfig:
    """Rotary embedding settings; `rope_type` is one of default, linear, llama3."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    """Everything the runtime needs to build and run one checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    rope: RopeConfig = field(default_factory=RopeConfig)
    model_type: str = "llama"
    # Per layer: index of the layer whose keys/values it attends to.
    kv_sources: list[int] = field(default_factory=list)
    # Per layer: True when the layer must not see the current token (its diagonal is masked).
    nodiag: list[bool] = field(default_factory=list)
    forward_passes: int = 7  # m: LCKV prefill passes without gradient at training time
    backward_passes: int = 2  # b
    torch_dtype: str | None = None

    @property
    def kv_layers(self) -> list[int]:
        """Layers that own (and cache) keys/values."""
        return sorted(set(self.kv_sources))

    @property
    def is_condensed(self) -> bool:
        """True when some layer reads another layer's KV (an LCKV model)."""
        return any(src != i for i, src in enumerate(self.kv_sources))

    @property
    def prefill_passes(self) -> int:
        """m + b: passes of the cyclic block during parallel prefill."""
        return self.forward_passes + self.backward_passes

    @property
    def segments(self) -> list[tuple[int, int]]:
        """Runs of layers (lo, hi): single layers, or LCKV cyclic blocks (see `layer_segments`)."""
        return layer_segments(self.kv_sources)

    def sees_diagonal(self, layer: int) -> bool:
        """Whether `layer`'s query for token t may see token t's own key."""
        return not self.nodiag[layer] and self.kv_sources[layer] <= layer

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: config.json must hold a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        return _parse(raw)


def layer_segments(kv_sources: list[int]) -> list[tuple[int, int]]:
    """Split layers into runs (lo, hi): a single layer (lo == hi) or a cyclic block.

    A cyclic block spans from an upward-reading layer to the highest layer it (transitively) reads.
    """
    segments, i, layers = [], 0, len(kv_sources)
    while i < layers:
        hi = i
        if kv_sources[i] > i:
            hi = kv_sources[i]
            j = i
            while j <= hi:  # widen the block while a layer inside reads further up
                hi = max(hi, kv_sources[j])
                j += 1
        segments.append((i, hi))
        i = hi + 1
    return segments


def _need_int(raw: dict, key: str, *, minimum: int = 1, default: Any = ...) -> int:
    if key not in raw or raw[key] is None:
        if default is ...:
            raise ConfigError(f"config field '{key}' is required")
        return default
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config field '{key}' must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"config field '{key}' must be >= {minimum}, got {value}")
    return value


def _need_number(raw: dict, key: str, default: float) -> float:
    value = raw.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"config field '{key}' must be a positive number, got {value!r}")
    return float(value)


def _parse(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"config field 'model_type' is {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    unknown = sorted(k for k in raw if k not in HARMLESS_KEYS)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}: refusing to guess their meaning")
    _reject_unsupported_features(raw, model_type)

    layers = _need_int(raw, "num_hidden_layers")
    heads = _need_int(raw, "num_attention_heads")
    hidden = _need_int(raw, "hidden_size")
    kv_heads = _need_int(raw, "num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise ConfigError(
            f"config field 'num_attention_heads' ({heads}) must be a multiple of "
            f"'num_key_value_heads' ({kv_heads})"
        )
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"'hidden_size' {hidden} is not divisible by 'num_attention_heads' {heads}")
        head_dim = hidden // heads
    else:
        head_dim = _need_int(raw, "head_dim")
    if head_dim % 2:
        raise ConfigError(f"config field 'head_dim' must be even for RoPE, got {head_dim}")

    sources, nodiag, m, b = _layer_plan(raw, model_type, layers)
    eos = raw.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
        raise ConfigError(f"config field 'eos_token_id' must be an int or a list of ints, got {eos!r}")
    bos = raw.get("bos_token_id")
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        raise ConfigError(f"config field 'bos_token_id' must be an int, got {bos!r}")

    return ModelConfig(
        vocab_size=_need_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_need_int(raw, "intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_need_number(raw, "rms_norm_eps", 1e-6),
        max_position_embeddings=_need_int(raw, "max_position_embeddings", default=2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        rope=_parse_rope(raw),
        model_type=model_type,
        kv_sources=sources,
        nodiag=nodiag,
        forward_passes=m,
        backward_passes=b,
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
    )


def _reject_unsupported_features(raw: dict, model_type: str) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise ConfigError(f"config field '{key}' is true; biased projections are not supported")
    if raw.get("pretraining_tp", 1) != 1:
        raise ConfigError("config field 'pretraining_tp' must be 1")
    if model_type == "mistral" and raw.get("sliding_window") is not None:
        raise ConfigError(
            "config field 'sliding_window' is set: Mistral sliding-window attention is not supported "
            "(use a checkpoint with sliding_window null)"
        )
    if model_type == "llama" and raw.get("use_sliding_window"):
        raise ConfigError("config field 'use_sliding_window' is true: sliding windows are not supported")


def _parse_rope(raw: dict) -> RopeConfig:
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"config field 'rope_parameters' must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"config field 'rope_scaling' must be an object or null, got {scaling!r}")
    merged = dict(scaling or {})
    merged.update(params or {})
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config field 'rope_theta' must be a positive number, got {theta!r}")
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    rope = RopeConfig(theta=float(theta), rope_type=rope_type)
    if rope_type == "default":
        return rope
    if rope_type not in ("linear", "llama3"):
        raise ConfigError(
            f"rope type {rope_type!r} (config 'rope_scaling'/'rope_parameters') is not supported; "
            "supported: default, linear, llama3"
        )
    rope.factor = _need_number(merged, "factor", 1.0)
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in merged:
                raise ConfigError(f"llama3 rope scaling needs field '{key}'")
        rope.low_freq_factor = _need_number(merged, "low_freq_factor", 1.0)
        rope.high_freq_factor = _need_number(merged, "high_freq_factor", 4.0)
        if rope.high_freq_factor <= rope.low_freq_factor:
            raise ConfigError("rope scaling 'high_freq_factor' must exceed 'low_freq_factor'")
        rope.original_max_position_embeddings = _need_int(merged, "original_max_position_embeddings")
    return rope


def _layer_plan(raw: dict, model_type: str, layers: int) -> tuple[list[int], list[bool], int, int]:
    """Return (kv_sources, nodiag, m, b) for the config's layer layout."""
    if model_type in ("llama", "mistral"):
        return list(range(layers)), [False] * layers, 1, 0
    if model_type == "lckv-llama":
        return _lckv_plan(raw, layers)
    return _opt_llama_plan(raw, layers)


def _split_layer_types(raw: dict, layers: int) -> list[str]:
    value = raw.get("layer_types")
    if isinstance(value, str):
        parts = value.split("_")
    elif isinstance(value, list):
        parts = [str(p) for p in value]
    else:
        raise ConfigError(f"config field 'layer_types' is required (underscore string), got {value!r}")
    if len(parts) != layers:
        raise ConfigError(
            f"config field 'layer_types' has {len(parts)} entries but 'num_hidden_layers' is {layers}"
        )
    return parts


def _lckv_plan(raw: dict, layers: int) -> tuple[list[int], list[bool], int, int]:
    sources = []
    for i, part in enumerate(_split_layer_types(raw, layers)):
        if part.endswith("s"):
            raise ConfigError(
                f"config field 'layer_types' entry {i} ({part!r}) is a sliding-window layer; "
                "sliding-window LCKV layers are not supported yet"
            )
        if not part.isdigit() or int(part) >= layers:
            raise ConfigError(f"config field 'layer_types' entry {i} ({part!r}) is not a layer index")
        sources.append(int(part))
    for i, src in enumerate(sources):
        if sources[src] != src:
            raise ConfigError(
                f"config field 'layer_types': layer {i} reads layer {src}, which does not own its KV "
                f"(it reads layer {sources[src]})"
            )
    m = _need_int(raw, "forward_passes", default=7)
    b = _need_int(raw, "backward_passes", minimum=0, default=2)
    force = raw.get("force_nodiag", False)
    if not isinstance(force, bool):
        raise ConfigError(f"config field 'force_nodiag' must be true or false, got {force!r}")
    nodiag = [force or src > i for i, src in enumerate(sources)]
    return sources, nodiag, m, b


def _opt_llama_plan(raw: dict, layers: int) -> tuple[list[int], list[bool], int, int]:
    codes = _split_layer_types(raw, layers)
    if any(c not in ("0", "1", "2") for c in codes):
        raise ConfigError(f"config field 'layer_types' of an opt-llama model must hold codes 0/1/2, got {codes}")
    target = raw.get("target_layer")
    if isinstance(target, bool) or not isinstance(target, int) or not -layers <= target < layers:
        raise ConfigError(f"config field 'target_layer' must be a layer index, got {target!r}")
    target %= layers
    if codes[target] != "2":
        raise ConfigError(f"config field 'target_layer' ({target}) is not the layer with code 2")
    if codes.count("2") != 1:
        raise ConfigError("config field 'layer_types' of an opt-llama model must hold exactly one code 2")
    sources = [i if c == "0" else target for i, c in enumerate(codes)]
    encoders = _need_int(raw, "num_encoders", default=8)  # = m + b - 1
    trained = _need_int(raw, "num_trained_encoders", minimum=0, default=1)  # = b - 1
    b = trained + 1
    m = encoders + 1 - b
    if m < 1:
        raise ConfigError("config fields 'num_encoders'/'num_trained_encoders' give fewer than 1 forward pass")
    return sources, [True] * layers, m, b
