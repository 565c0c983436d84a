"""Preallocated key/value buffers for the KV-owning layers, and the per-step plan that addresses them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import store_kernel
from .memory_check import check_fits
from .take_back import LastStepLog


@dataclass
class StepPlan:
    """Where the next `n` tokens of every row go, and what every slot holds once they are written.

    All tensors live on the cache's device, so a step never waits on the host.
    """

    n: int
    write_slots: torch.Tensor  # [B, n] long: slot of each new token
    query_positions: torch.Tensor  # [B, n] long: in-cache position of each new token
    # () -> (slot_positions, slot_valid): built the first time either is read. The decode kernel
    # derives them itself, so its steps never build them (a dozen small kernels per step).
    slot_layout: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    total: torch.Tensor  # [B, 1] long: tokens of each row after the step
    # Cache rows the step addresses, [B] long on the device; None = every row, in order. Rows are
    # written and advanced in place (no copy out and back); a step's B rows may repeat only a
    # scratch row whose contents nobody reads.
    rows: torch.Tensor | None = None
    # [1, n] bool, in padded steps only: the token is padding, and its write leaves its slot as it
    # was, so padding never evicts (a short chunk may replay a longer captured shape on any row).
    padding: torch.Tensor | None = None
    _layout: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def slot_positions(self) -> torch.Tensor:
        """[B, L] long: in-cache position of each slot after the write."""
        return self._slots()[0]

    @property
    def slot_valid(self) -> torch.Tensor:
        """[B, L] bool: slot holds a token after the write."""
        return self._slots()[1]

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._layout is None:
            self._layout = self.slot_layout()
        return self._layout

    @property
    def visible(self) -> int:
        """L: how many slots (from 0) a step reads."""
        return self.slot_positions.shape[1]


class KVBuffers:
    """Key/value memory of `batch` sequences for the layers in `kv_layers`.

    Keys are stored *before* RoPE; readers rotate them by their in-cache position, so a key never
    accumulates rotation error however long the stream (DESIGN.md, "The cache").
    """

    def __init__(self, kv_layers, batch, slots, num_kv_heads, head_dim, *, dtype, device):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.kv_layers = list(kv_layers)
        self.batch = batch
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (batch, num_kv_heads, slots, head_dim)
        # Keys and values of every KV layer, checked against the device before any is allocated.
        nbytes = 2 * len(self.kv_layers) * batch * num_kv_heads * slots * head_dim * dtype.itemsize
        check_fits(nbytes, self.device, f"a cache of {batch} row(s) x {slots} slots")
        self.keys = {layer: torch.zeros(shape, dtype=dtype, device=device) for layer in self.kv_layers}
        self.values = {layer: torch.zeros(shape, dtype=dtype, device=device) for layer in self.kv_layers}
        self._heads = torch.arange(num_kv_heads, device=device)[None, :, None]  # [1, Hkv, 1]: write index
        # Writes to addressed rows go through a Triton kernel where it runs (CUDA); False: index_put_.
        self.store_kernel = bool(self.keys) and store_kernel.available(next(iter(self.keys.values())))
        # Tokens each row has seen since its start (its stream length).
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.last_step: LastStepLog | None = None  # see keep_last_step

    def keep_last_step(self, max_rows: int) -> LastStepLog:
        """From now on one-token steps of up to `max_rows` addressed rows keep what they overwrite,
        so `last_step.take_back` can undo the last of them (a pipelined engine)."""
        if self.last_step is None:
            self.last_step = LastStepLog(self, max_rows)
        return self.last_step

    @property
    def slots(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    @property
    def nbytes(self) -> int:
        """Bytes held by all key/value buffers (all rows)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def write(self, layer: int, plan: StepPlan, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [B, Hkv, n, D] of the new tokens at `plan.write_slots`, in place."""
        keys, values = keys.to(self.dtype), values.to(self.dtype)
        # A one-token write of addressed rows through the store kernel keeps what it overwrites in
        # the same launch (a gather and two copies per KV layer and step otherwise).
        in_kernel = self.store_kernel and self.last_step is not None and self.last_step.logs(plan)
        if self.last_step is not None:
            self.last_step.record(layer, plan, contents=not in_kernel)
        if plan.rows is None:
            index = plan.write_slots[:, None, :, None].expand_as(keys)
            if plan.padding is not None:  # a padding token writes back what its slot holds
                keys, values = self._unless_padding(plan, keys, values,
                                                    lambda t: t.gather(2, index), layer)
            self.keys[layer].scatter_(2, index, keys)
            self.values[layer].scatter_(2, index, values)
            return
        if plan.padding is None and self.store_kernel:  # one launch instead of two index_put_
            store_kernel.store_rows(self.keys[layer], self.values[layer], plan.rows, plan.write_slots, keys, values,
                                    log=self.last_step.log(layer) if in_kernel else None)
            return
        index = self.slot_index(plan.rows, plan.write_slots)
        if plan.padding is not None:
            keys, values = self._unless_padding(plan, keys, values, lambda t: t[index], layer)
        self.keys[layer].index_put_(index, keys)
        self.values[layer].index_put_(index, values)

    def slot_index(self, rows: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Advanced index of slots [B, n] of rows [B] in a [R, Hkv, L, D] buffer, every head:
        [B, 1, 1] x [1, Hkv, 1] x [B, 1, n] select [B, Hkv, n, D]."""
        return rows[:, None, None], self._heads, slots[:, None, :]

    def _unless_padding(self, plan: StepPlan, keys, values, held, layer: int):
        """The new keys/values [B, Hkv, n, D], with the slots' current contents (`held(buffer)`) at
        padding tokens. A step's n <= window slots are distinct, so nothing real is overwritten."""
        pad = plan.padding[:, None, :, None]  # [1, 1, n, 1]
        return (torch.where(pad, held(self.keys[layer]), keys), torch.where(pad, held(self.values[layer]), values))

    def read(self, layer: int, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrotated keys and values [B, Hkv, L, D] of the slots a step reads.

        Every row: views of the buffers. Addressed rows: gathered (a read; writes go in place)."""
        visible = plan.visible
        keys, values = self.keys[layer][:, :, :visible], self.values[layer][:, :, :visible]
        if plan.rows is None:
            return keys, values
        return keys.index_select(0, plan.rows), values.index_select(0, plan.rows)

    def advance(self, plan: StepPlan, real: torch.Tensor | None = None) -> None:
        """Commit a step: every addressed row has seen `plan.n` more tokens, or `real` ([1] long on
        the device) when only the first `real` of them are tokens and the rest padding (planned with
        the same `real`: the padding wrote nothing)."""
        if plan.rows is None:
            self.lengths += plan.n if real is None else real
        else:
            by = torch.full_like(plan.rows, plan.n) if real is None else real.expand(plan.rows.shape[0])
            self.lengths.index_add_(0, plan.rows, by)

    def reset(self, row: int | None = None) -> None:
        """Forget the tokens of one row (or all rows); the memory stays allocated."""
        if row is None:
            self.lengths.zero_()
        else:
            self.lengths[row] = 0
