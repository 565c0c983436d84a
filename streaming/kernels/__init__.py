"""Triton kernels of the step (CUDA): attention read from the sink-window cache (one token per row, and
chunks of several), one-row GEMVs."""


def use_pdl(on: bool | None) -> None:
    """Whether every Triton kernel of a decode step (GEMVs, K/V store, attention, join) launches with
    programmatic dependent launch (`cache/pdl.py`): each may be scheduled while the kernel before it
    finishes, and waits for that kernel's writes before reading. None (the default): on wherever the
    GPU (Hopper or later) and Triton (3.3+) support it; True/False force it. Graphs captured before
    the switch keep the launches they were captured with."""
    from cache import pdl

    if on and pdl.gdc_wait is None:
        raise RuntimeError("programmatic dependent launch needs Triton 3.3 or later")
    pdl.FORCED = None if on is None else bool(on)
