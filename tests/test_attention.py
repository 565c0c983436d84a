"""streaming.attention.attend: the sdpa path equals the plain path and a float64 loop reference.

Fresh random inputs, GQA (several query heads per KV head, with KV heads made distinguishable so a
wrong head mapping fails), arbitrary masks including all-masked rows, which must give exactly zero and
never NaN. Also the whole model with attention_impl "plain" vs "sdpa".
"""

from __future__ import annotations

import math

import pytest
import torch

from streaming.attention import attend
from streaming.forward import forward_tokens
from tests.runtime_helpers import build, full_cache, sink_cache
from tests.tiny_checkpoint import lckv_config


def _loop_reference(q, keys, values, mask):
    """Explicit float64 loops: head h reads KV head h // (H / Hkv); no visible key -> zeros."""
    B, H, n, D = q.shape
    Hkv = keys.shape[1]
    out = torch.zeros(B, H, n, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(n):
                seen = mask[b, i].nonzero().flatten()
                if len(seen) == 0:
                    continue
                k, v = keys[b, g, seen].double(), values[b, g, seen].double()
                w = torch.softmax(k @ q[b, h, i].double() / math.sqrt(D), dim=0)
                out[b, h, i] = w @ v
    return out


def _inputs(B, H, Hkv, n, L, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, D, generator=g) * 2
    keys = torch.randn(B, Hkv, L, D, generator=g) * 2
    values = torch.randn(B, Hkv, L, D, generator=g) + torch.arange(Hkv).view(1, Hkv, 1, 1) * 10
    mask = torch.rand(B, n, L, generator=g) < 0.5
    mask[0, 0] = False  # an all-masked row
    mask[-1, -1] = False
    if n > 1:
        mask[0, 1] = False
        mask[0, 1, L // 2] = True  # a row with exactly one visible key
    return q.to(dtype), keys.to(dtype), values.to(dtype), mask


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 3), (8, 1)])
@pytest.mark.parametrize("n,L", [(1, 1), (1, 9), (2, 2), (5, 9), (7, 7), (3, 40)])
def test_sdpa_equals_plain_equals_loops(H, Hkv, n, L):
    q, keys, values, mask = _inputs(2, H, Hkv, n, L, 16, seed=H * 100 + n * 10 + L)
    expected = _loop_reference(q, keys, values, mask)
    for impl in ("sdpa", "plain"):
        out = attend(q, keys, values, mask, impl=impl)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert torch.isfinite(out).all(), impl
        assert (out - expected).abs().max() < 1e-4, impl
        empty = ~mask.any(-1)  # [B, n]
        assert empty.any()
        assert bool((out.permute(0, 2, 1, 3)[empty] == 0).all()), impl  # exactly zero, not ~0
    assert torch.allclose(attend(q, keys, values, mask, impl="sdpa"), attend(q, keys, values, mask, impl="plain"),
                          atol=1e-5, rtol=1e-5)


def test_fully_masked_batch_is_zero():
    q, keys, values, _ = _inputs(2, 4, 2, 3, 5, 8, seed=1)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    for impl in ("sdpa", "plain"):
        out = attend(q, keys, values, mask, impl=impl)
        assert torch.equal(out, torch.zeros_like(out))


def test_single_visible_key_returns_its_value():
    q, keys, values, _ = _inputs(1, 4, 2, 1, 6, 8, seed=2)
    mask = torch.zeros(1, 1, 6, dtype=torch.bool)
    mask[0, 0, 4] = True
    for impl in ("sdpa", "plain"):
        out = attend(q, keys, values, mask, impl=impl)
        for h in range(4):
            assert torch.allclose(out[0, h, 0], values[0, h // 2, 4], atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_low_precision_paths_agree(dtype, tol):
    q, keys, values, mask = _inputs(2, 4, 2, 6, 12, 16, seed=3, dtype=dtype)
    expected = _loop_reference(q, keys, values, mask)
    scale = expected.abs().max()
    for impl in ("sdpa", "plain"):
        out = attend(q, keys, values, mask, impl=impl)
        assert torch.isfinite(out).all()
        assert (out.double() - expected).abs().max() / scale < tol, impl
        assert bool((out.permute(0, 2, 1, 3)[~mask.any(-1)] == 0).all())


def test_unknown_impl_is_refused():
    q, keys, values, mask = _inputs(1, 2, 2, 2, 3, 4, seed=4)
    with pytest.raises(ValueError, match="flash"):
        attend(q, keys, values, mask, impl="flash")


def test_model_plain_and_sdpa_paths_agree(tmp_path):
    """Whole LCKV model (zero-attention first token, iterative prefill, sink window)."""
    model, _ = build(tmp_path, lckv_config(6))
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(5))
    results = {}
    for impl in ("sdpa", "plain"):
        model.attention_impl = impl
        full = forward_tokens(model, full_cache(model), ids, all_logits=True)
        cache = sink_cache(model, 2, 8)
        streamed = torch.cat([forward_tokens(model, cache, ids[:, a : a + 4], all_logits=True)
                              for a in range(0, 40, 4)], dim=1)
        results[impl] = (full, streamed)
    model.attention_impl = "sdpa"
    for a, b in zip(results["sdpa"], results["plain"]):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() / b.abs().max() < 1e-5


def test_rmsnorm_fused_float32_equals_the_reference_formula():
    """float32 inputs take F.rms_norm (one op); bf16 keeps the explicit float32 path of HF Llama. Both
    equal x / sqrt(mean(x^2) + eps) * w computed in float64."""
    from streaming.model import RMSNorm

    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=gen) * 2)
    x = torch.randn(3, 5, 48, generator=gen) * 3
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.to(torch.bfloat16)(x.bfloat16()).double(), want, rtol=2e-2, atol=2e-2)
