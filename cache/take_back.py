"""Taking back the last one-token step of chosen rows: what it wrote over, kept so it can be put back.

A pipelined engine queues the next decode step before it has read the last one's ids, so a row whose
reply just ended (EOS, a stop string) has already ingested one token nobody will see. Undoing that
step restores the row exactly: its length, and the slot the token went into in every KV layer (once
a window has wrapped, that slot held the oldest window token: the step evicted it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .buffers import KVBuffers, StepPlan


class LastStepLog:
    """The slots the last one-token step of up to `max_rows` addressed rows overwrote, per KV layer.

    `KVBuffers.write` calls `record` before every write; a one-token write of addressed rows (a
    decode step) keeps the slots' old contents (in place, fixed shapes: it replays inside a CUDA
    graph; through the store kernel the write copies them itself, in its own launch), any other
    write is no decode step and is ignored. `take_back(positions, rows)` then puts
    them back for the rows at those positions of the step's batch and steps their lengths back by one.
    Only the last one-token step can be taken back, once, before the next one.
    """

    def __init__(self, buffers: "KVBuffers", max_rows: int):
        self.buffers = buffers
        shape = (max_rows, buffers.num_kv_heads, 1, buffers.head_dim)
        kw = {"dtype": buffers.dtype, "device": buffers.device}
        self.keys = {layer: torch.zeros(shape, **kw) for layer in buffers.kv_layers}  # [R, Hkv, 1, D]
        self.values = {layer: torch.zeros(shape, **kw) for layer in buffers.kv_layers}
        self.slots = torch.zeros(max_rows, 1, dtype=torch.long, device=buffers.device)  # [R, 1]

    @staticmethod
    def logs(plan: "StepPlan") -> bool:
        """Whether `plan`'s writes are recorded: a one-token step of addressed rows, not padded."""
        return plan.rows is not None and plan.n == 1 and plan.padding is None

    def record(self, layer: int, plan: "StepPlan", *, contents: bool = True) -> None:
        """Keep what `plan`'s write to `layer` is about to overwrite, if it is a one-token step.
        `contents=False`: the write itself copies the old keys and values into `log(layer)` (the
        store kernel, in the same launch); only the slots are kept here, once per step."""
        if not self.logs(plan):
            return
        k = plan.rows.shape[0]
        if contents:
            index = self.buffers.slot_index(plan.rows, plan.write_slots)
            self.keys[layer][:k] = self.buffers.keys[layer][index]
            self.values[layer][:k] = self.buffers.values[layer][index]
        if layer == self.buffers.kv_layers[0]:  # every layer of a step writes the same slots
            self.slots[:k] = plan.write_slots

    def log(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [max_rows, Hkv, 1, D]: where a write to `layer` keeps what it overwrites."""
        return self.keys[layer], self.values[layer]

    def take_back(self, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Undo the recorded step for rows [j] (long), at positions [j] of its batch."""
        index = self.buffers.slot_index(rows, self.slots.index_select(0, positions))
        for layer in self.buffers.kv_layers:
            self.buffers.keys[layer].index_put_(index, self.keys[layer].index_select(0, positions))
            self.buffers.values[layer].index_put_(index, self.values[layer].index_select(0, positions))
        self.buffers.lengths.index_add_(0, rows, torch.full_like(rows, -1))
