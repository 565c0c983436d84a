"""A one-token step's plan on a sink-window cache in one Triton launch (CUDA): for every addressed row,
the slot its token goes to, the row's length after the step and the token's in-cache position.

`SinkWindowCache.plan` computes these with torch ops: about eleven small kernels per decode step
(gather of the lengths, the ring arithmetic, the eviction count), each a launch in the step's graph.
Here one program takes a block of rows. On by default wherever Triton and CUDA are
(`streaming.kernels.use_fused_plan` switches it; the torch plan stays the reference and the CPU path);
tests/test_plan_kernel.py shows it equals the torch plan.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch plan is used
    triton = None
from .kernel_device import runs_on

ENABLED = True  # streaming.kernels.use_fused_plan sets it; read when a step is planned (or captured)
BLOCK = 128  # rows per program


def usable(device: torch.device) -> bool:
    """Whether the fused plan runs here: switched on, Triton present, and a CUDA device (or Triton's
    interpreter, for tests on CPU)."""
    return ENABLED and triton is not None and runs_on(device)


if triton is not None:

    @triton.jit
    def _decode_plan_kernel(Lengths, Rows, WriteSlots, Total, QueryPositions, batch,
                            SINKS: tl.constexpr, WINDOW: tl.constexpr, HAS_ROWS: tl.constexpr,
                            BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < batch
        if HAS_ROWS:
            row = tl.load(Rows + i, mask=ok, other=0)
        else:
            row = i
        token = tl.load(Lengths + row, mask=ok, other=0)  # stream index of the new token (tokens seen so far)
        slot = tl.where(token < SINKS, token, SINKS + (token - SINKS) % WINDOW)
        total = token + 1
        evicted = tl.maximum(total - SINKS - WINDOW, 0)
        tl.store(WriteSlots + i, slot, mask=ok)
        tl.store(Total + i, total, mask=ok)
        tl.store(QueryPositions + i, token - evicted, mask=ok)


def decode_plan(lengths: torch.Tensor, rows: torch.Tensor | None, *, sinks: int,
                window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(write_slots, total, query_positions), each [B, 1] long, of one new token in rows [B] (long; None:
    every row of `lengths`, in order) of a sink-window cache whose rows have seen `lengths` [R] tokens:
    the same values as `SinkWindowCache.plan(1, rows)`."""
    batch = lengths.shape[0] if rows is None else rows.shape[0]
    out = torch.empty(3, batch, 1, dtype=torch.long, device=lengths.device)
    write_slots, total, query_positions = out[0], out[1], out[2]
    _decode_plan_kernel[(triton.cdiv(batch, BLOCK),)](
        lengths, rows if rows is not None else lengths, write_slots, total, query_positions, batch,
        SINKS=sinks, WINDOW=window, HAS_ROWS=rows is not None, BLOCK=BLOCK, num_warps=4)
    return write_slots, total, query_positions
