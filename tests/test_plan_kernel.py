"""The fused one-token plan (cache/plan_kernel.py) equals the torch plan of `SinkWindowCache.plan`:
write slots, lengths after the step, in-cache positions, and the slot layout built from them. GPU, or
Triton's interpreter on CPU (TRITON_INTERPRET=1); CI has neither, so these skip there."""

import pytest
import torch

from cache import SinkWindowCache, plan_kernel
from streaming import kernels
from tests.triton_device import DEVICE, ON_GPU, needs_triton

pytestmark = needs_triton(plan_kernel)


def planned(cache, rows, fused):
    kernels.use_fused_plan(fused)
    try:
        return cache.plan(1, rows)
    finally:
        kernels.use_fused_plan(None)


@pytest.mark.parametrize("sinks,window", [(4, 60), (0, 100), (2, 2), (4, 1020)])
@pytest.mark.parametrize("addressed", ["all rows", "some rows", "a repeated scratch row", "more rows than a block"])
def test_fused_plan_equals_torch_plan(sinks, window, addressed):
    rows_total = 300 if addressed == "more rows than a block" else 9
    cache = SinkWindowCache([0], rows_total, 1, 8, sinks=sinks, window=window, dtype=torch.float32, device=DEVICE)
    # Rows at every stage: empty, in the sinks, filling the window, just full, long evicted, huge.
    stages = [0, 1, sinks, sinks + 1, sinks + window - 1, sinks + window, 3 * (sinks + window) + 5, 10**6 + 17,
              2**40 + 3]
    cache.lengths.copy_(torch.tensor([stages[i % len(stages)] for i in range(rows_total)]))
    rows = {"all rows": None, "some rows": torch.tensor([7, 0, 3, 8], device=DEVICE),
            "a repeated scratch row": torch.tensor([2, 5, 8, 8, 8], device=DEVICE),
            "more rows than a block": torch.arange(rows_total - 1, -1, -1, device=DEVICE)}[addressed]
    want, got = planned(cache, rows, False), planned(cache, rows, True)
    for name in ("write_slots", "total", "query_positions"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    assert torch.equal(got.slot_positions, want.slot_positions)
    assert torch.equal(got.slot_valid, want.slot_valid)
    assert torch.equal(cache.lengths, torch.tensor([stages[i % len(stages)] for i in range(rows_total)],
                                                   device=DEVICE))  # planning never advances


@pytest.mark.parametrize("graphs", [False, True] if ON_GPU else [False])
@pytest.mark.parametrize("kind", ["plain", "lckv"])
def test_engine_tokens_equal_with_and_without_the_fused_plan(tmp_path, monkeypatch, kind, graphs):
    """Whole greedy generations whose windows wrap, with the fused plan and without: identical tokens
    (every decode step of the fused run planned by the kernel: counted when eager; with CUDA graphs
    Python launches it only while a graph is captured)."""
    import streaming
    from tests.engine_runs import counted, generate_all
    from tests.tiny_checkpoint import make_tiny_checkpoint

    rt = streaming.load(make_tiny_checkpoint(tmp_path / kind, kind, with_tokenizer=False), device=DEVICE,
                        dtype="float32")
    rt.cuda_graphs = graphs
    launches = counted(monkeypatch, plan_kernel, "decode_plan")
    results = []
    for fused in (False, True):
        kernels.use_fused_plan(fused)
        try:
            results.append([job.generated for job in generate_all(rt, [40, 40, 40])[1]])
        finally:
            kernels.use_fused_plan(None)
    assert results[0] == results[1] and all(len(t) == 40 for t in results[1])
    assert len(launches) >= (1 if graphs else 40)
