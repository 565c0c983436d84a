"""Triton kernels of the step (CUDA): attention read from the sink-window cache (one token per row, and
chunks of several), one-row GEMVs, the greedy sampling bookkeeping."""


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


def use_fused_greedy(on: bool | None) -> None:
    """Whether a pure-greedy decode step (no row with a temperature or a repetition penalty) samples
    and records its tokens in one Triton launch (`greedy_step.py`: argmax, draw counter, penalty
    history) instead of torch.argmax and a dozen small kernels. None (the default): on wherever
    Triton and CUDA are (batch-1 decode 0-7 % faster on the H200 with the fused plan, never slower;
    benchmarks/RESULTS.md); True/False force it. Graphs captured before the switch keep what they
    were captured with."""
    from . import greedy_step

    if on and greedy_step.triton is None:
        raise RuntimeError("the fused greedy step needs Triton")
    greedy_step.ENABLED = True if on is None else bool(on)


def use_fused_plan(on: bool | None) -> None:
    """Whether a one-token step on a sink-window cache plans its writes (slots, lengths after the step,
    in-cache positions) in one Triton launch (`cache/plan_kernel.py`) instead of about eleven small
    torch kernels. None (the default): on wherever Triton and CUDA are; True/False force it. Graphs
    captured before the switch keep what they were captured with."""
    from cache import plan_kernel

    if on and plan_kernel.triton is None:
        raise RuntimeError("the fused plan needs Triton")
    plan_kernel.ENABLED = True if on is None else bool(on)


def use_fused_store(on: bool | None) -> None:
    """Whether a one-token step of one row has its attention kernel also store the layer's own new keys
    and values (`decode_attention.py`'s `store`) instead of a store launch before it: one launch per
    KV layer and step less. None (the default): on wherever Triton and CUDA are (plain batch-1 decode
    13 % faster on the H200, LCKV within 2 %; benchmarks/RESULTS.md); True/False force it. Steps of
    several rows keep the store launch (an engine at 256 streams read 5-15 % slower with it fused), and
    so does a pipelined engine, which keeps what a step overwrites. Graphs captured before the switch
    keep what they were captured with."""
    from . import decode_attention

    if on and decode_attention.triton is None:
        raise RuntimeError("the fused store needs Triton")
    decode_attention.STORES = True if on is None else bool(on)
