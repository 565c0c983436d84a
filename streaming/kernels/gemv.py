"""One token's projections, y = x W^T with x one row, in one launch each, with the elementwise work
around them folded in (Triton, CUDA).

At batch 1 a decode step is a chain of matrix-vector products: every weight byte is read once for
one multiply-add, so the step is as fast as its weights stream, and every small kernel between the
products costs a launch (2-3 us in a CUDA graph) for almost no work. So each product here also does
what surrounds it in a Llama layer:
- `norm`: the RMSNorm of x first (qkv and gate/up read the normalised hidden state);
- `residual`: adds the product to the residual stream (o and down);
- `swiglu`: W is gate and up stacked; writes silu(gate) * up (gate/up);
- `rotate`: RoPE on the query columns at the token's position (the qkv product).
The arithmetic rounds where the reference does (`streaming/layer_math.py`: the norm's output, each
product, the residual sum, silu, the rotation's partial sums, in the model's dtype), so the two paths
differ only in the order float32 sums are taken.

Each program owns two sets of `half_block` rows of W (for swiglu/rotate, row pairs that combine:
gate and up, the two halves of a head) and walks them along K in `block_k` steps, multiply-adding
in float32 lanes and reducing once at the end; small blocks give enough programs to keep every SM's
loads in flight.
Measured on the H200 (benchmarks/gemv.py): 1.95-4.1 TB/s on the TinyLlama projections against
cuBLAS's 1.4-3.7.

`F.linear` and the eager functions stay the reference and the path everywhere else (CPU, several
rows); tests/test_gemv.py shows they agree (GPU, or Triton's interpreter; skipped in CI).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: F.linear is used
    triton = None

from cache import pdl  # programmatic dependent launch, on wherever supported (cache/pdl.py)
from cache.kernel_device import runs_on
from cache.pdl import gdc_launch_dependents, gdc_wait  # noqa: F401 (called inside the kernel)


def default_config(K: int, norm: bool = False) -> tuple[int, int, int, int]:
    """(rows per half-block, block_k, num_warps, num_stages), the best of benchmarks/gemv.py's sweeps
    on the H200 for the TinyLlama projections. Plain: each program reads 2 x 2 rows of W, in steps of
    1,024 columns where they divide K (up to 4,096), else 512 with 8 warps (K 2,048: 4.2-12.6 us;
    down, K 5,632: 9.2 us, where 1,024-column steps leave a masked half step and took 13). With the
    norm, every program reads x (and the norm's weight) whole, so it takes 2 x 4 rows in one step of
    K up to 2,048: that halves the programs re-reading x (gate/up 14.3 -> 12.4 us, qkv 4.7 -> 4.2,
    the head 35.1 -> 32.4, with PDL)."""
    if norm and K <= 2048 and K & (K - 1) == 0:
        return (4, K, 4, 3)
    if K % 1024 == 0 and K <= 4096:
        return (2, 1024, 4, 3)
    return (2, 512, 8, 2)


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on x: Triton present, a CUDA tensor (or Triton's interpreter),
    one row, a dtype the kernels take."""
    return (triton is not None and runs_on(x.device)
            and x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16, torch.float32))


def gemv(x: torch.Tensor, weight: torch.Tensor, *, norm: tuple[torch.Tensor, float] | None = None,
         residual: torch.Tensor | None = None, swiglu: bool = False,
         rotate: tuple[torch.Tensor, torch.Tensor, int] | None = None, out_dtype: torch.dtype | None = None,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [..., K] holding one row; weight [N, K] (rows contiguous) -> [..., N] (or [..., N/2] with
    `swiglu`) in `out_dtype` (x's dtype by default; the product is rounded to x's dtype first, as
    F.linear's output is).

    norm (weight [K], eps): multiply by RMSNorm(x) instead of x. residual [..., N]: return residual +
    the product. swiglu: weight is [gate; up], return silu(x gate^T) * (x up^T). rotate (cos, sin
    [head_dim] at the token's position, q_size): RoPE (rotate-half) on the first q_size columns, by
    heads of head_dim. `config` is a tuning knob (benchmarks/gemv.py sweeps it). With programmatic
    dependent launch (`cache/pdl.py`), the first block of `weight` is read before waiting for the
    kernel before this one: weight must not be that kernel's output (model weights never are)."""
    N, K = weight.shape
    half_block, block_k, num_warps, num_stages = config or default_config(K, norm=norm is not None)
    if weight.stride(1) != 1 or x.shape[-1] != K:
        raise ValueError(f"gemv: weight {tuple(weight.shape)} must be [N, {x.shape[-1]}] with contiguous rows")
    x_row = x.reshape(K)
    if x_row.stride(0) != 1:
        x_row = x_row.contiguous()
    out_n = N // 2 if swiglu else N
    out = torch.empty(x.shape[:-1] + (out_n,), dtype=out_dtype or x.dtype, device=x.device)
    norm_weight, eps = norm if norm is not None else (x_row, 0.0)
    res = residual.reshape(N) if residual is not None else x_row
    cos, sin, rotated = rotate if rotate is not None else (x_row, x_row, 0)
    head_half = cos.numel() // 2 if rotate is not None else 1
    if rotate is not None and (N % (2 * head_half) or rotated % (2 * head_half)):
        raise ValueError(f"gemv: {N} outputs ({rotated} rotated) are not whole heads of {2 * head_half}")
    # Pairs of rows a program combines: (r, r + half_block) plain; (gate r, up r) swiglu; the two
    # halves of a head rotate.
    pairs = N // 2
    if not swiglu and rotate is None and N % (2 * half_block):
        pairs = triton.cdiv(N, 2 * half_block) * half_block  # the last block's rows past N are masked
    grid = (triton.cdiv(pairs, half_block),)
    _gemv_kernel[grid](x_row, weight, out, norm_weight, res, cos.reshape(-1), sin.reshape(-1),
                       N, pairs, weight.stride(0), rotated, eps,
                       K=K, HALF_BLOCK=half_block, BLOCK_K=block_k, HEAD_HALF=head_half,
                       NORM=norm is not None, RESIDUAL=residual is not None, SWIGLU=swiglu,
                       ROTATE=rotate is not None, num_warps=num_warps, num_stages=num_stages,
                       **pdl.launch_args(x.device))
    return out


if triton is not None:

    @triton.jit
    def _round(x, dtype: tl.constexpr):
        """x rounded to `dtype` (the model's) and back to float32: where the reference path rounds."""
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _x_block(X, NormW, k, inv_rms, K: tl.constexpr, NORM: tl.constexpr, dt: tl.constexpr):
        """x[k] in float32; with NORM, weight * (x * rsqrt(mean(x^2) + eps)).to(dtype), rounded as the
        reference rounds it."""
        k_ok = k < K
        x = tl.load(X + k, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            scale = tl.load(NormW + k, mask=k_ok, other=0.0).to(tl.float32)
            x = _round(scale * _round(x * inv_rms, dt), dt)
        return x

    @triton.jit
    def _gemv_kernel(X, W, Out, NormW, Res, Cos, Sin, N, pairs, stride_wn, rotated, eps,
                     K: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_HALF: tl.constexpr,
                     NORM: tl.constexpr, RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr, ROTATE: tl.constexpr,
                     PDL: tl.constexpr):
        dt = X.dtype.element_ty
        p = tl.program_id(0) * HALF_BLOCK + tl.arange(0, HALF_BLOCK)  # [P] pair indices
        p_ok = p < pairs
        if SWIGLU:  # gate row p, up row p + N/2
            first = p
            second = p + N // 2
        elif ROTATE:  # the two halves of head p // HEAD_HALF, lane p % HEAD_HALF
            first = (p // HEAD_HALF) * (2 * HEAD_HALF) + p % HEAD_HALF
            second = first + HEAD_HALF
        else:  # rows r and r + HALF_BLOCK of this program's block of 2 * HALF_BLOCK
            first = tl.program_id(0) * (2 * HALF_BLOCK) + tl.arange(0, HALF_BLOCK)
            second = first + HALF_BLOCK
        rows = tl.join(first, second)  # [P, 2]
        rows_ok = (rows < N) & p_ok[:, None]
        w_rows = W + rows.to(tl.int64)[:, :, None] * stride_wn  # [P, 2, 1]
        k_lanes = tl.arange(0, BLOCK_K)
        # The first block of weights depends on no kernel: with PDL it is fetched while the previous
        # kernel finishes (outputs are read after the wait); with NORM, while the norm's sum runs.
        PREFETCH: tl.constexpr = PDL or NORM
        if PDL:  # the next kernel may be scheduled now
            gdc_launch_dependents()
        if PREFETCH:
            w_first = tl.load(w_rows + k_lanes[None, None, :], mask=rows_ok[:, :, None] & (k_lanes < K)[None, None, :],
                              other=0.0, eviction_policy="evict_first")
        if PDL:
            gdc_wait()

        inv_rms = 1.0
        if NORM:  # RMSNorm in float32 over the whole row first (x is small: read from L2)
            squares = tl.zeros([BLOCK_K], tl.float32)
            for start in range(0, K, BLOCK_K):
                k = start + k_lanes
                x = tl.load(X + k, mask=k < K, other=0.0).to(tl.float32)
                squares += x * x
            inv_rms = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)

        acc = tl.zeros([HALF_BLOCK, 2, BLOCK_K], tl.float32)
        if PREFETCH:  # the first block's weights are in registers already
            acc += w_first.to(tl.float32) * _x_block(X, NormW, k_lanes, inv_rms, K, NORM, dt)[None, None, :]
        for start in range(BLOCK_K if PREFETCH else 0, K, BLOCK_K):
            k = start + k_lanes
            w = tl.load(w_rows + k[None, None, :], mask=rows_ok[:, :, None] & (k < K)[None, None, :], other=0.0,
                        eviction_policy="evict_first")  # each weight is read once per step
            acc += w.to(tl.float32) * _x_block(X, NormW, k, inv_rms, K, NORM, dt)[None, None, :]
        y = _round(tl.sum(acc, axis=2), dt)  # [P, 2]: the products, rounded as F.linear's output
        a, b = tl.split(y)  # [P] each: rows `first`, `second`

        if SWIGLU:
            silu = _round(a / (1.0 + tl.exp(-a)), dt)
            tl.store(Out + first, (silu * b).to(Out.dtype.element_ty), mask=p_ok)
        else:
            if ROTATE:  # rotate-half RoPE on query columns: x*cos, then -x2*sin / +x1*sin added
                lane = p % HEAD_HALF
                is_q = (first < rotated)
                cos1 = tl.load(Cos + lane, mask=p_ok, other=0.0).to(tl.float32)
                cos2 = tl.load(Cos + lane + HEAD_HALF, mask=p_ok, other=0.0).to(tl.float32)
                sin1 = tl.load(Sin + lane, mask=p_ok, other=0.0).to(tl.float32)
                sin2 = tl.load(Sin + lane + HEAD_HALF, mask=p_ok, other=0.0).to(tl.float32)
                r1 = _round(_round(a * cos1, dt) - b * sin1, dt)
                r2 = _round(_round(b * cos2, dt) + a * sin2, dt)
                a = tl.where(is_q, r1, a)
                b = tl.where(is_q, r2, b)
            first_ok = p_ok & (first < N)
            second_ok = p_ok & (second < N)
            if RESIDUAL:
                a = a + tl.load(Res + first, mask=first_ok, other=0.0).to(tl.float32)
                b = b + tl.load(Res + second, mask=second_ok, other=0.0).to(tl.float32)
            tl.store(Out + first, a.to(Out.dtype.element_ty), mask=first_ok)
            tl.store(Out + second, b.to(Out.dtype.element_ty), mask=second_ok)
