"""Where the Triton kernels run: a CUDA device, or any device under Triton's interpreter
(TRITON_INTERPRET=1, a CPU debugging aid used by the tests). Read once at import, as Triton reads it
when it decorates a kernel, so the per-step checks do not look up the environment each time."""

from __future__ import annotations

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of `device` (Triton's presence is the caller's check)."""
    return device.type == "cuda" or INTERPRETED
