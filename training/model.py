"""The model the recipe trains: a Llama decoder whose per-layer KV source is data (`kv_sources`).

Module names equal Hugging Face Llama checkpoint keys. `kv_sources[i]` is the layer whose keys/values
layer i attends to; identity = plain Llama. An LCKV map such as [0,6,6,6,6,6,6,7] is trained with the
iterative parallel forward of Wu & Tu (ACL 2024): the cyclic block (layers 1..6) runs m+b times, each
pass reading the target's KV from the previous pass (the target layer too), the first m without grad.
This training forward is independent of the runtime in `streaming/` on purpose: tests compare the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelShape:
    vocab_size: int = 8192
    hidden_size: int = 384
    intermediate_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 1024
    kv_sources: list[int] | None = None      # None = identity (plain Llama)
    force_nodiag: bool = False                # every layer masks its diagonal (LCKV checkpoints: true)
    forward_passes: int = 7                   # m: passes without gradient
    backward_passes: int = 2                  # b: passes with gradient (b >= 2 so the target's k/v train)
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict)

    @property
    def sources(self) -> list[int]:
        return self.kv_sources if self.kv_sources is not None else list(range(self.num_hidden_layers))

    @property
    def is_lckv(self) -> bool:
        return self.sources != list(range(self.num_hidden_layers))


def lckv_sources(num_layers: int, warmup_bottom: int = 1, warmup_top: int = 1) -> list[int]:
    """[0, t, t, ..., t, top...]: the top-most non-warmup layer t is the target of the layers below it."""
    target = num_layers - warmup_top - 1
    return [i if i < warmup_bottom or i >= target else target for i in range(num_layers)]


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama rotary tables (non-interleaved halves): positions (T,) -> cos, sin (T, head_dim) in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by position; computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


_NULL_SCORE = -1e4  # null key's extra feature: its score is -1e4 * scale against every query


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nodiag: bool) -> torch.Tensor:
    """Causal attention. q (B,H,T,D); k, v (B,H,T,D) already expanded to H heads.

    nodiag: token i sees keys j < i only, and token 0 (no key) gets exactly zero. Done with the fused
    causal kernel: keys/values shift right one slot, slot 0 holds a null key whose extra feature scores
    -1e4*scale (weight exactly 0 in fp32 beside any real key; weight 1 when alone) and a zero value.
    Head dim is padded 64 -> 72 so flash attention still applies; the softmax scale stays 1/sqrt(64).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if not nodiag:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    B, H, T, D = q.shape
    pad = 8
    qx = F.pad(q, (0, pad))
    qx[..., D] = 1.0
    kx = F.pad(k[:, :, :-1], (0, pad, 1, 0))      # (B,H,T,D+pad): slot 0 = null key
    kx[:, :, 0, D] = _NULL_SCORE
    vx = F.pad(v[:, :, :-1], (0, pad, 1, 0))      # null value = 0
    out = F.scaled_dot_product_attention(qx, kx, vx, is_causal=True, scale=scale)
    return out[..., :D]


def attend_reference(q, k, v, nodiag: bool) -> torch.Tensor:
    """Plain masked softmax in fp32, rows with no visible key -> 0. For tests only."""
    T = q.shape[-2]
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    visible = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1 if nodiag else 0)
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (weights @ v.float()).to(q.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, s: ModelShape, owns_kv: bool):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.hidden_size, s.num_attention_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.num_attention_heads * s.head_dim, s.hidden_size, bias=False)
        if owns_kv:  # layers whose index no layer reads have no k/v weights at all
            self.k_proj = nn.Linear(s.hidden_size, s.num_key_value_heads * s.head_dim, bias=False)
            self.v_proj = nn.Linear(s.hidden_size, s.num_key_value_heads * s.head_dim, bias=False)

    def kv(self, x, cos, sin):
        """x (B,T,C) normed -> k rotated, v: (B,Hkv,T,D)."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, -1, self.s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.s.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x, kv, cos, sin, nodiag: bool):
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, -1, self.s.head_dim).transpose(1, 2), cos, sin)
        k, v = kv
        rep = self.s.num_attention_heads // self.s.num_key_value_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # HF repeat_kv order
        y = attend(q, k.to(q.dtype), v.to(q.dtype), nodiag)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s: ModelShape, owns_kv: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = Attention(s, owns_kv)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s)
        self.owns_kv = owns_kv

    def forward(self, h, read_kv, cos, sin, nodiag: bool):
        """read_kv: the (k, v) to attend to, or None = this layer's own KV of this pass.
        Returns (h_out, own_kv or None): the KV this layer computed from its input, for others to read."""
        x = self.input_layernorm(h)
        own = self.self_attn.kv(x, cos, sin) if self.owns_kv else None
        h = h + self.self_attn(x, read_kv if read_kv is not None else own, cos, sin, nodiag)
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, own


class Backbone(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        owners = set(s.sources)
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s, i in owners) for i in range(s.num_hidden_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class CausalLM(nn.Module):
    """Tied-embedding decoder. forward(ids (B,T)) -> logits (B,T,V)."""

    def __init__(self, s: ModelShape):
        super().__init__()
        src = s.sources
        for i, j in enumerate(src):
            if j > i and src[j] != j:
                raise ValueError(f"layer {i} reads layer {j}, which does not own its KV")
        upward = [i for i, j in enumerate(src) if j > i]
        targets = {src[i] for i in upward}
        if len(targets) > 1:
            raise ValueError(f"one target layer supported, got {sorted(targets)}")
        self.s = s
        self.block = (min(upward), targets.pop()) if upward else None   # cyclic block [start, target]
        self.nodiag = s.force_nodiag or bool(upward)
        self.model = Backbone(s)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.s.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # residual-branch outputs scaled down by depth (GPT-2)
                scaled = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.s.num_hidden_layers) if scaled else std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, ids: torch.Tensor, passes: int | None = None) -> torch.Tensor:
        """ids (B,T) -> final normed hidden states (B,T,C).

        LCKV: the block runs `passes` times (default m+b); with grad enabled only the last b passes
        record it. Plain: one pass."""
        s = self.s
        src, layers = s.sources, self.model.layers
        T = ids.shape[1]
        cos, sin = rope_cos_sin(torch.arange(T, device=ids.device), s.head_dim, s.rope_theta)
        h = self.model.embed_tokens(ids)
        kv: dict[int, tuple] = {}          # KV each owning layer computed (block: in the previous pass)

        def run(i, h, read):
            h, own = layers[i](h, read, cos, sin, self.nodiag)
            if own is not None:
                kv_now[i] = own
            return h

        kv_now = kv
        if self.block is None:
            for i in range(s.num_hidden_layers):
                h = run(i, h, None if src[i] == i else kv[src[i]])
            return self.model.norm(h)
        start, target = self.block
        for i in range(start):
            h = run(i, h, None if src[i] == i else kv[src[i]])
        zeros = h.new_zeros(ids.shape[0], s.num_key_value_heads, T, s.head_dim)
        kv[target] = (zeros, zeros)        # the target's KV starts at zeros
        total = passes or (s.forward_passes + s.backward_passes)
        first_grad = total - s.backward_passes if torch.is_grad_enabled() else total
        h0 = h
        for p in range(total):
            with torch.set_grad_enabled(p >= first_grad):
                kv_now = {}
                x = h0
                for i in range(start, target + 1):
                    j = src[i]
                    if j == target:        # upward readers and the target itself: previous pass (ACL 2024)
                        read = kv[target]
                    elif j == i:
                        read = None
                    else:
                        read = kv_now.get(j, kv[j])
                    x = run(i, x, read)
                kv.update(kv_now)
            h = x
        kv_now = kv
        for i in range(target + 1, s.num_hidden_layers):
            h = run(i, h, None if src[i] == i else kv[src[i]])
        return self.model.norm(h)

    def forward(self, ids: torch.Tensor, passes: int | None = None) -> torch.Tensor:
        h = self.hidden_states(ids, passes)
        return F.linear(h, self.model.embed_tokens.weight)   # tied lm_head
