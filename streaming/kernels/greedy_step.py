"""A pure-greedy decode step's sampling bookkeeping in one Triton launch (CUDA): each row's argmax, its
draw counter, and the repetition-penalty history's update (`RowSampling.observe` of the new token).

Unfused, that is `torch.argmax` (one program per row: 10.8 us for one row of a 32,000-token vocabulary
on the H200), a counter add and about eleven small indexing kernels for the ring, every decode step,
between the head's GEMV and the next step's first layer. Here one program per row reads its logits
(from the engine's stored logits by row, so the step need not gather them first), takes the first
index of the largest value (torch.argmax's tie rule), and updates the counter, the ring slot, the
head, the running counts (when they exist) and, for a pipelined engine, the id the slot held.

On by default wherever Triton and CUDA are (`streaming.kernels.use_fused_greedy` switches it); the torch
path stays the reference and the CPU path. tests/test_greedy_step.py shows it equals `RowSampling.sample` + `observe` (GPU, or Triton's interpreter on CPU).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path is used
    triton = None
from cache.kernel_device import runs_on

ENABLED = True  # streaming.kernels.use_fused_greedy sets it; read when a step runs (or is captured)
MAX_BLOCK = 16384  # logits read per program and iteration


def usable(device: torch.device) -> bool:
    """Whether the fused greedy step runs here: switched on, Triton present, and a CUDA device (or
    Triton's interpreter, for tests on CPU)."""
    return ENABLED and triton is not None and runs_on(device)


if triton is not None:

    @triton.jit
    def _greedy_kernel(Logits, stride_l, Rows, Out, Counters, Ring, Head, Counts, Overwritten, vocab,
                       HISTORY: tl.constexpr, BY_ROW: tl.constexpr, COUNTS: tl.constexpr, KEEP: tl.constexpr,
                       BLOCK: tl.constexpr):
        i = tl.program_id(0)
        row = tl.load(Rows + i).to(tl.int64)
        base = Logits + (row if BY_ROW else i) * stride_l
        best = tl.full([], float("-inf"), tl.float32)
        token = tl.full([], 0, tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            block_best = tl.max(x, axis=0)
            first = tl.min(tl.where(x == block_best, offs, vocab), axis=0)  # first index of the block's max
            better = block_best > best  # strictly: an earlier block keeps a tie
            token = tl.where(better, first, token)
            best = tl.where(better, block_best, best)
        tl.store(Out + i, token.to(tl.int64))
        tl.store(Counters + row, tl.load(Counters + row) + 1)
        head = tl.load(Head + row)
        slot = Ring + row * HISTORY + head
        leaving = tl.load(slot)  # the id the new one overwrites; -1 = an empty slot
        if KEEP:
            tl.store(Overwritten + i, leaving)
        if COUNTS:  # the leaving id's count down, the new one's up (nothing when they are the same id)
            changes = leaving != token
            drop = changes & (leaving >= 0)
            counts = Counts + row * vocab
            at = counts + tl.maximum(leaving, 0)
            tl.store(at, tl.load(at, mask=drop, other=0) - 1, mask=drop)
            at = counts + token
            tl.store(at, tl.load(at, mask=changes, other=0) + 1, mask=changes)
        tl.store(slot, token)
        tl.store(Head + row, (head + 1) % HISTORY)


def greedy_step(logits: torch.Tensor, rows: torch.Tensor, counters: torch.Tensor, ring: torch.Tensor,
                head: torch.Tensor, counts: torch.Tensor | None, overwritten: torch.Tensor | None, *,
                by_row: bool) -> torch.Tensor:
    """Tokens [k] (long) of rows [k] (distinct): the argmax of each row's logits (float, [R, V] read at
    `rows` when `by_row`, else [k, V] in batch order; last dimension contiguous). In place, per row:
    counters += 1; the ring [R, H] (int32) gets the token at head [R] (long), which advances; counts
    [R, V] (or None) move from the id it overwrote to the token; overwritten [>= k] (int32, or None)
    gets that id (-1: the slot was empty). NaN logits are not supported (torch.argmax takes NaN as the
    largest; here it is never the largest)."""
    k, vocab = rows.shape[0], logits.shape[-1]
    if logits.stride(-1) != 1:
        raise ValueError("greedy_step: the logits' last dimension must be contiguous")
    tokens = torch.empty(k, dtype=torch.long, device=logits.device)
    if k == 0:
        return tokens
    dummy = ring  # an unused pointer argument (COUNTS / KEEP off)
    _greedy_kernel[(k,)](
        logits, logits.stride(0), rows, tokens, counters, ring, head,
        counts if counts is not None else dummy, overwritten if overwritten is not None else dummy, vocab,
        HISTORY=ring.shape[1], BY_ROW=by_row, COUNTS=counts is not None, KEEP=overwritten is not None,
        BLOCK=min(triton.next_power_of_2(vocab), MAX_BLOCK), num_warps=8)
    return tokens
