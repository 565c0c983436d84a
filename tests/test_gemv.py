"""The one-row GEMV kernels (streaming/kernels/gemv.py, streaming/layer_gemv.py) equal the eager layer
functions of streaming/layer_math.py.

GPU only (CI has no Triton); on CPU they run under Triton's interpreter when TRITON_INTERPRET=1.
Float32: the same arithmetic in another summation order (bounds of float32 reassociation). bf16: the
kernels round where the eager functions do, so the results differ by the rounding of differently
ordered float32 sums (an ulp or two, relative 2^-8 each) and what later roundings make of it.
"""

import pytest
import torch
import torch.nn.functional as F

from streaming import layer_gemv, layer_math
from streaming.kernels import gemv as kernels
from streaming.rope import cos_sin, inverse_frequencies
from streaming.config import RopeConfig
from tests.triton_device import DEVICE, ON_GPU, needs_triton

pytestmark = needs_triton(kernels)
# Relative to the largest reference value: float32 reassociation over K <= 5,632 terms; bf16: a few
# ulps (2^-8) of the output, more after SwiGLU multiplies two rounded products.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-5}
# Triton's interpreter casts float32 to bf16 by truncating (measured), the GPU rounds to nearest.
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_GPU, reason="GPU only: the interpreter truncates to bf16"))
SMALL = (2, 64, 4, 1)  # a config whose blocks divide the small shapes unevenly too (the interpreter is slow)


def _randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


def _close(got, expected, dtype):
    scale = expected.float().abs().max()
    err = (got.float() - expected.float()).abs().max()
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert err <= TOLERANCE[dtype] * scale, f"max error {err:.3g} against scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("n", [40, 37])  # 37: the last block's rows past N are masked
def test_plain_and_residual_equal_linear(dtype, n):
    K = 96
    x, w, res = _randn(1, 1, K, dtype=dtype, seed=0), _randn(n, K, dtype=dtype, seed=1), _randn(1, 1, n, dtype=dtype, seed=2)
    _close(kernels.gemv(x, w, config=SMALL), F.linear(x, w), dtype)
    _close(kernels.gemv(x, w, residual=res, config=SMALL), res + F.linear(x, w), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_norm_swiglu_and_logits_equal_the_eager_functions(dtype):
    K, N = 160, 48
    x, w = _randn(1, 1, K, dtype=dtype, seed=3, scale=3.0), _randn(N, K, dtype=dtype, seed=4, scale=0.2)
    norm_weight = (torch.rand(K, generator=torch.Generator().manual_seed(5)) + 0.5).to(DEVICE, dtype)
    normed = layer_math.rms_norm(x, norm_weight, 1e-5)
    _close(kernels.gemv(x, w, norm=(norm_weight, 1e-5), config=SMALL), F.linear(normed, w), dtype)
    gate, up = F.linear(normed, w).chunk(2, dim=-1)
    _close(kernels.gemv(x, w, norm=(norm_weight, 1e-5), swiglu=True, config=SMALL), F.silu(gate) * up, dtype)
    _close(kernels.gemv(x, w, norm=(norm_weight, 1e-5), out_dtype=torch.float32, config=SMALL),
           layer_math.final_logits(x, norm_weight, 1e-5, w), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_layer_functions_equal_the_eager_layer(dtype):
    # A GQA layer (4 query heads, 2 KV heads of 16) at in-cache position 37.
    hidden_size, heads, kv_heads, head_dim, inter = 64, 4, 2, 16, 96
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    hidden = _randn(1, 1, hidden_size, dtype=dtype, seed=6, scale=2.0)
    norm1, norm2 = ((torch.rand(hidden_size, generator=torch.Generator().manual_seed(s)) + 0.5).to(DEVICE, dtype)
                    for s in (7, 8))
    qkv = _randn(q_size + 2 * kv_size, hidden_size, dtype=dtype, seed=9, scale=0.3)
    inv_freq = inverse_frequencies(RopeConfig(), head_dim).to(DEVICE)
    cos, sin = cos_sin(torch.tensor([[37]], device=DEVICE), inv_freq, dtype)  # [1, 1, 1, D]
    args = (hidden, norm1, 1e-5, qkv, q_size, kv_size, cos, sin, heads, kv_heads, head_dim)
    for got, expected in zip(layer_gemv.attention_inputs(*args), layer_math.attention_inputs(*args)):
        _close(got, expected, dtype)
    # The top of an LCKV block's non-final pass: keys and values only (no rotation).
    kv_only = (hidden, norm1, 1e-5, qkv[q_size:], 0, kv_size, cos, sin, heads, kv_heads, head_dim)
    got, expected = layer_gemv.attention_inputs(*kv_only), layer_math.attention_inputs(*kv_only)
    assert got[0] is None and expected[0] is None
    _close(got[1], expected[1], dtype)
    _close(got[2], expected[2], dtype)

    attn = _randn(1, heads, 1, head_dim, dtype=dtype, seed=10)
    o = _randn(hidden_size, q_size, dtype=dtype, seed=11, scale=0.3)
    gate_up = _randn(2 * inter, hidden_size, dtype=dtype, seed=12, scale=0.3)
    down = _randn(hidden_size, inter, dtype=dtype, seed=13, scale=0.3)
    out_args = (hidden, attn, o, norm2, 1e-5, gate_up, down)
    _close(layer_gemv.layer_output(*out_args), layer_math.layer_output(*out_args), dtype)


def test_rotation_is_applied_to_query_heads_only():
    # Float32, position 5: the kernel's query columns equal the rotated product, key/value columns
    # the product itself; a rotation at the wrong position or on the keys would not.
    D, q_size, N, K = 8, 24, 40, 32
    x, w = _randn(1, 1, K, dtype=torch.float32, seed=14), _randn(N, K, dtype=torch.float32, seed=15)
    inv_freq = inverse_frequencies(RopeConfig(), D).to(DEVICE)
    cos, sin = cos_sin(torch.tensor([[5]], device=DEVICE), inv_freq, torch.float32)
    got = kernels.gemv(x, w, rotate=(cos, sin, q_size), config=SMALL)
    product = F.linear(x, w)
    q = product[..., :q_size].view(1, 1, q_size // D, D).transpose(1, 2)
    rotated = layer_math.rotate(q, cos, sin).transpose(1, 2).reshape(1, 1, q_size)
    _close(got[..., :q_size], rotated, torch.float32)
    assert (got[..., :q_size] - product[..., :q_size]).abs().max() > 0.1  # the rotation did something
    _close(got[..., q_size:], product[..., q_size:], torch.float32)


def test_bad_shapes_are_refused():
    x, w = _randn(1, 1, 32, dtype=torch.float32, seed=16), _randn(24, 32, dtype=torch.float32, seed=17)
    with pytest.raises(ValueError, match="must be"):
        kernels.gemv(x, w.t())  # columns not contiguous
    with pytest.raises(ValueError, match="whole heads"):
        cos = torch.ones(1, 1, 1, 16, device=DEVICE)
        kernels.gemv(x, w, rotate=(cos, cos, 24))  # 24 outputs are not heads of 16


@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability()[0] < 9, reason="GPU only: needs a Hopper GPU or later")
def test_programmatic_dependent_launch_gives_the_same_results(monkeypatch):
    # A chain of GEMVs where each reads the one before it: with PDL each may be scheduled before its
    # predecessor ends, so a missing wait would read a stale input; the chain equals the plain launches.
    dtype, K = torch.bfloat16, 2048
    weights = [_randn(K, K, dtype=dtype, seed=20 + i, scale=K**-0.5) for i in range(6)]
    x = _randn(1, 1, K, dtype=dtype, seed=19)

    def chain():
        y = x
        for w in weights:
            y = kernels.gemv(y, w, residual=y)
        return y

    from cache import pdl

    monkeypatch.setattr(pdl, "FORCED", False)
    expected = chain()
    monkeypatch.setattr(pdl, "FORCED", True)
    assert torch.equal(chain(), expected)


@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability()[0] < 9, reason="GPU only: needs a Hopper GPU or later")
@pytest.mark.parametrize("graphs", [False, True])
def test_a_decode_step_with_programmatic_dependent_launch_is_unchanged(tmp_path, graphs):
    # Every Triton kernel of the step (GEMVs, store, attention, join) launched with PDL: the same
    # logits to the bit and the same greedy ids as plain launches, eager and replayed from graphs.
    import streaming
    from streaming import kernels as step_kernels
    from tests.tiny_checkpoint import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "m", "lckv", with_tokenizer=False, std=0.5, head_dim=64,
                                hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    rt = streaming.load(path, device="cuda", dtype="bfloat16")
    rt.eos_ids, rt.cuda_graphs = set(), graphs
    prompt = torch.randint(3, rt.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()

    def run():
        s = rt.session(sinks=4, window=28, chunk=8)  # 40 + 24 tokens wrap the window
        s.feed(prompt)
        ids = [t for r in s.generate(max_new_tokens=24, temperature=0.0) for t in r.token_ids]
        return ids, s.next_logits.clone()

    try:
        step_kernels.use_pdl(False)
        expected = run()
        step_kernels.use_pdl(True)
        got = run()
    finally:
        step_kernels.use_pdl(None)
    assert got[0] == expected[0] and len(got[0]) == 24
    assert torch.equal(got[1], expected[1])
