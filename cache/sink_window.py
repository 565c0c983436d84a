"""The StreamingLLM sink + window ring buffer (DESIGN.md, "The cache").

Slots 0..S-1 hold the first S tokens of the stream for ever ("sinks"); slots S..S+W-1 are a ring
holding the most recent W tokens. Token t goes to slot t (t < S) or S + (t - S) mod W. The window
counts the token being written: once full, a step of n tokens overwrites the n oldest window tokens
("evict for space"), so the new tokens see the sinks, the W - n most recent older tokens, and each
other causally. Positions are assigned inside the cache: the held tokens, oldest first, get 0..S+W-1.
"""

from __future__ import annotations

import torch

from . import plan_kernel
from .buffers import KVBuffers, StepPlan
from .errors import CacheConfigError


class SinkWindowCache(KVBuffers):
    """Fixed-size KV memory: S sinks + W window slots per row, allocated once, never reallocated."""

    def __init__(self, kv_layers, batch, num_kv_heads, head_dim, *, sinks, window, dtype, device):
        check_sink_window(sinks, window)
        super().__init__(kv_layers, batch, sinks + window, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.sinks = sinks
        self.window = window
        slots = torch.arange(sinks + window, device=self.device)
        self._sink_slots = slots[:sinks]  # [S]
        self._window_slots = slots[sinks:] - sinks  # [W]: 0..W-1
        self._offsets = {}

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def plan(self, n: int, rows: torch.Tensor | None = None, real: torch.Tensor | None = None) -> StepPlan:
        """Plan a step of n new tokens for every row, or for `rows` ([B] long on the device) only.

        `real` ([1] long on the device): only the first `real` tokens are tokens, the rest padding
        (a short chunk replaying a longer captured shape). The plan is then that of `real` tokens:
        the same slots, positions and evictions; the padding's writes keep their slots unchanged
        (`StepPlan.padding`) and its queries' results are discarded."""
        if not 1 <= n <= self.window:
            raise CacheConfigError(f"a step of {n} tokens does not fit a window of {self.window}")
        S, W = self.sinks, self.window
        offsets = self._offsets.get(n)
        if offsets is None:
            offsets = self._offsets[n] = torch.arange(n, device=self.device)
        if n == 1 and real is None and plan_kernel.usable(self.device):  # one launch instead of ~11 ops
            write_slots, total, query_positions = plan_kernel.decode_plan(self.lengths, rows, sinks=S, window=W)
        else:
            lengths = self.lengths if rows is None else self.lengths.index_select(0, rows)
            start = lengths[:, None]  # [B, 1] tokens seen before the step
            token = start + offsets  # [B, n] stream index of each new token
            write_slots = torch.where(token < S, token, S + torch.remainder(token - S, W))
            total = start + (n if real is None else real)  # [B, 1] tokens seen after the step
            evicted = (total - S - W).clamp(min=0)  # [B, 1] tokens dropped from the window so far
            query_positions = token - evicted

        def slot_layout() -> tuple[torch.Tensor, torch.Tensor]:
            # Window slot s holds window token k = m-1 - ((m-1-s) mod W), m = window tokens written.
            evicted = (total - S - W).clamp(min=0)  # [B, 1] tokens dropped from the window so far
            written = total - S  # [B, 1]
            k = written - 1 - torch.remainder(written - 1 - self._window_slots, W)  # [B, W]
            window_valid = k >= 0
            window_pos = S + k - evicted
            sink_valid = self._sink_slots < total  # [B, S]
            sink_pos = self._sink_slots.expand_as(sink_valid)
            slot_positions = torch.cat((sink_pos, window_pos), dim=1)
            slot_valid = torch.cat((sink_valid, window_valid), dim=1)
            if self.device.type == "cpu":
                # Until a row's window wraps, its tokens fill slots 0..total-1 in order: a step need
                # not read past the fullest row's last slot (a short stream then costs what it holds,
                # not S+W slots of masked work). Only where reading the lengths is free: on CUDA the
                # shape must not depend on them (graphs) and the decode kernel skips empty slots itself.
                visible = min(S + W, int(total.max()))
                slot_positions, slot_valid = slot_positions[:, :visible], slot_valid[:, :visible]
            return slot_positions, slot_valid

        return StepPlan(
            n=n,
            write_slots=write_slots,
            query_positions=query_positions,
            slot_layout=slot_layout,
            total=total,
            rows=rows,
            padding=None if real is None else (offsets >= real)[None],
        )

    def row(self, index: int) -> "SinkWindowCache":
        """A one-row view: same memory, so a step on the view writes into row `index` (a ring never
        reallocates, so the view stays valid for the cache's life)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.keys = {layer: t[index : index + 1] for layer, t in self.keys.items()}
        view.values = {layer: t[index : index + 1] for layer, t in self.values.items()}
        view.lengths = self.lengths[index : index + 1]
        view.batch = 1
        return view

    def tokens_in_cache(self, row: int = 0) -> int:
        return min(int(self.lengths[row]), self.capacity)

    def evictions(self, row: int = 0) -> int:
        return max(0, int(self.lengths[row]) - self.capacity)


def check_sink_window(sinks: int, window: int) -> None:
    """Raise CacheConfigError for settings no sink window can honour."""
    for name, value in (("sinks", sinks), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CacheConfigError(f"{name} must be an integer, got {value!r}")
    if window < 1:
        raise CacheConfigError(f"window must be >= 1, got {window}")
    if sinks < 0:
        raise CacheConfigError(f"sinks must be >= 0, got {sinks}")
    if sinks > window:
        raise CacheConfigError(f"sinks ({sinks}) must not exceed window ({window})")


def check_chunk(chunk: int, window: int | None) -> None:
    """Raise CacheConfigError unless 1 <= chunk <= window (window None: an unbounded cache)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise CacheConfigError(f"chunk must be an integer >= 1, got {chunk!r}")
    if window is not None and chunk > window:
        raise CacheConfigError(f"chunk ({chunk}) must not exceed window ({window}): a step evicts to make room")
