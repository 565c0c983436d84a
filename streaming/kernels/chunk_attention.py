"""Attention of a chunk of new tokens (prefill, n > 1 per row) read straight from the sink-window
cache: rows by index, RoPE applied to the keys where they are read. A Triton kernel (CUDA) next to the
plain path in streaming/forward.py, as streaming/kernels/decode_attention.py is for one token.

The plain path makes, per KV source and write, a rotated copy of the addressed rows' whole cache and a
[B, group * n, S+W] additive mask, then calls SDPA's memory-efficient kernel with that mask (an LCKV
prefill does so m+b times per chunk: on the H200 its attention was over half of a chunk's time). Here
a program takes one (row, KV head, block of query rows); the query rows are the `group` query heads
of every token of the block (GQA: a key block is loaded once for all of them). It walks the row's
keys in position order, not slot order: position p lives in slot p (a sink) or in the window slot the
ring arithmetic of `SinkWindowCache.plan` gives, so the positions a row holds are 0..held-1 whatever
its ring's state. The keys every query of the program sees then come first, in loops with no mask,
and the causal edge after, up to the last query's position: loop bounds, not per-block branches, so
Triton pipelines the loads. Each key block is rotated in registers from the fixed cos/sin table of
S+W positions (one dot over the whole head: the rotate-half partner of each lane is a second load),
then folded into an online softmax (flash attention's forward).

tests/test_chunk_attention.py shows it equals the plain path (GPU, or Triton's interpreter on CPU).
"""

from __future__ import annotations

import math

import torch

from .decode_attention import multiprocessors

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain path is used
    triton = None

SHARED_MEMORY = 232_448  # bytes of shared memory a program may use on Hopper (sm_90)


def default_config(dtype: torch.dtype, programs_at_128: int, multiprocessors: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) as measured on the H200 (benchmarks/chunk_attention.py
    --sweep, TinyLlama's attention shape): 128 query rows x 64 keys, 4 warps, 3 stages; 64 query rows
    when 128 would leave multiprocessors idle (a short chunk: 256 tokens ran in 37 us instead of 55).
    float32 (tests, CPU-sized models) takes 64 x 32 blocks in 2 stages: its blocks are twice the bytes,
    and 128 x 64 of head size 128 needs more shared memory than a Hopper program has."""
    if dtype == torch.float32:
        return 64, 32, 4, 2
    return (128 if programs_at_128 >= multiprocessors else 64), 64, 4, 3


def available(head_dim: int) -> bool:
    """Whether the kernel can run for this head size (Triton present, halves of at least 16 lanes)."""
    return triton is not None and head_dim >= 32 and head_dim & (head_dim - 1) == 0


if triton is not None:

    @triton.jit
    def _chunk_kernel(Q, K, V, Rows, Total, QPos, Cos, Sin, Out, n, scale,
                      stride_qb, stride_qh, stride_qn, stride_kr, stride_kh, stride_ks,
                      stride_vr, stride_vh, stride_vs, stride_pb, stride_ob, stride_oh, stride_on,
                      SINKS: tl.constexpr, WINDOW: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                      DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      TENSOR_CORES: tl.constexpr):
        block = tl.program_id(0)
        b = tl.program_id(1)
        kvh = tl.program_id(2)
        row = tl.load(Rows + b)
        total = tl.load(Total + b)  # tokens of the row after this step's write (the chunk's included)
        held = tl.minimum(total, SINKS + WINDOW).to(tl.int32)  # the row holds positions 0..held-1
        evicted = tl.maximum(total - SINKS - WINDOW, 0)
        # Window position p (>= SINKS) holds window token p - SINKS + evicted, in slot SINKS + that mod W.
        shift = (evicted % WINDOW).to(tl.int32)

        # Query row r of the program: token r // GROUP, query head kvh * GROUP + r % GROUP.
        r = block * BLOCK_M + tl.arange(0, BLOCK_M)
        token = r // GROUP
        head = kvh * GROUP + r % GROUP
        r_ok = token < n
        q_pos = tl.load(QPos + b * stride_pb + token, mask=r_ok, other=0).to(tl.int32)  # in-cache positions
        reach = tl.minimum(q_pos + 1 if DIAG else q_pos, held)  # [M]: a query sees positions < reach
        reach_all = tl.min(tl.where(r_ok, reach, SINKS + WINDOW), axis=0)  # seen by every query
        reach_any = tl.max(tl.where(r_ok, reach, 0), axis=0)  # seen by some query
        d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qn + d[None, :],
                    mask=r_ok[:, None], other=0.0)  # [M, D], rotated already
        if not TENSOR_CORES:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        k_base = K + row.to(tl.int64) * stride_kr + kvh * stride_kh
        v_base = V + row.to(tl.int64) * stride_vr + kvh * stride_vh
        # Keys in position order: blocks every query sees whole (no mask), then the causal edge.
        full_end = (reach_all // BLOCK_N) * BLOCK_N
        for start in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start, reach, held, shift, k_base, v_base, Cos, Sin,
                                          scale, stride_ks, stride_vs, SINKS, WINDOW, D, BLOCK_N, False,
                                          TENSOR_CORES)
        for start in range(full_end, reach_any, BLOCK_N):
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start, reach, held, shift, k_base, v_base, Cos, Sin,
                                          scale, stride_ks, stride_vs, SINKS, WINDOW, D, BLOCK_N, True,
                                          TENSOR_CORES)
        inv = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)  # 0 for a query that saw nothing
        o_at = Out + b * stride_ob + head[:, None] * stride_oh + token[:, None] * stride_on + d[None, :]
        tl.store(o_at, (acc * inv[:, None]).to(Out.dtype.element_ty), mask=r_ok[:, None])

    @triton.jit
    def _attend_block(q, acc, m_i, l_i, start, reach, held, shift, k_base, v_base, Cos, Sin, scale,
                      stride_ks, stride_vs, SINKS: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TENSOR_CORES: tl.constexpr):
        """One block of BLOCK_N positions from `start`: rotate its keys, fold it into the online softmax."""
        HALF: tl.constexpr = D // 2
        pos = start + tl.arange(0, BLOCK_N)  # [N] in-cache positions
        in_window = pos - SINKS + shift  # in [0, 2W) for window positions
        slot = tl.where(pos < SINKS, pos, SINKS + tl.where(in_window >= WINDOW, in_window - WINDOW, in_window))
        d = tl.arange(0, D)
        partner = tl.where(d < HALF, d + HALF, d - HALF)  # rotate-half: x*cos + (-x2, x1)*sin
        sign = tl.where(d < HALF, -1.0, 1.0)
        k_at = k_base + slot[:, None] * stride_ks
        table_at = pos[:, None] * HALF + (d % HALF)[None, :]
        v_at = v_base + slot[:, None] * stride_vs + d[None, :]
        if MASKED:
            held_here = (pos < held)[:, None]
            k = tl.load(k_at + d[None, :], mask=held_here, other=0.0).to(tl.float32)  # [N, D]
            k_partner = tl.load(k_at + partner[None, :], mask=held_here, other=0.0).to(tl.float32)
            cos = tl.load(Cos + table_at, mask=held_here, other=0.0).to(tl.float32)
            sin = tl.load(Sin + table_at, mask=held_here, other=0.0).to(tl.float32)
            v = tl.load(v_at, mask=held_here, other=0.0)
        else:
            k = tl.load(k_at + d[None, :]).to(tl.float32)
            k_partner = tl.load(k_at + partner[None, :]).to(tl.float32)
            cos = tl.load(Cos + table_at).to(tl.float32)
            sin = tl.load(Sin + table_at).to(tl.float32)
            v = tl.load(v_at)
        rotated = k * cos + sign[None, :] * k_partner * sin
        if TENSOR_CORES:  # bf16/fp16: keys rounded to the model dtype once rotated, as the plain path does
            scores = tl.dot(q, tl.trans(rotated.to(q.dtype)))
        else:
            scores = tl.dot(q, tl.trans(rotated), input_precision="ieee")
        scores = scores * scale  # [M, N], log2 units
        if MASKED:
            scores = tl.where(pos[None, :] < reach[:, None], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if TENSOR_CORES:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        return acc, m_new, l_i


def chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                    total: torch.Tensor, query_positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    *, sinks: int, window: int, diagonal: bool, block_m: int | None = None, block_n: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """n new tokens per row: q [B, H, n, D] rotated at their in-cache positions (any strides, D
    contiguous); keys/values: a sink-window cache's whole buffers [R, Hkv, S+W, D] (keys unrotated),
    the chunk already written; rows [B] long: the cache row of each batch row; total [B] long: tokens of
    the row after this step's write; query_positions [B, n] long: the queries' in-cache positions (the
    step plan's). cos, sin [S+W, D/2]: `rope_table`, in float32 or the model's dtype. `diagonal`:
    whether a query sees its own slot. Returns [B, H, n, D] in q's dtype; a query that sees no key gets
    exactly zero. `block_m`, `block_n`, `num_warps`, `num_stages` are tuning knobs (None: `default_config`)."""
    B, H, n, D = q.shape
    kv_heads = keys.shape[1]
    group = H // kv_heads
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(B, H, n, D, dtype=q.dtype, device=q.device)
    query_positions = query_positions.expand(B, n)
    if query_positions.stride(1) != 1:
        query_positions = query_positions.contiguous()
    defaults = default_config(q.dtype, triton.cdiv(n * group, 128) * B * kv_heads, multiprocessors(q.device))
    block_m, block_n, num_warps, num_stages = (given if given is not None else default for given, default in
                                               zip((block_m, block_n, num_warps, num_stages), defaults))
    grid = (triton.cdiv(n * group, block_m), B, kv_heads)
    _chunk_kernel[grid](
        q, keys, values, rows, total, query_positions, cos, sin, out, n, math.log2(math.e) / math.sqrt(D),
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), query_positions.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        SINKS=sinks, WINDOW=window, GROUP=group, D=D, DIAG=diagonal, BLOCK_M=block_m, BLOCK_N=block_n,
        TENSOR_CORES=q.dtype in (torch.bfloat16, torch.float16), num_warps=num_warps, num_stages=num_stages)
    return out
