"""A Llama-family decoder whose per-layer KV sharing is data: `config.kv_sources[i]`.

Module names equal Hugging Face checkpoint keys (`model.layers.N.self_attn.q_proj.weight`, ...), so a
checkpoint loads by name. Layers that own no keys/values have no k_proj/v_proj. The order in which
layers run (one pass, or the iterative LCKV prefill) lives in `streaming/forward.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .config import ModelConfig
from .rope import cos_sin, inverse_frequencies, rope_table, rotate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same arithmetic in one fused op (a decode step has 17 norms)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32 like the reference implementation, then scale in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Grouped-query attention; k_proj/v_proj exist only when the layer owns its keys/values."""

    def __init__(self, config: ModelConfig, owns_kv: bool):
        super().__init__()
        hidden, heads, kv_heads, dim = (
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim
        self.q_proj = nn.Linear(hidden, heads * dim, bias=False)
        if owns_kv:
            self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=False)
            self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=False)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, n, hidden] -> unrotated keys, values [B, Hkv, n, D]."""
        B, n, _ = x.shape
        k = self.k_proj(x).view(B, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        return self.q_proj(x).view(B, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, n, D]

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        B, _, n, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(B, n, self.heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.owns_kv = config.kv_sources[index] == index
        self.self_attn = Attention(config, self.owns_kv)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaBody(nn.Module):
    """The `model.*` part of a checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole checkpoint: `model.*` plus `lm_head` (shared with the embeddings when tied)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer(
            "inv_freq", inverse_frequencies(config.rope, config.head_dim), persistent=False
        )
        self.segments = config.segments
        self.attention_impl = "sdpa"  # or "plain": the reference softmax path
        # Decode steps on CUDA read the sink-window cache in a Triton kernel (RoPE where keys are
        # read, rows by index) when Triton is present; False keeps the plain path everywhere.
        self.decode_kernel = True
        self._rope_tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden [..., hidden] -> float32 logits [..., vocab]."""
        hidden = self.model.norm(hidden)
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return cos_sin(positions, self.inv_freq, dtype)

    def attention(self, layer, hidden, q, keys, values, mask) -> torch.Tensor:
        """One layer's attention block + MLP given rotated q [B,H,n,D], keys/values [B,Hkv,L,D]."""
        return self.after_attention(layer, hidden, attend(q, keys, values, mask, impl=self.attention_impl))

    def after_attention(self, layer, hidden, attn) -> torch.Tensor:
        """Output projection, residual and MLP of a layer given its attention output attn [B,H,n,D]."""
        hidden = hidden + layer.self_attn.output(attn)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def rope_table(self, slots: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [slots, D/2] float32 of in-cache positions 0..slots-1, built once per cache size."""
        key = (slots, torch.device(device))
        if key not in self._rope_tables:
            self._rope_tables[key] = rope_table(self.inv_freq.to(device), slots)
        return self._rope_tables[key]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate(x, cos, sin)
