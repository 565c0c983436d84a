"""Triton kernels of the decode step (CUDA): attention read from the sink-window cache, one-row GEMVs."""


def use_pdl(on: bool) -> None:
    """Launch every Triton kernel of a decode step (GEMVs, K/V store, attention, join) with
    programmatic dependent launch (Hopper and later): each may be scheduled while the kernel before it
    finishes, and waits for that kernel's writes before reading. Experimental and off by default
    until measured; graphs captured before the switch keep the launches they were captured with."""
    from cache import store_kernel

    from . import decode_attention, gemv

    if on and gemv.gdc_wait is None:
        raise RuntimeError("programmatic dependent launch needs Triton 3.3 or later")
    for module in (store_kernel, decode_attention, gemv):
        module.PDL = bool(on)
