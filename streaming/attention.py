"""Masked grouped-query attention with the zero-output rule for queries that see no key.

`plain` is the obviously-correct reference (explicit softmax in float32); `sdpa` uses PyTorch's fused
kernel. tests/test_attention.py shows they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q, keys, values, mask, *, impl: str = "sdpa") -> torch.Tensor:
    """q [B,H,n,D], keys/values [B,Hkv,L,D] (rotated), mask [B,n,L] bool (True = visible) -> [B,H,n,D].

    A query whose mask row is all False gets an output of exactly zero, never a softmax over nothing.
    """
    heads, kv_heads = q.shape[1], keys.shape[1]
    if heads != kv_heads:
        # GQA: query head h reads KV head h // (H / Hkv).
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        values = values.repeat_interleave(heads // kv_heads, dim=1)
    sees_any = mask.any(dim=-1, keepdim=True)  # [B, n, 1]
    if impl == "plain":
        return _plain(q, keys, values, mask, sees_any)
    if impl != "sdpa":
        raise ValueError(f"unknown attention implementation {impl!r}")
    # Rows with no visible key are opened fully (to avoid NaN) and then zeroed.
    safe = (mask | ~sees_any)[:, None]  # [B, 1, n, L]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=safe)
    return out * sees_any[:, None].to(out.dtype)


def _plain(q, keys, values, mask, sees_any) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale  # [B, H, n, L]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    weights = torch.softmax(scores.masked_fill(~sees_any[:, None], 0.0), dim=-1)
    weights = weights * sees_any[:, None]  # all-masked rows -> zero weights -> zero output
    return torch.matmul(weights, values.float()).to(q.dtype)
