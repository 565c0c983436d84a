"""RowSampling: per-row sampling of many rows in one go, against the single-row reference functions."""

import math
import random
from collections import deque

import pytest
import torch

import streaming.row_sampling as row_sampling
from streaming import counter_noise
from streaming.counter_noise import hash_uniforms, seed_words, vocab_codes
from streaming.errors import InvalidInputError
from streaming.row_sampling import RowSampling, SamplingFeatures
from streaming.sampling import SamplingParams, apply_repetition_penalty, top_k_filter, top_p_filter

M32 = 0xFFFFFFFF

# one row of each kind, in one batch
MIXED = [
    SamplingParams(),  # greedy
    SamplingParams(temperature=0.8, seed=11),
    SamplingParams(temperature=1.2, top_k=10, seed=12),
    SamplingParams(temperature=0.9, top_p=0.7, seed=13),
    SamplingParams(repetition_penalty=1.5),  # greedy with penalty
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3, seed=15),
]


def step_logits(row: int, step: int, vocab: int) -> torch.Tensor:
    """Fixed logits [V] of (row, step), so runs in different batches see the same inputs."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * row + step)) * 3


def reference_filtered(logits: torch.Tensor, params: SamplingParams, seen: list[int]) -> torch.Tensor:
    """streaming.sampling's pipeline for one row [V]: penalty, then (sampling rows) /T, top-k, top-p."""
    x = apply_repetition_penalty(logits[None].float(), torch.tensor([seen], dtype=torch.long).reshape(1, -1),
                                 params.repetition_penalty)
    if params.temperature == 0:
        return x[0]
    return top_p_filter(top_k_filter(x / params.temperature, params.top_k), params.top_p)[0]


def make(params_list, *, vocab=200, history=16) -> RowSampling:
    rs = RowSampling(len(params_list), vocab, device="cpu", history=history)
    for row, params in enumerate(params_list):
        rs.configure(row, params)
    return rs


# -- the hash ---------------------------------------------------------------------------------------


def py_fmix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def py_uniform(seed: int, counter: int, v: int) -> float:
    """The documented hash in plain Python integers."""
    s = seed % (1 << 64)
    key_a, key_b = 0x243F6A88, 0xB7E15162
    for word in (s & M32, s >> 32, counter & M32, (counter >> 32) & M32):
        key_a = py_fmix(((key_a ^ word) + 0x9E3779B9) & M32)
        key_b = py_fmix(((key_b ^ word) + 0x9E3779B9) & M32)
    bits = py_fmix(((py_fmix((v * 0x9E3779B1) & M32) ^ key_a) + key_b) & M32)
    return ((bits >> 8) | 1) / 2**24


def test_hash_equals_plain_integer_arithmetic():
    seeds = [0, 1, 42, -7, 2**63 + 5, 2**70 + 3]
    counters = [0, 1, 9, 2**32 + 1]
    vocab = 70_000  # indices above 2^16 too
    rs = RowSampling(len(seeds), vocab, device="cpu", history=4)
    for row, seed in enumerate(seeds):
        rs.reseed(row, seed)
    picks = [0, 1, 2, 12_345, 65_537, vocab - 1]
    for counter in counters:
        rs.counters.fill_(counter)
        u = rs.uniforms(torch.arange(len(seeds)))
        for row, seed in enumerate(seeds):
            got = u[row, picks].tolist()
            assert got == [py_uniform(seed, counter, v) for v in picks], (seed, counter)


def test_uniforms_look_uniform():
    rs = RowSampling(64, 4096, device="cpu", history=4)  # fresh random seeds
    rows = torch.arange(64)
    draws = []
    for _ in range(4):
        draws.append(rs.uniforms(rows))
        rs.counters += 1
    u = torch.stack(draws).double()  # [4, 64, V]: ~1M values
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.002 and abs(u.var() - 1 / 12) < 0.002
    assert abs((-u.log()).mean() - 1) < 0.005  # E = -log u ~ Exp(1)
    bits = (u * 2**24).long() >> 1  # the 23 random bits
    for b in range(23):
        assert abs(((bits >> b) & 1).double().mean() - 0.5) < 0.005, b
    centred = u - 0.5
    for a, b in ((centred[1:], centred[:-1]), (centred[..., 1:], centred[..., :-1]),
                 (centred[:, 1:], centred[:, :-1])):  # next counter, next token, next row
        assert abs((a * b).mean() / (1 / 12)) < 0.01


def chi_square(draws: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * draws.numel()
    observed = torch.bincount(draws, minlength=probs.numel()).double()
    return float(((observed - expected) ** 2 / expected).sum())


# 5 degrees of freedom: P(chi2 > 40) ~ 1e-7, yet a broken hash lands in the thousands
CHI2_BOUND = 40.0
TARGET = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])


def draws_many_rows(rows=4000) -> torch.Tensor:
    """One draw per row, rows with different (fresh random) seeds, in one batched call."""
    rs = RowSampling(rows, 6, device="cpu", history=4)
    rs.temperature.fill_(1.0)
    return rs.sample(torch.arange(rows), TARGET.log().expand(rows, -1))


def draws_one_row(steps=4000) -> torch.Tensor:
    """One seed's draws at counters 0 .. steps-1, computed as one batch (rows are independent)."""
    rs = RowSampling(steps, 6, device="cpu", history=4)
    rs.temperature.fill_(1.0)
    rs.reseed(0, 5)
    rs.seeds.copy_(rs.seeds[:1].expand(steps, 2))
    rs.counters.copy_(torch.arange(steps))
    return rs.sample(torch.arange(steps), TARGET.log().expand(steps, -1))


def test_sampled_frequencies_match_softmax():
    assert chi_square(draws_many_rows(), TARGET) < CHI2_BOUND
    assert chi_square(draws_one_row(), TARGET) < CHI2_BOUND


def test_frequency_check_catches_a_broken_hash(monkeypatch):
    honest = row_sampling.hash_uniforms
    monkeypatch.setattr(row_sampling, "hash_uniforms", lambda s, c, codes: torch.full((len(c), len(codes)), 0.5))
    assert chi_square(draws_many_rows(), TARGET) > CHI2_BOUND  # constant noise: always the argmax
    monkeypatch.setattr(row_sampling, "hash_uniforms", lambda s, c, codes: honest(s, torch.zeros_like(c), codes))
    assert chi_square(draws_one_row(), TARGET) > CHI2_BOUND  # counter ignored: one token forever


# -- filters and the draw against the reference -------------------------------------------------------


def test_mixed_batch_filters_equal_reference_per_row():
    vocab, history = 200, 16
    rs = make(MIXED, vocab=vocab, history=history)
    rows = torch.arange(len(MIXED))
    seen = torch.randint(0, vocab, (len(MIXED), 40), generator=torch.Generator().manual_seed(0))
    rs.observe(rows, seen)
    logits = torch.stack([step_logits(r, 0, vocab) for r in range(len(MIXED))])
    for features in (None, rs.features(list(range(len(MIXED))))):
        penalized, filtered = rs.filter_logits(rows, logits, features=features)
        for row, params in enumerate(MIXED):
            ref = reference_filtered(logits[row], params, seen[row, -history:].tolist())
            got = penalized[row] if params.temperature == 0 else filtered[row]
            assert torch.equal(got, ref), (row, params)
    # the filters really act: top-k keeps 10, top-p drops some, the penalty changes seen logits
    assert int((filtered[2] > -math.inf).sum()) == 10
    assert 1 <= int((filtered[3] > -math.inf).sum()) < vocab
    assert not torch.equal(penalized[4], logits[4])
    ids = rs.sample(rows, logits)
    assert ids[0] == logits[0].argmax() and ids[4] == penalized[4].argmax()


@pytest.mark.parametrize("subset", [[1, 2], [2], [1], [0, 4], [3, 5, 2]])
def test_features_of_a_subset_give_the_same_results(subset):
    # a batch's own features skip parts (top-k by torch.topk, no sort, no hash) with equal results
    seen = torch.randint(0, 200, (len(MIXED), 30), generator=torch.Generator().manual_seed(2))
    fast, full = make(MIXED), make(MIXED)
    for rs in (fast, full):
        rs.observe(torch.arange(len(MIXED)), seen)
    rows = torch.tensor(subset)
    features = fast.features(subset)
    for step in range(4):
        logits = torch.stack([step_logits(r, step, 200) for r in subset])
        a = fast.filter_logits(rows, logits, features=features)
        b = full.filter_logits(rows, logits)
        for i, row in enumerate(subset):
            which = 0 if MIXED[row].temperature == 0 else 1
            assert torch.equal(a[which][i], b[which][i])
        assert torch.equal(fast.sample(rows, logits, features=features), full.sample(rows, logits))


def test_features_flags():
    rs = make(MIXED, vocab=200)
    assert rs.features([0]) == SamplingFeatures(penalty=False, sampling=False, top_k=0, top_p=False)
    assert rs.features([0, 4]) == SamplingFeatures(penalty=True, sampling=False, top_k=0, top_p=False)
    assert rs.features([1, 2]) == SamplingFeatures(penalty=False, sampling=True, top_k=16, top_p=False)
    assert rs.features([3]) == SamplingFeatures(penalty=False, sampling=True, top_k=0, top_p=True)
    assert rs.features([2, 3]) == SamplingFeatures(penalty=False, sampling=True, top_k=200, top_p=True)
    rs.configure(0, SamplingParams(top_k=5, top_p=0.5))  # greedy: its filters need nothing
    assert rs.features([0]).sampling is False and rs.features([0]).top_k == 0


def test_draw_equals_reference_exponential_race():
    vocab, history = 200, 16
    rs = make(MIXED, vocab=vocab, history=history)
    rows = torch.arange(len(MIXED))
    recent = [deque(maxlen=history) for _ in MIXED]
    for step in range(12):
        logits = torch.stack([step_logits(r, step, vocab) for r in range(len(MIXED))])
        u = rs.uniforms(rows)
        ids = rs.sample(rows, logits)
        for row, params in enumerate(MIXED):
            ref = reference_filtered(logits[row], params, list(recent[row]))
            if params.temperature == 0:
                expected = int(ref.argmax())
            else:
                expected = int(torch.argmax(torch.softmax(ref, -1) / -torch.log(u[row])))
            assert int(ids[row]) == expected, (step, row)
        rs.observe(rows, ids[:, None])
        for row in range(len(MIXED)):
            recent[row].append(int(ids[row]))
    assert rs.counters.tolist() == [12] * len(MIXED)


# -- batch independence and seeds ---------------------------------------------------------------------


def run_batches(batches: list[list[int]], steps: int, params=MIXED, vocab=200) -> dict[int, list[int]]:
    """Sample `steps` tokens for every row, each step as the given batches; tokens per row."""
    rs = make(params, vocab=vocab)
    out = {r: [] for batch in batches for r in batch}
    for step in range(steps):
        for batch in batches:
            rows = torch.tensor(batch)
            logits = torch.stack([step_logits(r, step, vocab) for r in batch])
            ids = rs.sample(rows, logits, features=rs.features(batch))
            rs.observe(rows, ids[:, None])
            for r, t in zip(batch, ids.tolist()):
                out[r].append(t)
    return out


def test_batch_independence():
    rows = list(range(len(MIXED)))
    together = run_batches([rows], 25)
    alone = run_batches([[r] for r in rows], 25)
    shuffled = run_batches([[5, 2, 0], [3, 1, 4]], 25)
    assert together == alone == shuffled
    assert len(set(together[1])) > 3  # the sampling rows really vary


def test_seeds():
    p = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.0, seed=7),
         SamplingParams(temperature=1.0, seed=8), SamplingParams(temperature=1.0)]
    logits = torch.zeros(1, 1000)  # uniform: a sequence of 20 draws identifies the noise
    rs = make(p, vocab=1000)

    def seq(row, n=20):
        return [int(rs.sample(torch.tensor([row]), logits)) for _ in range(n)]

    s0, s1, s2, s3 = seq(0), seq(1), seq(2), seq(3)
    assert s0 == s1 and s0 != s2 and s0 != s3
    rs.configure(0, p[0])  # counter back to 0
    assert seq(0) == s0
    rs.reseed(0, 7)
    assert seq(0, 5) == s0[:5]
    assert seq(0, 5) == s0[5:10]  # the counter advances per draw
    other = make([SamplingParams(temperature=1.0)], vocab=1000)
    assert [int(other.sample(torch.tensor([0]), logits)) for _ in range(20)] != s3  # None: a fresh seed each


def test_cleared_row_equals_a_fresh_row():
    vocab, history = 50, 8
    params = SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.4, seed=3)
    used = make([MIXED[5], params], vocab=vocab, history=history)
    used.observe(torch.tensor([0, 1]), torch.randint(0, vocab, (2, 13)))
    for _ in range(4):
        used.sample(torch.tensor([1, 0]), torch.randn(2, vocab))
    used.clear(1)
    assert used.features([1]) == SamplingFeatures(False, False, 0, False)
    assert int(used.counts[1].sum()) == 0 and (used.ring[1] == -1).all()
    used.configure(1, params)
    fresh = make([MIXED[5], params], vocab=vocab, history=history)
    for step in range(10):
        logits = torch.stack([step_logits(1, step, vocab)])
        a = used.sample(torch.tensor([1]), logits)
        b = fresh.sample(torch.tensor([1]), logits)
        assert torch.equal(a, b)
        for rs, ids in ((used, a), (fresh, b)):
            rs.observe(torch.tensor([1]), ids[:, None])
    assert torch.equal(used.counts[1], fresh.counts[1])


def test_configure_keeps_the_history():
    rs = make([SamplingParams(repetition_penalty=2.0)], vocab=10, history=8)
    rs.observe(torch.tensor([0]), torch.tensor([[3, 3, 5]]))
    rs.configure(0, SamplingParams(temperature=0.5, repetition_penalty=2.0))  # a new reply on the chat
    assert rs.counts[0].tolist() == [0, 0, 0, 2, 0, 1, 0, 0, 0, 0]


# -- running counts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocate_midway", [False, True])
def test_running_counts_equal_a_recount(allocate_midway):
    rows, vocab, history = 4, 7, 5  # a small vocabulary: many duplicates
    penalty = SamplingParams(repetition_penalty=1.7)
    rs = RowSampling(rows, vocab, device="cpu", history=history)
    if not allocate_midway:
        rs.configure(0, penalty)
    recent = [deque(maxlen=history) for _ in range(rows)]
    rng = random.Random(0)
    for call in range(300):
        if allocate_midway and call == 150:
            assert not rs.has_counts
            rs.configure(0, penalty)  # counts rebuilt from the ring
        batch = rng.sample(range(rows), rng.randint(1, rows))  # distinct rows, any order
        n = rng.choice([0, 1, 1, 2, 3, history, history + 1, 2 * history + 3])
        ids = torch.tensor([[rng.randrange(vocab) for _ in range(n)] for _ in batch], dtype=torch.long)
        rs.observe(torch.tensor(batch), ids.reshape(len(batch), n))
        for r, row_ids in zip(batch, ids.tolist()):
            recent[r].extend(row_ids)
        if rs.has_counts:
            recount = torch.tensor([[list(d).count(v) for v in range(vocab)] for d in recent])
            assert torch.equal(rs.counts.long(), recount), call
    assert rs.counts.dtype == torch.int16
    # the penalty from the counts equals apply_repetition_penalty over the deque's ids
    logits = torch.randn(rows, vocab)
    for r in range(rows):
        rs.configure(r, penalty)
    penalized, _ = rs.filter_logits(torch.arange(rows), logits)
    for r in range(rows):
        ref = apply_repetition_penalty(logits[r:r + 1], torch.tensor([list(recent[r])]), 1.7)[0]
        assert torch.equal(penalized[r], ref)


def test_counts_are_lazy():
    rs = RowSampling(3, 10, device="cpu", history=4)
    rs.configure(1, SamplingParams(temperature=1.0, top_k=3))
    assert not rs.has_counts
    rs.configure(2, SamplingParams(repetition_penalty=1.1))
    assert rs.has_counts and rs.counts.shape == (3, 10)
    assert RowSampling(1, 10, device="cpu", history=40_000)._count_dtype == torch.int32  # beyond int16


def test_bad_arguments():
    rs = RowSampling(2, 10, device="cpu", history=4)
    with pytest.raises(InvalidInputError, match="row"):
        rs.configure(2, SamplingParams())
    with pytest.raises(InvalidInputError, match="top_p"):
        rs.configure(0, SamplingParams(top_p=0.0))
    with pytest.raises(InvalidInputError, match="seed"):
        rs.reseed(0, 1.5)
    with pytest.raises(InvalidInputError, match="logits"):
        rs.sample(torch.tensor([0]), torch.zeros(1, 11))
    with pytest.raises(InvalidInputError, match="ids"):
        rs.observe(torch.tensor([0, 1]), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="history"):
        RowSampling(2, 10, device="cpu", history=0)


# -- GPU only ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available() or counter_noise.triton is None, reason="GPU only: needs CUDA and Triton")
def test_triton_uniforms_equal_the_torch_version():
    vocab = 32_003  # not a multiple of the kernel's block
    seeds = torch.tensor([seed_words(s) for s in (0, 1, -1, 2**64 - 1, 123_456_789, 2**40 + 17)], device="cuda")
    counters = torch.tensor([0, 1, 2**32 + 5, 2**62, 77, 4095], device="cuda")
    codes = vocab_codes(vocab, "cuda")
    fused = hash_uniforms(seeds, counters, codes, use_triton=True)
    plain = hash_uniforms(seeds, counters, codes, use_triton=False)
    assert fused.shape == (6, vocab) and torch.equal(fused, plain)
    assert hash_uniforms(seeds[:0], counters[:0], codes, use_triton=True).shape == (0, vocab)


# -- CUDA graph ---------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: needs a CUDA device")
def test_cuda_graph_replays_equal_eager_calls():
    vocab, history, device = 1000, 64, "cuda"

    def build():
        rs = RowSampling(len(MIXED) + 2, vocab, device=device, history=history)
        for row, params in enumerate(MIXED):
            rs.configure(row, params)
        rs.observe(torch.arange(len(MIXED), device=device),
                   torch.randint(0, vocab, (len(MIXED), 100), generator=torch.Generator().manual_seed(1)).to(device))
        return rs

    graphed, eager = build(), build()
    batch = [5, 0, 3, 1, 4, 2]
    rows = torch.tensor(batch, device=device)  # static buffers
    logits = torch.zeros(len(batch), vocab, device=device)
    # all features, the batch's own, and a cheaper set (covers rows 1, 2 only: others differ from
    # their settings, but graph and eager must still agree)
    for features in (None, graphed.features(batch), graphed.features([1, 2])):
        state = [t.clone() for t in (graphed.counters, graphed.ring, graphed.head, graphed.counts)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (lazy initialisation)
            for _ in range(2):
                graphed.observe(rows, graphed.sample(rows, logits, features=features)[:, None])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = graphed.sample(rows, logits, features=features)
            graphed.observe(rows, out[:, None])
        for t, saved in zip((graphed.counters, graphed.ring, graphed.head, graphed.counts), state):
            t.copy_(saved)
        for step in range(8):
            fresh = torch.stack([step_logits(r, step, vocab) for r in batch]).to(device)
            logits.copy_(fresh)
            graph.replay()
            expected = eager.sample(rows, fresh, features=features)
            eager.observe(rows, expected[:, None])
            assert torch.equal(out, expected), (features, step)
        assert torch.equal(graphed.counters, eager.counters)
        assert torch.equal(graphed.counts, eager.counts) and torch.equal(graphed.ring, eager.ring)
    # the counter-based uniforms and the running counts are the same numbers on CPU
    cpu = RowSampling(eager.num_rows, vocab, device="cpu", history=history)
    for name in ("seeds", "counters", "ring", "head", "penalty"):
        getattr(cpu, name).copy_(getattr(eager, name).cpu())
    cpu._allocate_counts()
    assert torch.equal(cpu.counts, eager.counts.cpu())
    assert torch.equal(cpu.uniforms(rows.cpu()), eager.uniforms(rows).cpu())


def test_configure_many_sets_exactly_those_rows():
    """A burst of replies is admitted with one batched write per setting: each named row holds its own
    settings and seed words, with its draw counter reset; the other rows keep theirs."""
    sampler = RowSampling(6, 50, device="cpu", history=8)
    sampler.configure(2, SamplingParams(temperature=0.3, top_k=4, seed=99))
    sampler.counters.fill_(7)
    before = (sampler.temperature[2].item(), sampler.top_k[2].item(), sampler.seeds[2].tolist())
    settings = [SamplingParams(temperature=0.9, top_k=20, seed=5), SamplingParams(),
                SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.3, seed=-3)]
    rows = [5, 0, 3]
    sampler.configure_many(rows, settings)
    for row, p in zip(rows, settings):
        assert sampler.temperature[row].item() == pytest.approx(p.temperature)
        assert sampler.top_k[row].item() == p.top_k
        assert sampler.top_p[row].item() == pytest.approx(p.top_p)
        assert sampler.penalty[row].item() == pytest.approx(p.repetition_penalty)
        assert sampler.counters[row].item() == 0
        if p.seed is not None:
            assert tuple(sampler.seeds[row].tolist()) == seed_words(p.seed)
    assert (sampler.temperature[2].item(), sampler.top_k[2].item(), sampler.seeds[2].tolist()) == before
    assert sampler.counters[2].item() == 7 and sampler.counters[1].item() == 7
    assert sampler.has_counts  # a penalised row allocates the running counts
    assert sampler.features([5, 0]) == sampler.features_for([settings[0], settings[1]])
    with pytest.raises(InvalidInputError, match="seed"):
        sampler.configure_many([1], [SamplingParams(seed=1.5)])
