"""Writing a step's new keys and values into addressed cache rows in one kernel launch (Triton, CUDA).

`KVBuffers.write` with rows is two `index_put_` calls, each several kernels (index expansion, fills,
the scatter): about 7 us of GPU time per KV layer and step, as much as the attention of a short
stream. Here one program copies one (row, KV head, token) vector of keys and of values. The
`index_put_` path stays the reference and the CPU path; tests/test_store_kernel.py shows they agree.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: index_put_ is used
    triton = None
from . import pdl
from .kernel_device import runs_on
from .pdl import gdc_launch_dependents, gdc_wait  # noqa: F401 (called inside the kernel)


def available(buffer: torch.Tensor) -> bool:
    """Whether the kernel can write `buffer` (Triton present, a CUDA tensor or Triton's interpreter)."""
    return triton is not None and runs_on(buffer.device)


def store_rows(key_buffer: torch.Tensor, value_buffer: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor,
               log: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """key_buffer/value_buffer [R, Hkv, L, D]: set [rows[b], h, slots[b, t]] to keys/values [b, h, t]
    ([B, Hkv, n, D] in the buffers' dtype, any strides) for every b, h, t. Rows [B] and slots
    [B, n] are long tensors on the buffers' device; a step's (row, slot) pairs are distinct (a repeated
    scratch row excepted, whose contents nobody reads).

    `log` (key log, value log: contiguous [>= B, Hkv, 1, D]), for one-token writes (n == 1): what
    each (row, slot) held is copied to log[b, h, 0] first, in the same launch (`LastStepLog`)."""
    B, kv_heads, n, D = keys.shape
    if log is not None and n != 1:
        raise ValueError(f"store_rows: only one-token writes are logged, got {n} tokens")
    slots = slots.contiguous()
    log_keys, log_values = log if log is not None else (key_buffer, value_buffer)
    _store_kernel[(B, kv_heads, n)](
        key_buffer, value_buffer, rows, slots, keys, values, log_keys, log_values,
        key_buffer.stride(0), key_buffer.stride(1), key_buffer.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), keys.stride(3),
        values.stride(0), values.stride(1), values.stride(2), values.stride(3),
        n, D=D, BLOCK_D=triton.next_power_of_2(D), LOG=log is not None, num_warps=1,
        **pdl.launch_args(key_buffer.device))


if triton is not None:

    @triton.jit
    def _store_kernel(KBuf, VBuf, Rows, Slots, K, V, LogK, LogV, stride_r, stride_h, stride_s,
                      skb, skh, skt, skd, svb, svh, svt, svd, n,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, LOG: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0)
        h = tl.program_id(1)
        t = tl.program_id(2)
        row = tl.load(Rows + b).to(tl.int64)
        slot = tl.load(Slots + b * n + t).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        dest = row * stride_r + h * stride_h + slot * stride_s + d  # the buffers are contiguous in D
        k = tl.load(K + b * skb + h * skh + t * skt + d * skd, mask=ok)
        v = tl.load(V + b * svb + h * svh + t * svt + d * svd, mask=ok)
        if LOG:  # what the slot held, kept for a take-back (one token per row: log [B, Hkv, 1, D])
            logged = (b * tl.num_programs(1) + h) * D + d
            tl.store(LogK + logged, tl.load(KBuf + dest, mask=ok), mask=ok)
            tl.store(LogV + logged, tl.load(VBuf + dest, mask=ok), mask=ok)
        tl.store(KBuf + dest, k.to(KBuf.dtype.element_ty), mask=ok)
        tl.store(VBuf + dest, v.to(VBuf.dtype.element_ty), mask=ok)
