"""A decoder layer's arithmetic for one token (batch 1 decode), in four GEMV launches.

The same three functions as `streaming/layer_math.py`, with the same arguments and results, for a
hidden state of one row on CUDA: qkv with the RMSNorm before it and the queries' RoPE after it; o
with the residual; gate/up with the RMSNorm and SwiGLU; down with the residual. The eager and compiled
functions take eight or more launches per layer for the same work (norms, RoPE, SwiGLU and adds
between cuBLAS calls), and at batch 1 a launch costs more than its bytes. The kernels round where the
eager functions do; tests/test_gemv.py shows the two agree.
"""

from __future__ import annotations

import torch

from .kernels import gemv as kernels


def usable(hidden: torch.Tensor) -> bool:
    """Whether these functions serve `hidden`: one row on a CUDA device, kernels available."""
    return hidden.is_cuda and kernels.available(hidden)


def attention_inputs(hidden, norm_weight, eps: float, weight, q_size: int, kv_size: int, cos, sin,
                     heads: int, kv_heads: int, head_dim: int):
    """As `layer_math.attention_inputs`, for hidden [B, n, hidden] with B * n == 1."""
    B, n, _ = hidden.shape
    rotate = (cos, sin, q_size) if q_size else None
    projected = kernels.gemv(hidden, weight, norm=(norm_weight, eps), rotate=rotate)  # [1, 1, q + 2 kv]
    q = keys = values = None
    if q_size:
        q = projected[..., :q_size].view(B, n, heads, head_dim).transpose(1, 2)
    if kv_size:
        keys = projected[..., q_size : q_size + kv_size].view(B, n, kv_heads, head_dim).transpose(1, 2)
        values = projected[..., q_size + kv_size :].view(B, n, kv_heads, head_dim).transpose(1, 2)
    return q, keys, values


def layer_output(hidden, attn, o_weight, norm_weight, eps: float, gate_up_weight, down_weight):
    """As `layer_math.layer_output`, for hidden [1, 1, hidden] and attn [1, H, 1, D]."""
    hidden = kernels.gemv(attn.reshape(1, 1, -1), o_weight, residual=hidden)
    act = kernels.gemv(hidden, gate_up_weight, norm=(norm_weight, eps), swiglu=True)  # [1, 1, intermediate]
    return kernels.gemv(act, down_weight, residual=hidden)


def final_logits(hidden, norm_weight, eps: float, head_weight):
    """As `layer_math.final_logits`, for hidden [..., hidden] of one row: float32 logits."""
    return kernels.gemv(hidden, head_weight, norm=(norm_weight, eps), out_dtype=torch.float32)
