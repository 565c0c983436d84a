"""The chunk-attention kernel (n new tokens per row, rows by index, RoPE where keys are read) equals the
plain path: gather the rows, rotate the keys at their in-cache positions, mask, softmax. GPU only (CI
has no GPU and no Triton); on CPU it runs under Triton's interpreter when TRITON_INTERPRET=1 is set."""

import pytest
import torch

from cache import SinkWindowCache
from streaming.attention import attend
from streaming.config import RopeConfig
from streaming.kernels import chunk_attention as kernel
from streaming.rope import cos_sin, inverse_frequencies, rope_table, rotate
from tests.triton_device import DEVICE, INTERPRETED, ON_GPU, needs_triton

pytestmark = needs_triton(kernel)


def reference(q, cache, layer, plan, inv_freq, diagonal, table_dtype):
    """The plain path of streaming/forward.py for a chunk (cos/sin rounded to `table_dtype`, as the
    kernel's table is; the rotation and softmax in float32)."""
    keys, values = cache.read(layer, plan)
    cos, sin = (t.float() for t in cos_sin(plan.slot_positions, inv_freq, table_dtype))
    keys = rotate(keys.float(), cos, sin)
    q_pos, k_pos = plan.query_positions[:, :, None], plan.slot_positions[:, None, :]
    mask = plan.slot_valid[:, None, :] & ((k_pos <= q_pos) if diagonal else (k_pos < q_pos))
    return attend(q.float(), keys, values.float(), mask, impl="plain")


CASES = [(4, 60, 8, 2, 64, 7), (0, 100, 4, 4, 32, 33), (2, 33, 32, 4, 64, 33), (4, 1020, 8, 1, 128, 300),
         (4, 200, 6, 2, 64, 150)]  # sinks, window, heads, KV heads, head size, chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sinks,window,heads,kv_heads,head_dim,n", CASES)
@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_kernel_equals_plain_path(dtype, sinks, window, heads, kv_heads, head_dim, n, diagonal, padded):
    if INTERPRETED and not ON_GPU and (window > 200 or dtype != torch.float32):
        pytest.skip("slow under the interpreter, whose half-precision dots are not exact")
    if dtype == torch.float16 and (sinks, window) != (4, 60):
        pytest.skip("float16 in one layout: every layout compiles a kernel variant per dtype")
    gen = torch.Generator().manual_seed(0)
    cache = SinkWindowCache([0], 7, kv_heads, head_dim, sinks=sinks, window=window, dtype=dtype, device=DEVICE)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=gen))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=gen))
    # Rows at every stage before the chunk: empty, filling the sinks, about to wrap, full, long evicted.
    seen = [0, 1, sinks + 1, sinks + window - n // 2, sinks + window, 5 * (sinks + window) + 3, 10**6 + 17]
    cache.lengths.copy_(torch.tensor(seen))
    rows = torch.tensor([6, 0, 3, 1, 5, 2, 4], device=DEVICE)  # any order
    # Padded: only the first `real` tokens are tokens (a short chunk replaying a longer shape).
    real = torch.tensor([max(1, n - 3)], device=DEVICE) if padded else None
    plan = cache.plan(n, rows, real)
    inv_freq = inverse_frequencies(RopeConfig(), head_dim).to(DEVICE)
    q = torch.randn(len(rows), n, heads, head_dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)  # strided
    table_dtype = torch.float32 if dtype == torch.float32 else dtype
    want = reference(q, cache, 0, plan, inv_freq, diagonal, table_dtype)
    cos, sin = rope_table(inv_freq, sinks + window, table_dtype)
    got = kernel.chunk_attention(q, cache.keys[0], cache.values[0], rows, plan.total.reshape(-1),
                                 plan.query_positions, cos, sin, sinks=sinks, window=window, diagonal=diagonal)
    assert got.shape == q.shape and got.dtype == dtype
    if padded:  # the padding's queries are discarded by the step: compare the real ones
        got, want = got[:, :, : int(real)], want[:, :, : int(real)]
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3}.get(dtype, 1e-4)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    if not diagonal:  # the empty row's first query sees nothing: exactly zero
        assert torch.equal(got[1, :, 0], torch.zeros_like(got[1, :, 0]))


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 32), (128, 64)])
def test_block_sizes_agree(block_m, block_n):
    """Every tuning block size gives the plain path's result (blocks that straddle the sinks, the
    ring's wrap and the chunk's end)."""
    sinks, window, heads, kv_heads, head_dim, n = 3, 90, 4, 2, 32, 40
    gen = torch.Generator().manual_seed(1)
    cache = SinkWindowCache([0], 3, kv_heads, head_dim, sinks=sinks, window=window, dtype=torch.float32,
                            device=DEVICE)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=gen))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=gen))
    cache.lengths.copy_(torch.tensor([0, 50, 1000]))
    rows = torch.tensor([2, 1, 0], device=DEVICE)
    plan = cache.plan(n, rows)
    inv_freq = inverse_frequencies(RopeConfig(), head_dim).to(DEVICE)
    q = torch.randn(3, heads, n, head_dim, generator=gen).to(DEVICE)
    want = reference(q, cache, 0, plan, inv_freq, True, torch.float32)
    cos, sin = rope_table(inv_freq, sinks + window)
    got = kernel.chunk_attention(q, cache.keys[0], cache.values[0], rows, plan.total.reshape(-1),
                                 plan.query_positions, cos, sin, sinks=sinks, window=window, diagonal=True,
                                 block_m=block_m, block_n=block_n, num_warps=4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not ON_GPU, reason="GPU only: needs a CUDA GPU")
@pytest.mark.parametrize("kind,overrides", [
    ("plain", {}),
    ("lckv", {}),
    ("lckv", dict(layers=6, layer_types="0_3_4_3_4_5")),  # two targets read from below in one block
    ("plain", dict(num_key_value_heads=1)),
])
def test_prefill_steps_with_kernel_equal_plain_path(tmp_path, kind, overrides):
    """Whole prompt steps (rows by index, chunks of several lengths, padded chunks, windows that wrap)
    with the chunk kernel and with the plain path (SDPA over a rotated copy and a mask), both float32 on
    the GPU, against the plain path in float64 on CPU. An LCKV model's iterative prefill amplifies
    rounding (float32 against float64 differs by up to ~2e-2 in these logits on either path), so the
    kernel's error must stay within four times the plain path's; for a plain model both stay below
    1e-3 as well. A wrong mask, position or rotation is off by far more."""
    import streaming
    from streaming.forward import forward_step
    from tests.float64_reference import float64_runtime
    from tests.tiny_checkpoint import make_tiny_checkpoint

    config = {**dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32), **overrides}
    path = make_tiny_checkpoint(tmp_path / kind, kind, with_tokenizer=False, **config)
    rt = streaming.load(path, device="cuda", dtype="float32")
    reference = float64_runtime(path)
    cfg = rt.config
    runs = [(rt.model, True, "cuda", torch.float32), (rt.model, False, "cuda", torch.float32),
            (reference.model, False, "cpu", torch.float64)]  # kernel, plain path, float64 reference
    caches = [SinkWindowCache(cfg.kv_layers, 4, cfg.num_key_value_heads, cfg.head_dim, sinks=4, window=60,
                              dtype=dtype, device=device) for _, _, device, dtype in runs]
    gen = torch.Generator().manual_seed(3)
    # (chunk length, real tokens or None): fills the sinks, the window, wraps it, padded chunks.
    for n, real in [(9, None), (16, None), (30, None), (16, 5), (40, None), (16, 16), (12, 3), (25, None)]:
        ids = torch.randint(3, cfg.vocab_size, (2, n), generator=gen)
        outs = []
        with torch.inference_mode():
            for (model, use_kernel, device, _), cache in zip(runs, caches):
                model.chunk_kernel = use_kernel
                outs.append(forward_step(model, cache, ids.to(device), passes=cfg.prefill_passes,
                                         all_logits=real is None, rows=torch.tensor([2, 0], device=device),
                                         real=None if real is None else torch.tensor([real], device=device)))
        rt.model.chunk_kernel = True
        errors = []
        for path_out, path_cache in zip(outs[:2], caches[:2]):
            tensors = [(path_out, outs[2])] + [(path_cache.keys[i], caches[2].keys[i]) for i in cfg.kv_layers] + [
                (path_cache.values[i], caches[2].values[i]) for i in cfg.kv_layers]
            errors.append(max(float((a.cpu().double() - b).abs().max()) for a, b in tensors))
        kernel_error, plain_error = errors
        assert kernel_error <= 4 * plain_error + 1e-4, f"chunk {n}: kernel off by {kernel_error}, plain by {plain_error}"
        if kind == "plain":
            assert kernel_error < 1e-3
        assert torch.equal(caches[0].lengths, caches[1].lengths)
