"""Rotary position embeddings (RoPE) with the scaling variants Llama checkpoints use.

Positions handed to these functions are the in-cache positions of DESIGN.md: small numbers bounded by
the cache size, never the absolute index of a token in the stream.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, scaled as `rope.rope_type` asks."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, L] (int) -> cos, sin [B, 1, L, head_dim] in `dtype`, computed in float32."""
    angles = positions.float()[..., None] * inv_freq  # [B, L, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, L, D]
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rope_table(inv_freq: torch.Tensor, slots: int,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [slots, D/2] in `dtype` for in-cache positions 0..slots-1 (all a sink window ever
    uses): the half-width table the decode kernel reads, the same values as `cos_sin` (computed in
    float32, then rounded to `dtype`)."""
    angles = torch.arange(slots, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()
    return angles.cos().to(dtype).contiguous(), angles.sin().to(dtype).contiguous()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to x [B, H, L, D] with cos/sin [B, 1, L, D] (the rotate-half convention of HF Llama):
    x * cos + cat(-x2, x1) * sin, written as one product and two in-place multiply-adds on the halves
    (no concatenated copy: a step rotates every cached key, so temporaries cost memory traffic)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = x * cos
    out[..., :half].addcmul_(x2, sin[..., :half], value=-1)
    out[..., half:].addcmul_(x1, sin[..., half:])
    return out
