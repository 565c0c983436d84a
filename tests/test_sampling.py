"""Sampling: parameter validation, generation defaults, filters, and the sampler itself."""

import json
import math

import pytest
import torch

from streaming.errors import ConfigError, InvalidInputError
from streaming.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    load_generation_defaults,
    make_generator,
    sample,
    top_k_filter,
    top_p_filter,
)

NEG = float("-inf")


# -- params -----------------------------------------------------------------------------------------


def test_defaults_are_greedy_and_valid():
    p = SamplingParams().validate()
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed) == (0.0, 0, 1.0, 1.0, None)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"), ("temperature", True),
        ("top_k", -1), ("top_k", 2.5), ("top_k", "5"),
        ("top_p", 0.0), ("top_p", 1.5), ("top_p", None),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
        ("seed", 1.5), ("seed", "42"),
    ],
)
def test_validate_names_the_field(field, value):
    with pytest.raises(InvalidInputError, match=field):
        SamplingParams(**{field: value}).validate()


def test_merged_ignores_none_and_validates():
    base = SamplingParams(temperature=0.7, top_k=40)
    p = base.merged(temperature=None, top_p=0.9, seed=3)
    assert (p.temperature, p.top_k, p.top_p, p.seed) == (0.7, 40, 0.9, 3)
    assert base.top_p == 1.0  # the original is untouched
    with pytest.raises(InvalidInputError, match="top_p"):
        base.merged(top_p=2.0)
    with pytest.raises(InvalidInputError, match="unknown"):
        base.merged(temprature=1.0)


def test_generation_defaults(tmp_path):
    assert load_generation_defaults(tmp_path) == {}
    cfg = {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_length": 4096, "bos_token_id": 1, "do_sample": True}
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    assert load_generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "top_k": 50}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert load_generation_defaults(tmp_path) == {"temperature": 0.0}  # transformers: no sampling = greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 7}))
    with pytest.raises(ConfigError, match="generation_config.json.*top_p"):
        load_generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json"):
        load_generation_defaults(tmp_path)


# -- filters ----------------------------------------------------------------------------------------


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 1.0, 1.0, 1.0]])
    seen_ids = torch.tensor([[0, 1, 1], [3, -1, -1]])  # duplicates and -1 padding
    out = apply_repetition_penalty(logits, seen_ids, 2.0)
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0], [1.0, 1.0, 1.0, 0.5]])
    assert torch.equal(out, expected)
    mask = torch.tensor([[True, True, False, False], [False, False, False, True]])
    assert torch.equal(apply_repetition_penalty(logits, mask, 2.0), expected)
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, -3.0]))  # input untouched
    # padding must not erase a real hit on column 0
    assert apply_repetition_penalty(logits[:1], torch.tensor([[-1, 0, -1]]), 2.0)[0, 0] == 1.0


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [0.0, 0.0, 1.0, -1.0]])
    out = top_k_filter(logits, 2)
    assert torch.equal(out[0], torch.tensor([NEG, 5.0, NEG, 4.0]))
    assert torch.equal(out[1], torch.tensor([0.0, 0.0, 1.0, NEG]))  # ties with the k-th are kept
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_keeps_minimal_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.9, 0.04, 0.03, 0.03]])
    logits = probs.log()
    kept = top_p_filter(logits, 0.8) > NEG
    # 0.5 + 0.3 = 0.8 reaches p: the 0.15 and 0.05 tokens go
    assert kept[0].tolist() == [True, False, True, False]
    # the top token alone exceeds p
    assert kept[1].tolist() == [True, False, False, False]
    assert (top_p_filter(logits, 0.81) > NEG)[0].tolist() == [True, False, True, True]
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert (top_p_filter(logits, 1e-9) > NEG).sum(-1).tolist() == [1, 1]  # never empty


# -- sample -----------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))
    assert sample(logits, SamplingParams()).dtype == torch.long


def test_top_k_1_is_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    g = make_generator(0)
    for _ in range(5):
        assert torch.equal(sample(logits, SamplingParams(temperature=1.5, top_k=1), g), logits.argmax(-1))


def test_repetition_penalty_in_sample():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    p = SamplingParams(repetition_penalty=2.0)
    assert sample(logits, p).tolist() == [0]
    assert sample(logits, p, seen=torch.tensor([[0]])).tolist() == [1]  # 3/2 < 2


def test_same_seed_same_samples():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, top_p=0.95)
    a = [sample(logits, p, make_generator(7)) for _ in range(3)]
    b = [sample(logits, p, make_generator(7)) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    g1, g2 = make_generator(7), make_generator(7)
    seq1 = torch.stack([sample(logits, p, g1) for _ in range(20)])
    seq2 = torch.stack([sample(logits, p, g2) for _ in range(20)])
    assert torch.equal(seq1, seq2)
    assert not torch.equal(seq1, torch.stack([sample(logits, p, make_generator(8)) for _ in range(20)]))


def test_distribution_matches_softmax():
    # 20k draws from softmax(logits / T): every frequency within 5 standard errors
    target = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    temperature = 0.7
    logits = (target.log() * temperature).expand(20_000, -1)  # one row per draw, one batched call
    draws = sample(logits, SamplingParams(temperature=temperature), make_generator(0))
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    for f, p in zip(freq.tolist(), target.tolist()):
        assert abs(f - p) < 5 * math.sqrt(p * (1 - p) / draws.numel()), (freq, target)


def test_distribution_with_filters():
    target = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = target.log().expand(20_000, -1)
    draws = sample(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.65), make_generator(1))
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    # top_k=3 drops 0.1; top_p=0.65 then keeps 0.4 + 0.3 -> renormalised 4/7, 3/7
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 4 / 7) < 0.02


def test_bad_logits_shape():
    with pytest.raises(InvalidInputError, match="B, V"):
        sample(torch.zeros(5), SamplingParams())
