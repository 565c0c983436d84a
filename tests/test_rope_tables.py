"""The decode step's cos/sin from tables built once equal the angles computed per step (`rope`).

A decode step on CUDA takes its queries' cos/sin as rows of a full-width table (`CausalLM.rope_at`)
and the decode kernel reads a half-width one (`rope_table`): both must hold what `cos_sin` computes for
the same positions (the same float32 angles, rounded to the model's dtype), for every RoPE variant.
"""

import pytest
import torch

from streaming.config import ModelConfig
from streaming.model import CausalLM
from tests.tiny_checkpoint import plain_config

ROPES = {
    "default": {},
    "llama3": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64)),
    "linear": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
}


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_rows_equal_the_computed_angles(rope, dtype):
    model = CausalLM(ModelConfig.from_dict(plain_config(rope_theta=500000.0, **ROPES[rope])))
    slots = 300
    positions = torch.tensor([[0], [1], [299], [137]])  # [B, 1]: one query per row, as a decode step
    cos, sin = model.rope_at(positions, slots, dtype)
    ref_cos, ref_sin = model.rope(positions, dtype)
    assert cos.shape == ref_cos.shape == (4, 1, 1, model.config.head_dim) and cos.dtype == dtype
    # Same float32 angles and the same cos/sin: equal to the last bit but for the vectorised CPU
    # cos/sin, which may round a lane differently (an ulp).
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=2e-7 if dtype == torch.float32 else 2**-8)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=2e-7 if dtype == torch.float32 else 2**-8)
    # And the half-width table the decode kernel reads holds the same first half.
    half_cos, half_sin = model.rope_table(slots, "cpu", dtype)
    assert torch.equal(half_cos.index_select(0, positions.view(-1)), cos[:, 0, 0, : cos.shape[-1] // 2])
    assert torch.equal(half_sin.index_select(0, positions.view(-1)), sin[:, 0, 0, : sin.shape[-1] // 2])


def test_a_position_past_the_table_is_an_error():
    model = CausalLM(ModelConfig.from_dict(plain_config()))
    with pytest.raises(IndexError):
        model.rope_at(torch.tensor([[300]]), 300, torch.float32)
