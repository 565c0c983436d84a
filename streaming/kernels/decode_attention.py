"""Decode attention read straight from the sink-window cache: rows by index, RoPE applied to the keys
where they are read. A Triton kernel (CUDA) next to the plain path in streaming/forward.py.

The plain path gathers the addressed rows' keys and values (a copy), builds cos/sin for every slot,
writes a rotated copy of the keys and a mask, then calls SDPA: several passes over the whole cache
per layer and step. Here one kernel reads each key and value once: a program takes one (row, KV head,
split of the slots); it derives every slot's in-cache position and validity from the row's length
(the same ring arithmetic as `SinkWindowCache.plan`), rotates the keys in registers with a fixed
cos/sin table of S+W positions, and runs an online softmax for the KV head's `group` query heads.
Blocks of slots a row has not filled yet are skipped (a short stream reads only its tokens). When
there are few rows, a row's slots are split over several programs and a small reduction joins them
(flash-decoding), so one row still fills the GPU; with one split the program writes the output.

By default (`streaming.kernels.use_fused_store`) the same launch stores the step's own keys and values
of a layer that attends to its own cache: the program whose slots hold the write slot writes it, and
takes that slot's key and value from registers, so no program reads it while it is written. One
launch per KV layer and step less than a store kernel before the attention.

tests/test_decode_kernel.py shows it equals the plain path (GPU; skipped in CI).
"""

from __future__ import annotations

import math

import torch

from ..rope import rope_table  # noqa: F401  (the table the kernel reads; tests build it from here)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain path is used
    triton = None
from cache import pdl
from cache.pdl import gdc_launch_dependents, gdc_wait  # noqa: F401 (called inside the kernels)

BLOCK = 64  # slots per inner iteration
STORES = True  # streaming.kernels.use_fused_store sets it: a decode step's layers store their own K/V here


def available(head_dim: int) -> bool:
    """Whether the kernel can run for this head size (Triton present, halves of at least 16 lanes)."""
    return triton is not None and head_dim >= 32 and head_dim & (head_dim - 1) == 0


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (how many programs fill it; both attention kernels size
    their grids by it)."""
    if device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1), for debugging on CPU
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


if triton is not None:

    @triton.jit
    def _decode_kernel(Q, K, V, Rows, Total, Cos, Sin, Out, MidAcc, MidMax, MidSum, NewK, NewV, Slots,
                       stride_qb, stride_qh, stride_kr, stride_kh, stride_ks, stride_vr, stride_vh, stride_vs,
                       stride_nkb, stride_nkh, stride_nkd, stride_nvb, stride_nvh, stride_nvd,
                       scale,
                       SINKS: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                       HALF: tl.constexpr, SPLITS: tl.constexpr, SPLIT_SLOTS: tl.constexpr, DIAG: tl.constexpr, BLOCK_N: tl.constexpr,
                       TENSOR_CORES: tl.constexpr, ROTATE: tl.constexpr, STORE: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # the next kernel may be scheduled now; the previous one's writes are read after the wait
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        num_kv = tl.num_programs(1)
        row = tl.load(Rows + b)
        total = tl.load(Total + b)  # tokens of the row after this step's write (the current one included)
        written = total - SINKS  # window tokens written (negative while the sinks are filling)
        evicted = tl.maximum(total - SINKS - WINDOW, 0)
        q_pos = total - 1 - evicted  # in-cache position of the current token

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HALF)
        g_ok = g < GROUP
        q_base = Q + b * stride_qb + (kvh * GROUP + g)[:, None] * stride_qh
        q1 = tl.load(q_base + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)  # [G, D/2]
        q2 = tl.load(q_base + HALF + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc1 = tl.zeros([GROUP_PAD, HALF], tl.float32)
        acc2 = tl.zeros([GROUP_PAD, HALF], tl.float32)
        k_base = K + row.to(tl.int64) * stride_kr + kvh * stride_kh
        v_base = V + row.to(tl.int64) * stride_vr + kvh * stride_vh
        lo = split * SPLIT_SLOTS
        if STORE:  # this step's own key and value (unrotated), stored here instead of by a launch before
            w_slot = tl.load(Slots + b)
            nk_base = NewK + b * stride_nkb + kvh * stride_nkh
            nv_base = NewV + b * stride_nvb + kvh * stride_nvh
            nk1 = tl.load(nk_base + d * stride_nkd).to(K.dtype.element_ty)  # [D/2], rounded as the cache holds it
            nk2 = tl.load(nk_base + (HALF + d) * stride_nkd).to(K.dtype.element_ty)
            nv1 = tl.load(nv_base + d * stride_nvd).to(V.dtype.element_ty)
            nv2 = tl.load(nv_base + (HALF + d) * stride_nvd).to(V.dtype.element_ty)
            # The one program whose slots hold the write slot stores it; every split reads only its
            # own slots, and this one takes the slot's key and value from registers (below), so no
            # program reads the slot from memory while it is written.
            if (w_slot >= lo) & (w_slot < lo + SPLIT_SLOTS):
                tl.store(k_base + w_slot * stride_ks + d, nk1)
                tl.store(k_base + w_slot * stride_ks + HALF + d, nk2)
                tl.store(v_base + w_slot * stride_vs + d, nv1)
                tl.store(v_base + w_slot * stride_vs + HALF + d, nv2)
        # Slots at or past `total` are empty until the window is full: skip their blocks (no reads).
        hi = tl.minimum(tl.minimum(lo + SPLIT_SLOTS, SINKS + WINDOW), total)
        for start in range(lo, hi, BLOCK_N):
            s = start + tl.arange(0, BLOCK_N)
            in_range = s < hi
            # Window slot j holds window token k = written-1 - ((written-1-j) mod W) (k < 0: empty).
            j = s - SINKS
            r = (written - 1 - j) % WINDOW
            r = tl.where(r < 0, r + WINDOW, r)  # C-style remainder of a negative number
            k_tok = written - 1 - r
            is_sink = s < SINKS
            pos = tl.where(is_sink, s, SINKS + k_tok - evicted)
            valid = in_range & tl.where(is_sink, s < total, k_tok >= 0)
            if DIAG:
                valid = valid & (pos <= q_pos)
            else:
                valid = valid & (pos < q_pos)
            pos = tl.where(valid, pos, 0)
            k1 = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=in_range[:, None], other=0.0).to(tl.float32)
            k2 = tl.load(k_base + s[:, None] * stride_ks + HALF + d[None, :], mask=in_range[:, None], other=0.0).to(tl.float32)
            if STORE:
                here = (s == w_slot)[:, None]  # [N, 1]: the slot this step writes
                k1 = tl.where(here, nk1.to(tl.float32)[None, :], k1)
                k2 = tl.where(here, nk2.to(tl.float32)[None, :], k2)
            if ROTATE:
                cos = tl.load(Cos + pos[:, None] * HALF + d[None, :]).to(tl.float32)
                sin = tl.load(Sin + pos[:, None] * HALF + d[None, :]).to(tl.float32)
                r1 = k1 * cos - k2 * sin  # rotate-half RoPE, [N, D/2] each half
                r2 = k2 * cos + k1 * sin
            else:  # diagnostic only (benchmarks/decode_kernel.py): what reading the table and rotating costs
                r1 = k1
                r2 = k2
            if TENSOR_CORES:  # bf16/fp16 models: keys rounded to the model dtype once rotated, as the plain path does
                dt = Q.dtype.element_ty
                scores = tl.dot(q1.to(dt), tl.trans(r1.to(dt))) + tl.dot(q2.to(dt), tl.trans(r2.to(dt)))
            else:
                scores = (tl.dot(q1, tl.trans(r1), input_precision="ieee")
                          + tl.dot(q2, tl.trans(r2), input_precision="ieee"))
            scores = tl.where(valid[None, :], scores * scale, float("-inf"))  # [G, N]
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v1 = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=in_range[:, None], other=0.0)
            v2 = tl.load(v_base + s[:, None] * stride_vs + HALF + d[None, :], mask=in_range[:, None], other=0.0)
            if STORE:
                v1 = tl.where(here, nv1[None, :], v1)
                v2 = tl.where(here, nv2[None, :], v2)
            if TENSOR_CORES:
                pv = p.to(v1.dtype)
                acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1)
                acc2 = acc2 * alpha[:, None] + tl.dot(pv, v2)
            else:
                acc1 = acc1 * alpha[:, None] + tl.dot(p, v1.to(tl.float32), input_precision="ieee")
                acc2 = acc2 * alpha[:, None] + tl.dot(p, v2.to(tl.float32), input_precision="ieee")
            m_i = m_new
        if SPLITS == 1:  # the whole row in one program: normalize and write the output (0 if nothing seen)
            inv = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)[:, None]
            o_base = Out + b * stride_qb + (kvh * GROUP + g)[:, None] * stride_qh
            tl.store(o_base + d[None, :], (acc1 * inv).to(Out.dtype.element_ty), mask=g_ok[:, None])
            tl.store(o_base + HALF + d[None, :], (acc2 * inv).to(Out.dtype.element_ty), mask=g_ok[:, None])
            return
        out = ((b * num_kv + kvh) * SPLITS + split) * GROUP_PAD + g  # [G] index of (b, kvh, split, g)
        tl.store(MidMax + out, m_i)
        tl.store(MidSum + out, l_i)
        tl.store(MidAcc + out[:, None] * (2 * HALF) + d[None, :], acc1)
        tl.store(MidAcc + out[:, None] * (2 * HALF) + HALF + d[None, :], acc2)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                     total: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, sinks: int, window: int,
                     diagonal: bool, block: int = BLOCK, num_warps: int = 4, num_stages: int | None = None,
                     splits: int | None = None, rotate: bool = True,
                     store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One new token per row: q [B, H, D] rotated at its in-cache position; keys/values: a sink-window
    cache's whole buffers [R, Hkv, S+W, D] (keys unrotated); rows [B] long: the cache row of each query;
    total [B] long: tokens of the row after this step's write. cos, sin [S+W, D/2]: `rope_table`, in
    float32 or in the model's dtype (half the table traffic; the plain path rounds them so too).
    `diagonal`: whether the query sees its own slot. Returns [B, H, D] in q's dtype; a query that sees
    no key gets exactly zero.
    `store` (new keys, new values [B, Hkv, 1, D] unrotated, any strides; slots [B] long): write this
    step's own keys and values into the buffers at (rows[b], slots[b]) in the same launch, which reads
    them from registers for that slot, instead of a store launch before it (`cache.store_kernel`). The
    slot must be the one `total` implies (the cache's plan: `write_slots`); a repeated row writes
    the same slot more than once (the engine's scratch row, which nobody reads).
    `block`, `num_warps`, `num_stages`, `splits` (None: enough to fill the GPU) are tuning knobs
    (benchmarks/decode_kernel.py sweeps them); `rotate=False` skips RoPE and gives wrong scores: a
    diagnostic of what the rotation costs, never used by the model. Several splits are combined by `_join_kernel`
    (`join_splits_reference` is its torch reference)."""
    B, H, D = q.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = H // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    # Enough programs to fill the GPU: split the slots when the batch is small (flash-decoding).
    if splits is None:
        splits = max(1, 2 * multiprocessors(q.device) // (B * kv_heads))
    splits = min(splits, triton.cdiv(slots, block))
    per_split = triton.cdiv(triton.cdiv(slots, splits), block) * block
    splits = triton.cdiv(slots, per_split)
    if num_stages is None:  # float32 blocks of 128-wide heads need 237 KB of shared memory at 3 stages
        num_stages = 3 if q.element_size() <= 2 or D <= 64 else 2
    q = q.contiguous()
    out = torch.empty_like(q)  # written by the kernel when there is one split
    # Per-split partial results [B, Hkv, splits, G(, D)]; unused (1 element) with one split.
    shape = (B, kv_heads, splits, group_pad) if splits > 1 else (1,)
    mid_max = torch.empty(shape, dtype=torch.float32, device=q.device)
    mid_sum = torch.empty_like(mid_max)
    mid_acc = torch.empty(shape + (D,) if splits > 1 else (1,), dtype=torch.float32, device=q.device)
    if store is not None:
        new_keys, new_values, slots = store
        if new_keys.shape != (B, kv_heads, 1, D) or new_values.shape != (B, kv_heads, 1, D) or slots.shape != (B,):
            raise ValueError(f"decode_attention: store takes keys and values [{B}, {kv_heads}, 1, {D}] and slots "
                             f"[{B}], got {tuple(new_keys.shape)}, {tuple(new_values.shape)}, {tuple(slots.shape)}")
        if keys.stride(3) != 1 or values.stride(3) != 1:
            raise ValueError("decode_attention: store needs buffers contiguous in the head dimension")
        new_strides = (new_keys.stride(0), new_keys.stride(1), new_keys.stride(3),
                       new_values.stride(0), new_values.stride(1), new_values.stride(3))
    else:
        new_keys = new_values = slots = rows  # (unread)
        new_strides = (0,) * 6
    _decode_kernel[(B, kv_heads, splits)](
        q, keys, values, rows, total, cos, sin, out, mid_acc, mid_max, mid_sum, new_keys, new_values, slots,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), *new_strides,
        1.0 / math.sqrt(D),
        SINKS=sinks, WINDOW=window, GROUP=group, GROUP_PAD=group_pad, HALF=D // 2, SPLITS=splits, SPLIT_SLOTS=per_split,
        DIAG=diagonal, BLOCK_N=block, TENSOR_CORES=q.dtype in (torch.bfloat16, torch.float16),
        ROTATE=rotate, STORE=store is not None, num_warps=num_warps, num_stages=num_stages,
        **pdl.launch_args(q.device))
    if splits == 1:
        return out
    return _join(mid_acc, mid_max, mid_sum, out, group)


def join_splits(mid_acc, mid_max, mid_sum, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The Triton join of per-split partial softmaxes (what `decode_attention` runs): mid_* as
    `join_splits_reference` takes them -> [B, H, D] in `dtype`."""
    B, kv_heads, _, _, D = mid_acc.shape
    return _join(mid_acc, mid_max, mid_sum, torch.empty(B, kv_heads * group, D, dtype=dtype, device=mid_acc.device),
                 group)


def _join(mid_acc, mid_max, mid_sum, out: torch.Tensor, group: int) -> torch.Tensor:
    B, kv_heads, splits, group_pad, D = mid_acc.shape
    _join_kernel[(B, kv_heads, group)](mid_acc, mid_max, mid_sum, out, out.stride(0), out.stride(1),
                                       SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
                                       GROUP_PAD=group_pad, D=D, num_warps=1, **pdl.launch_args(out.device))
    return out


def join_splits_reference(mid_acc, mid_max, mid_sum, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Join per-split partial softmaxes with torch ops (the reference for `_join_kernel`): mid_max,
    mid_sum [B, Hkv, S, G] (running max and sum of each split; -inf / 0 where a split saw nothing),
    mid_acc [B, Hkv, S, G, D] (unnormalised outputs) -> [B, H, D] in `dtype`; 0 where nothing was seen."""
    B, kv_heads, _, _, D = mid_acc.shape
    best = mid_max.amax(dim=2, keepdim=True)  # [B, Hkv, 1, G]
    best = torch.where(best == float("-inf"), 0.0, best)
    weight = torch.exp(mid_max - best)  # [B, Hkv, S, G]; 0 for a split that saw nothing
    norm = (weight * mid_sum).sum(dim=2)  # [B, Hkv, G]
    acc = (weight[..., None] * mid_acc).sum(dim=2)  # [B, Hkv, G, D]
    out = torch.where(norm[..., None] > 0, acc / norm.clamp(min=1e-30)[..., None], 0.0)
    return out[:, :, :group].reshape(B, kv_heads * group, D).to(dtype)


if triton is not None:

    @triton.jit
    def _join_kernel(MidAcc, MidMax, MidSum, Out, stride_ob, stride_oh,
                     SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                     PDL: tl.constexpr):
        # One program per query head (row, KV head, head of its group) (the torch join was eight small
        # kernels per layer; one program per KV head looping over the splits took 5.3 us at one row).
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.program_id(2)
        # All splits in one round of loads, weighted by exp(max_s - max) and summed.
        s = tl.arange(0, SPLITS_PAD)
        ok = s < SPLITS
        d = tl.arange(0, D)
        at = ((b * tl.num_programs(1) + kvh) * SPLITS + s) * GROUP_PAD + g  # [S] this head's entry of each split
        best_of_split = tl.load(MidMax + at, mask=ok, other=float("-inf"))
        best = tl.max(best_of_split, axis=0)
        best = tl.where(best == float("-inf"), 0.0, best)
        weight = tl.exp(best_of_split - best)  # 0 for a split that saw nothing (and for padding)
        norm = tl.sum(weight * tl.load(MidSum + at, mask=ok, other=0.0), axis=0)
        acc = tl.load(MidAcc + at[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(weight[:, None] * acc, axis=0)  # [D]
        out = tl.where(norm > 0, out / tl.maximum(norm, 1e-30), 0.0)
        head = kvh * tl.num_programs(2) + g
        tl.store(Out + b * stride_ob + head * stride_oh + d, out.to(Out.dtype.element_ty))
