"""A decoder layer's arithmetic around its attention, as functions of tensors only, eager or compiled.

`attention_inputs` (norm, projections, RoPE of the queries) and `layer_output` (output projection,
residual, norm, SwiGLU MLP, residual) take weights as arguments, so one compiled function serves
every layer of the same shape: compiling per layer would trace 22 copies. Between the two, the step
in streaming/forward.py stores the new keys and values and attends (the cache and the attention
kernel are not compiled). Under `torch.compile` the elementwise ops fuse (a bfloat16 RMSNorm is eight
kernels eagerly, one compiled); a CUDA graph of the step then replays the fused kernels, so the
compiled functions' host overhead (guards) is paid at capture only.

The eager functions are the reference: tests/test_compiled_layers.py shows the compiled ones agree.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import layer_gemv
from .rope import rotate


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama computes it: normalise in float32, scale in the input dtype."""
    if x.dtype == torch.float32:  # the same arithmetic in one fused op
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def attention_inputs(hidden, norm_weight, eps: float, weight, q_size: int, kv_size: int, cos, sin,
                     heads: int, kv_heads: int, head_dim: int):
    """hidden [B, n, hidden] -> (queries rotated by cos/sin [B, 1, n, D] as [B, H, n, D], or None when
    q_size is 0; keys and values, unrotated, [B, Hkv, n, D], or None when kv_size is 0).

    `weight` [q_size + 2 * kv_size, hidden] is the layer's q, k and v projections stacked (one GEMM
    instead of three: at one token a GEMM costs its launch as much as its bytes)."""
    x = rms_norm(hidden, norm_weight, eps)
    B, n, _ = x.shape
    projected = F.linear(x, weight)  # [B, n, q_size + 2 * kv_size]
    q = keys = values = None
    if q_size:
        q = rotate(projected[..., :q_size].view(B, n, heads, head_dim).transpose(1, 2), cos, sin)
    if kv_size:
        keys = projected[..., q_size : q_size + kv_size].view(B, n, kv_heads, head_dim).transpose(1, 2)
        values = projected[..., q_size + kv_size :].view(B, n, kv_heads, head_dim).transpose(1, 2)
    return q, keys, values


def layer_output(hidden, attn, o_weight, norm_weight, eps: float, gate_up_weight, down_weight):
    """hidden [B, n, hidden] and the layer's attention output attn [B, H, n, D] -> the layer's output:
    hidden + o(attn), then + down(silu(gate(x)) * up(x)) of its RMSNorm x. `gate_up_weight`
    [2 * intermediate, hidden]: the gate and up projections stacked (one GEMM)."""
    B, heads, n, D = attn.shape
    hidden = hidden + F.linear(attn.transpose(1, 2).reshape(B, n, heads * D), o_weight)
    x = rms_norm(hidden, norm_weight, eps)
    gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)
    return hidden + F.linear(F.silu(gate) * up, down_weight)


def final_logits(hidden, norm_weight, eps: float, head_weight):
    """Final norm + LM head: hidden [..., hidden] -> float32 logits [..., vocab]."""
    return F.linear(rms_norm(hidden, norm_weight, eps), head_weight).float()


class LayerMath:
    """The three functions a step calls, eager (the reference) or compiled with `torch.compile`
    (`mode`: torch.compile's, e.g. "max-autotune-no-cudagraphs" to let Inductor time its own GEMM
    templates against cuBLAS for these shapes; the step's own CUDA graphs do the rest).

    With `one_row` (the default), a hidden state of one row on CUDA goes through the GEMV kernels of
    `streaming/layer_gemv.py` instead (batch-1 decode: four launches per layer); off, every shape
    takes the functions above."""

    def __init__(self, compiled: bool = False, mode: str | None = None, one_row: bool = True):
        self.compiled, self.mode, self.one_row = compiled, mode, one_row
        wrap: Callable = (lambda fn: _compile(fn, mode)) if compiled else (lambda fn: fn)
        self._attention_inputs = wrap(attention_inputs)
        self._layer_output = wrap(layer_output)
        self._final_logits = wrap(final_logits)

    def _gemv(self, hidden: torch.Tensor) -> bool:
        return self.one_row and layer_gemv.usable(hidden)

    def attention_inputs(self, hidden, *args):
        if self._gemv(hidden):
            return layer_gemv.attention_inputs(hidden, *args)
        return self._attention_inputs(hidden, *args)

    def layer_output(self, hidden, *args):
        if self._gemv(hidden):
            return layer_gemv.layer_output(hidden, *args)
        return self._layer_output(hidden, *args)

    def final_logits(self, hidden, *args):
        if self._gemv(hidden):
            return layer_gemv.final_logits(hidden, *args)
        return self._final_logits(hidden, *args)


def _compile(fn: Callable, mode: str | None = None) -> Callable:
    # Shapes vary by batch bucket and chunk length: after the first recompile dynamo treats the
    # changing sizes as dynamic. The limit counts those variants (and with/without q or KV weights).
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(fn, fullgraph=True, mode=mode)
