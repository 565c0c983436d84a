"""Sampling settings and the pure functions that pick the next token from logits ``[B, V]``.

Nothing here reads a tensor value back to the host (no ``.item()``, no data-dependent Python
branch), so ``sample`` can run inside a captured decode step. Randomness comes only from the
``torch.Generator`` passed in: the same seed gives the same tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from .errors import ConfigError, InvalidInputError

GENERATION_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy; top_k 0 = off; top_p 1 = off; penalty 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        """Raise InvalidInputError naming the first bad field; return self."""
        _number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise InvalidInputError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        _number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        _number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidInputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidInputError(f"seed must be an int or None, got {self.seed!r}")
        return self

    def merged(self, **overrides) -> "SamplingParams":
        """A validated copy with the given fields replaced; None values are ignored."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise InvalidInputError(f"unknown sampling parameter(s) {sorted(unknown)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()

    def as_dict(self) -> dict:
        return asdict(self)


def _number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}")


def load_generation_defaults(checkpoint_dir) -> dict:
    """Sampling defaults from ``generation_config.json`` ({} when absent).

    Keeps only temperature, top_k, top_p and repetition_penalty; other keys are ignored, except
    that ``"do_sample": false`` means greedy (as in transformers) and sets temperature to 0.
    A malformed file or value raises ConfigError naming the file and key.
    """
    path, data = _read_generation_config(checkpoint_dir)
    out = {k: data[k] for k in GENERATION_KEYS if data.get(k) is not None}
    if data.get("do_sample") is False:
        out["temperature"] = 0.0
    try:
        SamplingParams(**out).validate()
    except InvalidInputError as e:
        raise ConfigError(f"{path}: {e}") from None
    return out


def load_max_new_tokens(checkpoint_dir) -> int | None:
    """The reply length ``generation_config.json`` asks for (its ``max_new_tokens``), None when absent.

    A value that is not a positive integer raises ConfigError naming the file and key.
    """
    path, data = _read_generation_config(checkpoint_dir)
    value = data.get("max_new_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: 'max_new_tokens' must be a positive integer, got {value!r}")
    return value


def _read_generation_config(checkpoint_dir) -> tuple[Path, dict]:
    """(path, parsed object) of ``generation_config.json``; {} when the file is absent."""
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return path, {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return path, data


# -- pure functions on logits [B, V] ---------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / transformers repetition penalty on the tokens already seen; returns a new tensor.

    ``seen``: a bool mask ``[B, V]`` or token ids ``[B, T]`` (duplicates fine, negative = padding).
    Seen logits that are positive are divided by ``penalty``, negative ones multiplied by it.
    """
    if penalty == 1.0:
        return logits
    if seen.dtype == torch.bool:
        mask = seen
    else:
        mask = _ids_mask(seen, seen >= 0, logits.shape[-1])
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(mask, penalized, logits)


def _ids_mask(ids: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    # count hits per column ([B, V]); padding ids add 0 at column 0. (A bool scatter_ with duplicate
    # indices would keep an arbitrary writer, letting padding erase a real hit on column 0.)
    counts = torch.zeros(ids.shape[0], vocab, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, ids.clamp(min=0).long(), valid.to(torch.int32))
    return counts > 0


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept), the rest -inf. k <= 0: off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability >= p.

    A token is dropped when the tokens more likely than it already reach p; the most likely token
    always stays. p >= 1: off.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [B, V] probability of strictly better tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    *,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token per row: LongTensor ``[B]`` on the logits' device.

    Order: repetition penalty (when ``seen`` is given), then temperature 0 -> argmax; otherwise
    divide by temperature, top-k, top-p, and draw from the softmax with ``generator``.
    Drawing uses the exponential race (argmax of p / E, E ~ Exp(1)), an exact categorical sample
    that, unlike ``torch.multinomial``, needs no host synchronisation.
    """
    if logits.dim() != 2:
        raise InvalidInputError(f"logits must have shape [B, V], got {tuple(logits.shape)}")
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / race, dim=-1)


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    """A torch.Generator on ``device``, seeded with ``seed`` (random seed when None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
