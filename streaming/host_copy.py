"""Small host-to-device copies that do not wait for the device (a pipelined engine's step inputs).

A plain `.to("cuda")` of a host tensor synchronises the stream first: with a decode step queued, the
host would wait for it and the pipelining would be undone. From pinned memory with `non_blocking`,
the copy is queued behind the step instead (the pinned block stays alive until the copy is done).
"""

from __future__ import annotations

import torch


def host_tensor(values, dtype: torch.dtype, *, pinned: bool) -> torch.Tensor:
    """`values` (a list, or a list of equal-length lists) as a host tensor, in pinned memory if asked."""
    return torch.tensor(values, dtype=dtype, pin_memory=pinned)


def to_device(values, dtype: torch.dtype, device: torch.device, *, without_waiting: bool) -> torch.Tensor:
    """`values` as a tensor on `device`; `without_waiting` on CUDA: copied from pinned memory, queued."""
    pinned = without_waiting and device.type == "cuda"
    return host_tensor(values, dtype, pinned=pinned).to(device, non_blocking=pinned)
