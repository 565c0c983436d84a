"""A deliberately plain reference of the model and its caches, for the correctness tests.

It shares no code with `streaming/` or `cache/`: it reads the raw config.json dict and the weights dict
and runs everything token by token in float64 with Python loops (DESIGN.md, "Attention semantics").

- `Reference.stream(ids, chunks, sinks, window)` is the exact (sequential) semantics: per chunk the held
  tokens are chosen first (all tokens, or the first S plus the last W StreamingLLM-style, which makes
  room for the chunk: evict-for-space), then the chunk's tokens run one by one, bottom-up. Keys are kept
  raw (unrotated) per layer and per token, and rotated at read time by the token's index among the held
  tokens; the query's position is its own index among them.
- `Reference.iterate_chunk(...)` runs the LCKV parallel prefill with its passes written out explicitly.
"""

from __future__ import annotations

import math

import torch

DT = torch.float64


class Reference:
    def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
        self.cfg = config
        self.w = {k: v.to(DT) for k, v in weights.items()}
        self.layers = config["num_hidden_layers"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or config["hidden_size"] // self.heads
        self.eps = config.get("rms_norm_eps", 1e-6)
        params = config.get("rope_parameters") or {}
        assert params.get("rope_type", "default") == "default" and not config.get("rope_scaling")
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        # Frequency of dimension pair (d, d + D/2): theta ** (-2d / D).
        self.freqs = theta ** (-2.0 * torch.arange(self.head_dim // 2, dtype=DT) / self.head_dim)
        self.sources, self.nodiag = _layer_plan(config)
        self.embed = self.w["model.embed_tokens.weight"]
        self.head = self.w.get("lm_head.weight", self.embed) if not config.get("tie_word_embeddings") else self.embed

    # ---- building blocks -------------------------------------------------------------------------

    def p(self, layer: int, name: str) -> torch.Tensor:
        return self.w[f"model.layers.{layer}.{name}.weight"]

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x / torch.sqrt((x * x).mean() + self.eps)

    def rope(self, x: torch.Tensor, pos) -> torch.Tensor:
        """x [..., heads, D] rotated by angle pos * freq on each pair (d, d + D/2); pos int or [L]."""
        angles = torch.as_tensor(pos, dtype=DT)[..., None, None] * self.freqs  # [..., 1, D/2]
        c, s = angles.cos(), angles.sin()
        a, b = x[..., : self.head_dim // 2], x[..., self.head_dim // 2 :]
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1)

    def attend(self, q: torch.Tensor, K, V) -> torch.Tensor:
        """q [H, D] (rotated); K (rotated) / V [L, Hkv, D] or None. No key -> exactly zero."""
        out = torch.zeros(self.heads, self.head_dim, dtype=DT)
        if K is None:
            return out
        group = self.heads // self.kv_heads
        for h in range(self.heads):
            g = h // group  # GQA: query head h reads KV head h // (H / Hkv)
            scores = K[:, g] @ q[h] / math.sqrt(self.head_dim)  # [L]
            out[h] = torch.softmax(scores, dim=0) @ V[:, g]
        return out

    def qkv(self, layer: int, x: torch.Tensor):
        """x [hidden] (normed) -> unrotated q [H, D], k/v [Hkv, D] (None when the layer owns no KV)."""
        q = (self.p(layer, "self_attn.q_proj") @ x).view(self.heads, self.head_dim)
        if self.sources[layer] != layer:
            return q, None, None
        k = (self.p(layer, "self_attn.k_proj") @ x).view(self.kv_heads, self.head_dim)
        v = (self.p(layer, "self_attn.v_proj") @ x).view(self.kv_heads, self.head_dim)
        return q, k, v

    def finish(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual + o_proj, then the SwiGLU MLP block."""
        h = h + self.p(layer, "self_attn.o_proj") @ attn.reshape(-1)
        x = self.rms(h, self.p(layer, "post_attention_layernorm"))
        gate, up = self.p(layer, "mlp.gate_proj") @ x, self.p(layer, "mlp.up_proj") @ x
        return h + self.p(layer, "mlp.down_proj") @ (torch.nn.functional.silu(gate) * up)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head @ self.rms(h, self.w["model.norm.weight"])

    def visible(self, layer: int, store: dict, t: int, pos: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values [L, Hkv, D] of `layer`'s source layer for the query of token t."""
        src = self.sources[layer]
        sees_self = not self.nodiag[layer] and src <= layer
        seen = [j for j in sorted(store[src]) if j < t or (j == t and sees_self)]
        if not seen:
            return None, None
        keys = torch.stack([store[src][j][0] for j in seen])
        values = torch.stack([store[src][j][1] for j in seen])
        return self.rope(keys, [pos[j] for j in seen]), values

    # ---- exact sequential semantics --------------------------------------------------------------

    def new_store(self) -> dict:
        return {i: {} for i in range(self.layers) if self.sources[i] == i}

    def token(self, store: dict, t: int, token_id: int, pos: dict) -> torch.Tensor:
        """Run token t bottom-up, storing its KV; return its logits [vocab]."""
        h = self.embed[token_id].clone()
        for i in range(self.layers):
            x = self.rms(h, self.p(i, "input_layernorm"))
            q, k, v = self.qkv(i, x)
            if k is not None:
                store[i][t] = (k, v)
            keys, values = self.visible(i, store, t, pos)
            h = self.finish(i, h, self.attend(self.rope(q, pos[t]), keys, values))
        return self.logits(h)

    def stream(self, ids, chunks=None, *, sinks=None, window=None, store=None, start=0):
        """Exact logits [n, vocab] of ids fed in chunks (sizes; default one by one).

        With `window`, before each chunk the store keeps the first `sinks` tokens and the last `window`
        tokens up to the chunk's end (the chunk included); positions are indices among those tokens.
        Returns (logits, store) so a caller may continue the stream.
        """
        ids = list(ids)
        chunks = chunks or [1] * len(ids)
        assert sum(chunks) == len(ids)
        store = self.new_store() if store is None else store
        out, a = [], start
        for c in chunks:
            end = a + c
            held = held_tokens(end, sinks, window)
            for layer_store in store.values():
                for j in [j for j in layer_store if j not in held]:
                    del layer_store[j]
            pos = {tok: idx for idx, tok in enumerate(sorted(held))}
            for t in range(a, end):
                out.append(self.token(store, t, ids[t - start], pos))
            a = end
        return torch.stack(out), store

    # ---- LCKV parallel prefill with explicit passes (full cache) ---------------------------------

    def segments(self) -> list[tuple[int, int]]:
        segs, i = [], 0
        while i < self.layers:
            hi = i
            if self.sources[i] > i:
                hi, j = self.sources[i], i
                while j <= hi:
                    hi = max(hi, self.sources[j])
                    j += 1
            segs.append((i, hi))
            i = hi + 1
        return segs

    def iterate_chunk(self, store: dict, ids, start: int, passes: int, *, variant: str = "acl"):
        """Parallel prefill of ids (tokens start..start+n-1) after the tokens already in `store`.

        The cyclic block runs `passes` times from the same input; the target's KV of the new tokens
        starts at zeros (real zero keys/values, as in the training code). variant "acl": the target
        attends with the previous pass's KV (its own key, if it sees its diagonal, from this pass),
        then writes its own; "naacl": it writes first and attends with this pass's KV.
        """
        n = len(ids)
        tokens = list(range(start, start + n))
        pos = {t: t for t in range(start + n)}  # full cache: true positions
        h = [self.embed[i].clone() for i in ids]

        def run_layer(i, h, attend_first):
            xs = [self.rms(h[r], self.p(i, "input_layernorm")) for r in range(n)]
            projected = [self.qkv(i, x) for x in xs]
            owns = self.sources[i] == i
            if owns and not attend_first:
                for r, t in enumerate(tokens):
                    store[i][t] = projected[r][1:]
            new_h = []
            # A target attending first that sees its own diagonal takes its own key from this pass.
            own_diagonal = owns and attend_first and not self.nodiag[i]
            for r, t in enumerate(tokens):
                if own_diagonal:
                    previous, store[i][t] = store[i][t], projected[r][1:]
                keys, values = self.visible(i, store, t, pos)
                if own_diagonal:
                    store[i][t] = previous
                new_h.append(self.finish(i, h[r], self.attend(self.rope(projected[r][0], pos[t]), keys, values)))
            if owns and attend_first:
                for r, t in enumerate(tokens):
                    store[i][t] = projected[r][1:]
            return new_h

        for lo, hi in self.segments():
            if lo == hi:
                h = run_layer(lo, h, False)
                continue
            zero = torch.zeros(self.kv_heads, self.head_dim, dtype=DT)
            for t in tokens:
                store[hi][t] = (zero, zero)
            block_input = h
            for _ in range(passes):
                h = block_input
                for i in range(lo, hi + 1):
                    h = run_layer(i, h, attend_first=(i == hi and variant == "acl"))
        return torch.stack([self.logits(x) for x in h])


def held_tokens(end: int, sinks, window) -> set[int]:
    """Stream indices held once tokens 0..end-1 are in: all, or the first S and the last W."""
    if window is None:
        return set(range(end))
    return set(range(min(sinks, end))) | set(range(max(0, end - window), end))


def _layer_plan(cfg: dict) -> tuple[list[int], list[bool]]:
    """kv source and diagonal masking per layer, read directly from the config dict."""
    layers, kind = cfg["num_hidden_layers"], cfg["model_type"]
    if kind in ("llama", "mistral"):
        return list(range(layers)), [False] * layers
    types = cfg["layer_types"].split("_") if isinstance(cfg["layer_types"], str) else cfg["layer_types"]
    if kind == "lckv-llama":
        sources = [int(x) for x in types]
        return sources, [bool(cfg.get("force_nodiag")) or s > i for i, s in enumerate(sources)]
    assert kind == "opt-llama"
    target = cfg["target_layer"] % layers
    sources = [i if int(c) == 0 else target for i, c in enumerate(types)]
    return sources, [True] * layers


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.to(DT), expected.to(DT)
    return float((actual - expected).abs().max() / expected.abs().max())
