"""Masked grouped-query attention with the zero-output rule for queries that see no key.

`plain` is the obviously-correct reference (explicit softmax in float32); `sdpa` uses PyTorch's fused
kernel. tests/test_attention.py shows they agree.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# On CUDA, SDPA may pick cuDNN, which builds a plan per new input shape: about 40 ms on an H200 the
# first time each (rows, chunk length) appears. An engine's prompt chunks come in ever new shapes, so
# every burst of replies paid it inside a step (benchmarks/DECISIONS.md). The
# memory-efficient kernel takes the additive mask with no per-shape setup.
_CUDA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


class PreparedMask:
    """A mask [B, n, L] bool in the form `attend` uses, built once per step and shared by every layer
    with the same mask: GQA's `group` query heads per KV head as group*n rows, an additive float mask
    for SDPA (rows that see no key opened fully, to avoid NaN) and the zeroing factor for those rows
    (None when every row sees a key, known without a device sync on CPU only)."""

    def __init__(self, mask: torch.Tensor, group: int, dtype: torch.dtype):
        B, n, L = mask.shape
        if group > 1:
            mask = mask[:, None].expand(B, group, n, L).reshape(B, group * n, L)
        self.mask = mask  # bool [B, rows, L]
        self.sees_any = mask.any(dim=-1, keepdim=True)  # [B, rows, 1]
        opened = mask | ~self.sees_any
        self.additive = torch.zeros(opened.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~opened, float("-inf"))[:, None]  # [B, 1, rows, L]
        everyone_sees = mask.device.type == "cpu" and bool(self.sees_any.all())
        self.zero_rows = None if everyone_sees else self.sees_any[:, None].to(dtype)  # [B, 1, rows, 1]


def attend(q, keys, values, mask, *, impl: str = "sdpa") -> torch.Tensor:
    """q [B,H,n,D], keys/values [B,Hkv,L,D] (rotated), mask [B,n,L] bool (True = visible) or a
    `PreparedMask` of it -> [B,H,n,D].

    A query whose mask row is all False gets an output of exactly zero, never a softmax over nothing.
    """
    B, heads, n, D = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    if not isinstance(mask, PreparedMask):
        mask = PreparedMask(mask, group, q.dtype)
    # GQA without copying the cache: query head h reads KV head h // group, so the `group` query
    # heads of one KV head become `group * n` query rows of that head: [B, Hkv, group*n, D].
    q = q.reshape(B, kv_heads, group * n, D)
    if impl == "plain":
        out = _plain(q, keys, values, mask.mask, mask.sees_any)
    elif impl == "sdpa":
        with sdpa_kernel(_CUDA_BACKENDS) if q.is_cuda else nullcontext():
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.additive)
        if mask.zero_rows is not None:
            out = out * mask.zero_rows
    else:
        raise ValueError(f"unknown attention implementation {impl!r}")
    return out.reshape(B, heads, n, D)


def _plain(q, keys, values, mask, sees_any) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale  # [B, H, n, L]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    weights = torch.softmax(scores.masked_fill(~sees_any[:, None], 0.0), dim=-1)
    weights = weights * sees_any[:, None]  # all-masked rows -> zero weights -> zero output
    return torch.matmul(weights, values.float()).to(q.dtype)
