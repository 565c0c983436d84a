"""The fused greedy step (one Triton launch: argmax, draw counter, penalty history) equals
`RowSampling.sample` + `observe`, the torch reference, in every piece of state it touches. GPU, or
Triton's interpreter on CPU (TRITON_INTERPRET=1); CI has neither, so these skip there."""

import pytest
import torch

from streaming import kernels
from streaming.kernels import greedy_step
from streaming.row_sampling import RowSampling, SamplingFeatures
from streaming.sampling import SamplingParams
from tests.triton_device import DEVICE, ON_GPU, needs_triton

pytestmark = needs_triton(greedy_step)
GREEDY = SamplingFeatures(penalty=False, sampling=False, top_k=0, top_p=False)


def twin_samplers(rows, vocab, history, *, counts, pipelined, seed=0):
    """Two RowSamplings in the same state: histories of several lengths (empty, partial, wrapped)."""
    gen = torch.Generator().manual_seed(seed)
    samplers = []
    for _ in range(2):
        s = RowSampling(rows, vocab, device=DEVICE, history=history)
        s.pipelined = pipelined
        if counts:  # another row has a penalty: the counts exist and every observe keeps them
            s.configure(rows - 1, SamplingParams(repetition_penalty=1.3))
        samplers.append(s)
    for row in range(rows - 1):
        past = torch.randint(0, vocab, (1, row * 3), generator=gen)  # 0, 3, 6, ... ids: some wrap
        for s in samplers:
            s.observe(torch.tensor([row], device=DEVICE), past.to(DEVICE))
    return samplers


def assert_same_state(a: RowSampling, b: RowSampling, k: int):
    assert torch.equal(a.counters, b.counters)
    assert torch.equal(a.ring, b.ring)
    assert torch.equal(a.head, b.head)
    assert (a.counts is None) == (b.counts is None)
    if a.counts is not None:
        assert torch.equal(a.counts, b.counts)
    assert torch.equal(a._overwritten[:k], b._overwritten[:k])


@pytest.mark.parametrize("counts", [False, True])
@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("by_row", [False, True])
@pytest.mark.parametrize("block", [64, greedy_step.MAX_BLOCK])  # several blocks per row, or one
def test_fused_greedy_equals_sample_and_observe(monkeypatch, counts, pipelined, by_row, block):
    monkeypatch.setattr(greedy_step, "MAX_BLOCK", block)
    rows, vocab, history = 7, 300, 5
    reference, fused = twin_samplers(rows, vocab, history, counts=counts, pipelined=pipelined)
    gen = torch.Generator().manual_seed(1)
    batch = torch.tensor([4, 0, 2, 5, 1], device=DEVICE)  # any order; row 6 (the penalised one) not in it
    for step in range(7):  # the ring wraps; the new id sometimes equals the one it overwrites
        logits = torch.randn(rows, vocab, generator=gen)
        logits[0, 10] = logits[0, 250] = 9.0  # a tie across blocks: the first index wins
        logits[1, 70] = logits[1, 71] = 9.0  # a tie within a block
        logits[2] = float("-inf")  # nothing but -inf: index 0, as torch.argmax
        if step % 2:  # row 4 picks the id its next ring slot holds (the counts must not move)
            slot = int(reference.head[4])
            held = int(reference.ring[4, slot])
            if held >= 0:
                logits[4, held] = 50.0
        logits = logits.to(DEVICE)
        want = reference.sample(batch, logits.index_select(0, batch), features=GREEDY)
        reference.observe(batch, want[:, None])
        got = fused.greedy_step(batch, logits if by_row else logits.index_select(0, batch), by_row=by_row)
        assert torch.equal(got, want)
        assert_same_state(reference, fused, len(batch))
    assert want.tolist()[1] == 10 and want.tolist()[4] == 70 and want.tolist()[2] == 0


def test_bad_shapes_are_refused():
    s = RowSampling(3, 50, device=DEVICE, history=4)
    with pytest.raises(Exception, match="logits"):
        s.greedy_step(torch.tensor([0, 1], device=DEVICE), torch.zeros(3, 50, device=DEVICE))
    with pytest.raises(Exception, match="logits"):
        s.greedy_step(torch.tensor([0], device=DEVICE), torch.zeros(3, 49, device=DEVICE), by_row=True)


@pytest.mark.parametrize("graphs", [False, True] if ON_GPU else [False])
@pytest.mark.parametrize("kind", ["plain", "lckv"])
def test_engine_greedy_tokens_equal_with_and_without_the_fused_step(tmp_path, monkeypatch, kind, graphs):
    """Whole greedy generations of three streams with the fused step and without: identical tokens and
    state. A fourth stream with a repetition penalty sends the steps it shares to the torch path (its
    batch is not pure greedy) and ends early; the steps after it are fused (counted when eager; with
    CUDA graphs the kernel is launched by Python only while a graph is captured)."""
    import streaming
    from tests.engine_runs import counted, generate_all
    from tests.tiny_checkpoint import make_tiny_checkpoint

    rt = streaming.load(make_tiny_checkpoint(tmp_path / kind, kind, with_tokenizer=False), device=DEVICE,
                        dtype="float32")
    rt.cuda_graphs = graphs
    launches = counted(monkeypatch, greedy_step, "greedy_step")
    results = []
    for fused in (False, True):
        kernels.use_fused_greedy(fused)
        try:
            params = [SamplingParams()] * 3 + [SamplingParams(repetition_penalty=1.5)]
            engine, jobs = generate_all(rt, [40, 40, 40, 10], params)
            results.append(([job.generated for job in jobs], engine.sampling))
        finally:
            kernels.use_fused_greedy(None)
    (plain_tokens, plain_state), (fused_tokens, fused_state) = results
    assert plain_tokens == fused_tokens and [len(t) for t in fused_tokens] == [40, 40, 40, 10]
    # the fused run's steps after the penalised stream ended (none before); a graph launches it once
    assert len(launches) >= (1 if graphs else 25)
    assert torch.equal(plain_state.ring, fused_state.ring) and torch.equal(plain_state.head, fused_state.head)
    assert torch.equal(plain_state.counters, fused_state.counters)
    assert torch.equal(plain_state.counts, fused_state.counts)
