"""Running tokens through the model against a cache: decode, iterative LCKV prefill, sequential mode.

DESIGN.md, "Attention semantics (exact)":
- One step writes n tokens into the cache (the cache's plan says where and at which positions).
- Decode (n = 1) is one bottom-up pass. KV-owning layers store the token's K,V before they attend, so a
  layer reading its own or a lower layer's KV sees the current token unless its diagonal is masked.
  A layer reading an upper layer's KV sees that layer's slots as they stood after the previous token.
- Parallel prefill (n > 1) of an LCKV model is a fixed-point iteration: the target's KV for the new
  tokens starts at zeros, layers below a cyclic block run once, the block runs `passes` (m+b) times
  from the same input, each pass reading the previous pass's target KV; only the last pass's hidden
  states go on; the layers above run once. We follow the ACL-2024 code: the target layer itself also
  attends with the *previous* pass's KV and writes its new KV after attending. (A target that sees
  its own diagonal, which no ACL-2024 checkpoint has, takes its own key from the current pass.)
- Sequential mode runs the tokens one by one (exact); chunks of at most m+b tokens always do.
"""

from __future__ import annotations

import functools

import torch

from .attention import PreparedMask
from .kernels import chunk_attention as chunk_kernel
from .kernels import decode_attention as kernel
from .model import CausalLM


# Where a step's attention may run in the Triton kernels (tests add "cpu" under Triton's interpreter).
KERNEL_DEVICES = ("cuda",)


class _Step:
    """The state of one cache step: positions, masks, rotated keys per KV layer."""

    def __init__(self, model: CausalLM, cache, ids: torch.Tensor, rows: torch.Tensor | None = None,
                 real: torch.Tensor | None = None):
        self.model, self.cache = model, cache
        self.plan = cache.plan(ids.shape[1], rows, real)
        self.dtype = dtype = model.model.embed_tokens.weight.dtype
        self.chunk_kernel = None
        self._rotated: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Where every layer runs once (decode; a model without a cyclic block), a source's rotated
        # copy goes as soon as its last reader is done: on CPU, 200 rows x 1,024 slots make each copy
        # 105 MB, and holding every source's for the whole step set the server's memory peak.
        once = ids.shape[1] == 1 or not model.config.is_condensed
        self._last_reader = {source: i for i, source in enumerate(model.config.kv_sources)} if once else {}
        self.kernel = _decode_kernel_inputs(model, cache, self.plan, ids)
        if self.kernel is not None:  # the kernel derives slot positions and masks itself
            # The queries' cos/sin [B,1,1,D]: rows of a table built once (positions never pass S+W).
            self.q_rope = model.rope_at(self.plan.query_positions, cache.capacity, dtype)
            return
        self.chunk_kernel = _chunk_kernel_inputs(model, cache, self.plan, ids)
        # Computed, not rows of the table: a padded chunk's padding queries may lie past S+W.
        self.q_rope = model.rope(self.plan.query_positions, dtype)  # cos/sin [B,1,n,D]
        self._prepared: dict[bool, PreparedMask] = {}

    @functools.cached_property
    def _kernel_stores(self) -> bool:
        """Whether the decode kernel stores a layer's own new keys and values itself: switched on
        (`streaming.kernels.use_fused_store`), the cache's writes in kernels (`store_kernel`), a step
        of one row (where it measured faster: batch-1 decode; at 256 rows it read 5-15 % slower), and
        nothing to keep of what the write overwrites (a pipelined engine's take-back log)."""
        cache = self.cache
        return (kernel.STORES and cache.store_kernel and cache.last_step is None
                and self.plan.padding is None and self.plan.write_slots.shape[0] == 1)

    # The plain path's inputs, built on first use (a chunk-kernel step needs them only for a target
    # that sees its own diagonal in the last LCKV pass).
    @functools.cached_property
    def k_rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rope(self.plan.slot_positions, self.dtype)  # cos/sin [B,1,L,D]

    @functools.cached_property
    def mask_with_diag(self) -> torch.Tensor:
        valid = self.plan.slot_valid[:, None, :]
        return valid & (self.plan.slot_positions[:, None, :] <= self.plan.query_positions[:, :, None])  # [B, n, L]

    @functools.cached_property
    def mask_no_diag(self) -> torch.Tensor:
        valid = self.plan.slot_valid[:, None, :]
        return valid & (self.plan.slot_positions[:, None, :] < self.plan.query_positions[:, :, None])

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.cache.write(layer, self.plan, keys, values)
        self._rotated.pop(layer, None)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values [B,Hkv,L,D] of `layer`'s cache, rotated once per write."""
        if layer not in self._rotated:
            keys, values = self.cache.read(layer, self.plan)
            self._rotated[layer] = (self.model.rotate(keys, *self.k_rope), values)
        return self._rotated[layer]

    def store_own_kv(self, index: int, hidden: torch.Tensor) -> None:
        """Store the keys and values layer `index` makes of its input, and nothing else: what a
        non-final pass of the cyclic block needs of its top layer (its attention and MLP output are
        thrown away: the next pass starts again from the block's input)."""
        layer = self.model.model.layers[index]
        if layer.owns_kv:
            _, keys, values = layer.attention_inputs(hidden, *self.q_rope, queries=False)
            self.store(index, keys, values)

    def run_layer(self, index: int, hidden: torch.Tensor, *, attend_before_store: bool = False) -> torch.Tensor:
        """Layer `index` on hidden [B, n, hidden]: its new keys and values go into the cache before it
        attends (after, with `attend_before_store`: the last pass of an LCKV target)."""
        layer = self.model.model.layers[index]
        return layer(hidden, *self.q_rope, lambda q, keys, values: self._attend(index, q, keys, values,
                                                                               attend_before_store))

    def _attend(self, index: int, q: torch.Tensor, keys, values, attend_before_store: bool) -> torch.Tensor:
        new_kv = (keys, values) if keys is not None else None
        if new_kv is not None and not attend_before_store:
            if self.kernel is not None and self._kernel_stores:  # one launch: store and attend
                return _kernel_attention(self, index, q, store=new_kv)
            self.store(index, *new_kv)
        if self.kernel is not None:
            return _kernel_attention(self, index, q)
        config = self.model.config
        source = config.kv_sources[index]
        diagonal = config.sees_diagonal(index)
        if self.chunk_kernel is not None and not (attend_before_store and diagonal):
            attn = _chunk_kernel_attention(self, index, q)
            if new_kv is not None and attend_before_store:
                self.store(index, *new_kv)
            return attn
        cached_keys, cached_values = self.kv(source)
        if attend_before_store and diagonal:
            cached_keys, cached_values, mask = self._with_own_diagonal(cached_keys, cached_values, new_kv)
        else:
            mask = self.prepared_mask(diagonal, q)
        attn = self.model.attend(q, cached_keys, cached_values, mask)
        if new_kv is not None and attend_before_store:
            self.store(index, *new_kv)
        if self._last_reader.get(source) == index:
            self._rotated.pop(source, None)
        return attn

    def prepared_mask(self, diagonal: bool, q: torch.Tensor) -> PreparedMask:
        """The step's mask with or without the diagonal, prepared once for every layer that uses it."""
        if diagonal not in self._prepared:
            group = q.shape[1] // self.cache.num_kv_heads
            mask = self.mask_with_diag if diagonal else self.mask_no_diag
            self._prepared[diagonal] = PreparedMask(mask, group, q.dtype)
        return self._prepared[diagonal]

    def _with_own_diagonal(self, keys, values, new_kv):
        """Earlier tokens from the cache (previous pass), each token's own key from this pass.

        Only a target that sees its diagonal needs this (ACL-2024 checkpoints mask every diagonal):
        it keeps "token i is exact after i+1 passes" true for such models too.
        """
        own_keys = self.model.rotate(new_kv[0], *self.q_rope)  # [B, Hkv, n, D] at the new positions
        n = own_keys.shape[2]
        eye = torch.eye(n, dtype=torch.bool, device=keys.device).expand(keys.shape[0], n, n)
        return (torch.cat((keys, own_keys), dim=2), torch.cat((values, new_kv[1]), dim=2),
                torch.cat((self.mask_no_diag, eye), dim=2))


def _decode_kernel_inputs(model: CausalLM, cache, plan, ids: torch.Tensor):
    """(rows [B], tokens after the write [B], cos, sin) when this step's attention runs in the decode
    kernel (CUDA, one token per row, a sink-window cache, Triton present); else None."""
    if not (model.decode_kernel and ids.shape[1] == 1 and kernel.available(cache.head_dim)):
        return None
    return _cache_kernel_inputs(model, cache, plan)


def _chunk_kernel_inputs(model: CausalLM, cache, plan, ids: torch.Tensor):
    """The same when this step's attention runs in the chunk kernel (several tokens per row); else None."""
    if not (model.chunk_kernel and ids.shape[1] > 1 and chunk_kernel.available(cache.head_dim)):
        return None
    return _cache_kernel_inputs(model, cache, plan)


def _cache_kernel_inputs(model: CausalLM, cache, plan):
    """What both attention kernels read besides q and the cache buffers: (rows [B], tokens after the
    write [B], cos, sin), for a sink-window cache on CUDA; None for any other cache."""
    if cache.device.type not in KERNEL_DEVICES or getattr(cache, "capacity", None) is None:
        return None
    rows = plan.rows if plan.rows is not None else torch.arange(cache.batch, device=cache.device)
    total = plan.total.reshape(-1)  # [B]: the lengths advance only at the end of the step
    # cos/sin in a half-precision model's dtype: the plain path rounds them so too (`cos_sin`), and
    # the kernels read half the table bytes next to every key.
    table = cache.dtype if cache.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return (rows, total, *model.rope_table(cache.capacity, cache.device, table))


def _chunk_kernel_attention(step: _Step, index: int, q: torch.Tensor) -> torch.Tensor:
    """Layer `index`'s attention for q [B,H,n,D] read straight from its KV source's cache buffers."""
    config, cache = step.model.config, step.cache
    source = config.kv_sources[index]
    rows, total, cos, sin = step.chunk_kernel
    return chunk_kernel.chunk_attention(q, cache.keys[source], cache.values[source], rows, total,
                                        step.plan.query_positions, cos, sin, sinks=cache.sinks,
                                        window=cache.window, diagonal=config.sees_diagonal(index))


def _kernel_attention(step: _Step, index: int, q: torch.Tensor, store=None) -> torch.Tensor:
    """Layer `index`'s attention for q [B,H,1,D] read straight from its KV source's cache buffers;
    with `store` (its own new keys, values [B,Hkv,1,D]), written into them by the same launch."""
    config, cache = step.model.config, step.cache
    source = config.kv_sources[index]
    rows, total, cos, sin = step.kernel
    if store is not None:
        store = (*store, step.plan.write_slots[:, 0])
    out = kernel.decode_attention(q[:, :, 0], cache.keys[source], cache.values[source], rows, total, cos, sin,
                                  sinks=cache.sinks, window=cache.window, diagonal=config.sees_diagonal(index),
                                  store=store)
    return out[:, :, None]


def forward_step(model: CausalLM, cache, ids: torch.Tensor, *, passes: int, all_logits: bool,
                 rows: torch.Tensor | None = None, real: torch.Tensor | None = None) -> torch.Tensor:
    """Write ids [B, n] into the cache in one step; return float32 logits [B, n or 1, vocab].

    `rows` ([B] long, on the device) picks the cache rows the step runs on, in place; None = all rows.
    `real` ([1] long, on the device): only the first `real` tokens of every row are real, the rest
    padding (so that prompts of many lengths replay one captured shape). The cache advances by
    `real`, and the logits returned [B, 1, vocab] are those of the last real token. Exact because
    attention is causal (no real token sees the padding) and the padding writes nothing (the cache
    plans the step as one of `real` tokens), on any row, a wrapped window's included.
    """
    step = _Step(model, cache, ids, rows, real)
    hidden = model.model.embed_tokens(ids)  # [B, n, hidden]
    for lo, hi in model.segments:
        if lo == hi:
            hidden = step.run_layer(lo, hidden)
        elif ids.shape[1] == 1:
            for index in range(lo, hi + 1):
                hidden = step.run_layer(index, hidden)
        else:
            hidden = _iterate_block(step, lo, hi, hidden, passes)
    cache.advance(step.plan, real)
    if real is not None:
        if all_logits:
            raise ValueError("padded steps return the last real token's logits only")
        hidden = hidden.index_select(1, real - 1)
    elif not all_logits:
        hidden = hidden[:, -1:]
    return model.logits(hidden)


def _iterate_block(step: _Step, lo: int, hi: int, block_input: torch.Tensor, passes: int) -> torch.Tensor:
    """Run layers lo..hi `passes` times; every target read from below (hi among them) starts from
    zero KV for the new tokens (else the first pass would read whatever a reused row held there)."""
    kv_heads, head_dim = step.cache.num_kv_heads, step.cache.head_dim
    B, n = block_input.shape[:2]
    zeros = block_input.new_zeros(B, kv_heads, n, head_dim)
    sources = step.model.config.kv_sources
    for target in sorted({sources[j] for j in range(lo, hi + 1) if sources[j] > j}):
        step.store(target, zeros, zeros)
    hidden = block_input
    for p in range(passes):
        hidden = block_input
        for index in range(lo, hi):
            hidden = step.run_layer(index, hidden)
        if p < passes - 1:  # the next pass reads only the top layer's new keys and values
            step.store_own_kv(hi, hidden)
        else:
            hidden = step.run_layer(hi, hidden, attend_before_store=True)
    return hidden


def runs_as_one_step(config, n: int, *, sequential: bool, passes: int | None = None) -> bool:
    """Whether `forward_tokens` ingests n tokens as one step (else token by token)."""
    passes = config.prefill_passes if passes is None else passes
    return n == 1 or not (sequential or (config.is_condensed and n <= passes))


def forward_tokens(
    model: CausalLM, cache, ids: torch.Tensor, *, sequential: bool = False, passes: int | None = None,
    all_logits: bool = False, rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ingest ids [B, n] (n at most the cache's step limit); return logits [B, n or 1, vocab].

    Parallel by default; token by token when `sequential`, or when an LCKV chunk is no longer than
    the prefill passes (then the iteration would be exact anyway, and one pass per token is cheaper).
    """
    passes = model.config.prefill_passes if passes is None else passes
    n = ids.shape[1]
    if runs_as_one_step(model.config, n, sequential=sequential, passes=passes):
        return forward_step(model, cache, ids, passes=passes, all_logits=all_logits, rows=rows)
    outs = [forward_step(model, cache, ids[:, t : t + 1], passes=passes, all_logits=True, rows=rows)
            for t in range(n)]
    return torch.cat(outs, dim=1) if all_logits else outs[-1]
