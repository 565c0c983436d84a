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
from .layer_math import LayerMath, rms_norm
from .rope import cos_sin, inverse_frequencies, rope_table, rotate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


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


class DecoderLayer(nn.Module):
    """One layer. Its arithmetic is `self.math`'s (eager, or compiled by `CausalLM.compile_layers`);
    where its keys and values go and what it attends to is the caller's `attend`."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.owns_kv = config.kv_sources[index] == index
        self.self_attn = Attention(config, self.owns_kv)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.math = LayerMath()
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None  # see stacked_weights

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """hidden [B, n, hidden] -> [B, n, hidden]. `attend(q, keys, values)` gets the rotated queries
        [B, H, n, D] and this layer's new unrotated keys and values [B, Hkv, n, D] (None when it owns
        none) and returns the attention output [B, H, n, D]."""
        q, keys, values = self.attention_inputs(hidden, cos, sin)
        return self.output(hidden, attend(q, keys, values))

    def attention_inputs(self, hidden, cos, sin, *, queries: bool = True):
        """(rotated queries or None when not `queries`, new keys, new values or None, None)."""
        attn, norm = self.self_attn, self.input_layernorm
        q_size = attn.heads * attn.head_dim if queries else 0
        kv_size = attn.kv_heads * attn.head_dim if self.owns_kv else 0
        qkv = self.stacked_weights()[0]
        weight = qkv if queries else qkv[attn.heads * attn.head_dim :]
        return self.math.attention_inputs(hidden, norm.weight, norm.eps, weight, q_size, kv_size, cos, sin,
                                          attn.heads, attn.kv_heads, attn.head_dim)

    def output(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and MLP given the attention output attn [B, H, n, D]."""
        norm = self.post_attention_layernorm
        return self.math.layer_output(hidden, attn, self.self_attn.o_proj.weight, norm.weight, norm.eps,
                                      self.stacked_weights()[1], self.mlp.down_proj.weight)

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k, v projections stacked [q + 2 kv, hidden]; gate and up stacked [2 intermediate, hidden]).

        Made once, the first time a step needs them: the projections' parameters then become views
        of the stacked tensors (the same values and names, no second copy of the weights)."""
        if self._stacked is None:
            attn, mlp = self.self_attn, self.mlp
            names = [(attn, "q_proj")] + ([(attn, "k_proj"), (attn, "v_proj")] if self.owns_kv else [])
            self._stacked = (_stack(names), _stack([(mlp, "gate_proj"), (mlp, "up_proj")]))
        return self._stacked


def _stack(linears: list[tuple[nn.Module, str]]) -> torch.Tensor:
    """Concatenate the weights of `linears` (parent module, attribute name) along the output dimension and
    make each weight a view of the result."""
    weights = [getattr(parent, name).weight for parent, name in linears]
    if len(weights) == 1:
        return weights[0]
    stacked = torch.cat([w.detach() for w in weights])
    start = 0
    for (parent, name), weight in zip(linears, weights):
        rows = weight.shape[0]
        getattr(parent, name).weight = nn.Parameter(stacked[start : start + rows], requires_grad=weight.requires_grad)
        start += rows
    return stacked


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
        # Steps of several tokens per row on CUDA (prompt chunks) likewise, in the chunk kernel.
        self.chunk_kernel = True
        self.math = LayerMath()  # the final norm + head's; compile_layers gives every layer the same
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: hidden [..., hidden] -> float32 logits [..., vocab]."""
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        norm = self.model.norm
        return self.math.final_logits(hidden, norm.weight, norm.eps, weight)

    def compile_layers(self, compiled: bool = True, mode: str | None = None) -> None:
        """Run every layer's arithmetic (and the final norm + head) through `torch.compile`d functions
        (one set shared by all layers; `mode` as torch.compile's), or back through the eager
        reference when False."""
        self.math = LayerMath(compiled, mode, one_row=self.math.one_row)
        for layer in self.model.layers:
            layer.math = self.math

    @property
    def one_row_kernels(self) -> bool:
        """Whether a one-token step on CUDA (batch-1 decode) runs each layer in the GEMV kernels of
        `streaming/layer_gemv.py` (default) rather than the eager or compiled functions."""
        return self.math.one_row

    @one_row_kernels.setter
    def one_row_kernels(self, on: bool) -> None:
        self.math.one_row = bool(on)  # every layer shares this LayerMath

    def stack_weights(self) -> None:
        """Stack every layer's q/k/v and gate/up projections now (see DecoderLayer.stacked_weights)."""
        for layer in self.model.layers:
            layer.stacked_weights()

    @property
    def layers_compiled(self) -> bool:
        return self.math.compiled

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return cos_sin(positions, self.inv_freq, dtype)

    def attend(self, q, keys, values, mask) -> torch.Tensor:
        """Attention of rotated q [B,H,n,D] over keys/values [B,Hkv,L,D] with `self.attention_impl`."""
        return attend(q, keys, values, mask, impl=self.attention_impl)

    def rope_table(self, slots: int, device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [slots, D/2] in `dtype` of in-cache positions 0..slots-1, built once per cache size."""
        key = (slots, torch.device(device), dtype)
        if key not in self._rope_tables:
            self._rope_tables[key] = rope_table(self.inv_freq.to(device), slots, dtype)
        return self._rope_tables[key]

    def rope_at(self, positions: torch.Tensor, slots: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """As `rope` for positions [B, n] below `slots`: cos, sin [B, 1, n, D] in `dtype`, the rows of
        a full-width table built once per cache size (two gathers instead of computing the angles)."""
        key = (slots, positions.device, dtype, "full")
        if key not in self._rope_tables:  # both halves of a head share the angles: the kernel's table twice
            cos, sin = self.rope_table(slots, positions.device, dtype)
            self._rope_tables[key] = (torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1))
        cos, sin = self._rope_tables[key]
        flat = positions.reshape(-1)
        shape = positions.shape[:1] + (1,) + positions.shape[1:] + (cos.shape[-1],)
        return cos.index_select(0, flat).view(shape), sin.index_select(0, flat).view(shape)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate(x, cos, sin)
