"""An unbounded cache: every token keeps its slot and its true position. For finite contexts and tests."""

from __future__ import annotations

import torch

from .buffers import KVBuffers, StepPlan
from .memory_check import check_fits


class FullCache(KVBuffers):
    """Keeps every token. Grows by doubling when full (the only cache that ever reallocates)."""

    def __init__(self, kv_layers, batch, num_kv_heads, head_dim, *, dtype, device, initial_slots=256):
        super().__init__(kv_layers, batch, initial_slots, num_kv_heads, head_dim, dtype=dtype, device=device)

    def plan(self, n: int, rows: torch.Tensor | None = None, real: torch.Tensor | None = None) -> StepPlan:
        """Plan a step of n tokens for every row, or for `rows` ([B] long) only (reads the lengths
        on the host to grow when needed: this cache is for finite contexts and tests, not graphs).
        With `real` (padded steps) the padding lies past the new length: written, never seen."""
        if n < 1:
            raise ValueError(f"a step must write at least one token, got {n}")
        lengths = self.lengths if rows is None else self.lengths.index_select(0, rows)
        longest = int(lengths.max()) + n
        if longest > self.slots:
            self._grow(longest)
        start = lengths[:, None]  # [B, 1]
        token = start + torch.arange(n, device=self.device)  # [B, n]
        slots = torch.arange(longest, device=self.device)[None]  # [1, L]
        total = start + (n if real is None else real)
        return StepPlan(
            n=n,
            write_slots=token,
            query_positions=token,
            slot_layout=lambda: (slots.expand(start.shape[0], -1), slots < total),
            total=total,
            rows=rows,
        )

    def _grow(self, needed: int) -> None:
        slots = self.slots
        while slots < needed:
            slots *= 2
        check_fits(self.nbytes // max(1, self.slots) * (slots - self.slots), self.device,
                   f"growing a cache of {self.batch} row(s) to {slots} slots")
        for table in (self.keys, self.values):
            for layer, old in table.items():
                new = old.new_zeros(old.shape[:2] + (slots, old.shape[3]))
                new[:, :, : old.shape[2]] = old
                table[layer] = new

    def tokens_in_cache(self, row: int = 0) -> int:
        return int(self.lengths[row])

    def evictions(self, row: int = 0) -> int:
        return 0
