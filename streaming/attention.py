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
    B, heads, n, D = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    if group > 1:
        # GQA without copying the cache: query head h reads KV head h // group, so the `group` query
        # heads of one KV head become `group * n` query rows of that head: [B, Hkv, group*n, D].
        q = q.reshape(B, kv_heads, group * n, D)
        mask = mask[:, None].expand(B, group, n, mask.shape[-1]).reshape(B, group * n, -1)
    sees_any = mask.any(dim=-1, keepdim=True)  # [B, rows, 1]
    if impl == "plain":
        out = _plain(q, keys, values, mask, sees_any)
    elif impl == "sdpa":
        # Rows with no visible key are opened fully (to avoid NaN) and then zeroed.
        safe = (mask | ~sees_any)[:, None]  # [B, 1, rows, L]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=safe)
        out = out * sees_any[:, None].to(out.dtype)
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
