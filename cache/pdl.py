"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step (Hopper and later).

With PDL a kernel may be scheduled while the kernel before it on the stream finishes; it waits
(griddepcontrol.wait) before reading what that kernel wrote, so a launch's set-up and ramp-up hide
behind its predecessor's tail. At batch 1 a decode step is some 200 short kernels, and PDL took the
H200 from 914 to 948 tok/s (plain TinyLlama shape, benchmarks/decode_speed.py). A kernel launched
without PDL, or a torch kernel in the chain, simply starts when its predecessor ends.

Here, not in `streaming`, because the cache's store kernel uses it too (imports flow streaming ->
cache); `streaming.kernels.use_pdl` is the public switch.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton 3.3+; without it no kernel launches with PDL
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

FORCED: bool | None = None  # None: on wherever the GPU and Triton support it; True/False: forced


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether the step's Triton kernels launch with PDL on `device` (never on CPU, where Triton's
    interpreter runs them)."""
    if device.type != "cuda":
        return False
    if FORCED is not None:
        return FORCED
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device) -> dict:
    """A step kernel's launch arguments for PDL on `device`: its `PDL` constexpr (whether it waits
    with griddepcontrol), and Triton's `launch_pdl` when on."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}
