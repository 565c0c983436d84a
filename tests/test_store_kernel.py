"""The cache's store kernel (one launch for a step's keys and values) equals index_put_.
GPU only (CI has no Triton); on CPU it runs under Triton's interpreter when TRITON_INTERPRET=1."""

import pytest
import torch

from cache import store_kernel
from tests.triton_device import ON_GPU, needs_triton

pytestmark = needs_triton(store_kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5])
def test_store_kernel_equals_index_put(dtype, n):
    device = "cuda" if ON_GPU else "cpu"
    gen = torch.Generator().manual_seed(n)
    R, kv_heads, L, D, B = 6, 2, 12, 64, 3
    buffers = [torch.randn(R, kv_heads, L, D, generator=gen).to(device, dtype) for _ in range(2)]
    expected = [b.clone() for b in buffers]
    rows = torch.tensor([4, 0, 2], device=device)
    slots = torch.stack([torch.randperm(L, generator=gen)[:n] for _ in range(B)]).to(device)  # [B, n]
    # New keys/values as a projection leaves them: [B, n, Hkv, D] transposed to [B, Hkv, n, D].
    keys, values = (torch.randn(B, n, kv_heads, D, generator=gen).to(device, dtype).transpose(1, 2) for _ in range(2))
    index = (rows[:, None, None], torch.arange(kv_heads, device=device)[None, :, None], slots[:, None, :])
    expected[0].index_put_(index, keys)
    expected[1].index_put_(index, values)
    store_kernel.store_rows(*buffers, rows, slots, keys, values)
    assert torch.equal(buffers[0], expected[0]) and torch.equal(buffers[1], expected[1])
    assert not torch.equal(buffers[0][1], expected[0][4])  # (rows outside the step kept their contents)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_logged_write_keeps_what_it_overwrote(dtype):
    # The pipelined engine's take-back log, filled by the store kernel in the same launch: log[b, h, 0]
    # holds what (rows[b], h, slots[b]) held before the write, and the write is the same as without.
    device = "cuda" if ON_GPU else "cpu"
    gen = torch.Generator().manual_seed(7)
    R, kv_heads, L, D, B = 6, 2, 12, 64, 3
    buffers = [torch.randn(R, kv_heads, L, D, generator=gen).to(device, dtype) for _ in range(2)]
    before = [b.clone() for b in buffers]
    rows, slots = torch.tensor([4, 0, 2], device=device), torch.tensor([[3], [11], [0]], device=device)
    keys, values = (torch.randn(B, kv_heads, 1, D, generator=gen).to(device, dtype) for _ in range(2))
    log = tuple(torch.full((5, kv_heads, 1, D), -7.0, dtype=dtype, device=device) for _ in range(2))
    store_kernel.store_rows(*buffers, rows, slots, keys, values, log=log)
    for b in range(B):
        for buffer, old, new, kept in zip(buffers, before, (keys, values), log):
            assert torch.equal(kept[b, :, 0], old[rows[b], :, slots[b, 0]])
            assert torch.equal(buffer[rows[b], :, slots[b, 0]], new[b, :, 0])
    assert (log[0][B:] == -7.0).all()  # entries past the batch untouched
    with pytest.raises(ValueError, match="one-token"):
        store_kernel.store_rows(*buffers, rows, slots.repeat(1, 2), keys.repeat(1, 1, 2, 1),
                                values.repeat(1, 1, 2, 1), log=log)
