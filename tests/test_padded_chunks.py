"""A short prompt chunk padded to a captured length equals the same chunk run as it is.

On CUDA the engine replays short chunks (a chat turn, a prompt's tail) from graphs of a few padded
lengths (`Engine.prefill_rows_padded`, `forward_step(real=...)`); this is that device work run
eagerly on CPU, against the unpadded path (`prefill_rows`: for LCKV chunks within the m+b passes
that is token by token, the exact reference). The padding is random ids, so a real token that saw
it would differ. tests/test_engine_cuda.py checks the replayed graphs against the eager engine.
"""

import pytest
import torch

import streaming
from streaming.engine import Engine
from tests.tiny_checkpoint import make_tiny_checkpoint

SINKS, WINDOW, PADDED = 2, 40, 16


@pytest.fixture(scope="module", params=["lckv", "plain", "lckv_two_targets"])
def runtime(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "lckv_two_targets":  # two targets read from below in one cyclic block
        path = make_tiny_checkpoint(directory, "lckv", with_tokenizer=False, layers=6,
                                    layer_types="0_3_4_3_4_5")
    else:
        path = make_tiny_checkpoint(directory, request.param, with_tokenizer=False)
    return streaming.load(path, device="cpu", dtype="float32")


def _ids(n, seed):
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(seed))


# (35, 16), (60, 16): a chunk of exactly the captured length on a row whose window wraps (no padding).
# (30, 5), (35, 9), (41, 3), (60, 1), (60, 12), (97, 7): the padding's slots hold tokens that must stay
# (the window is full, or the padding would wrap it): padded writes leave them as they were.
@pytest.mark.parametrize("history, n", [(0, 1), (0, 4), (0, 11), (7, 3), (7, 16), (24, 9), (35, 16), (60, 16),
                                        (30, 5), (35, 9), (41, 3), (60, 1), (60, 12), (97, 7)])
def test_padded_chunk_equals_unpadded(runtime, history, n):
    if runtime.config.is_condensed and 1 < n <= runtime.config.prefill_passes and history + n > SINKS + WINDOW:
        pytest.skip("an evicting LCKV chunk within the passes goes token by token (test below)")
    engine = Engine(runtime, 2, sinks=SINKS, window=WINDOW, chunk=32)
    reference, padded = torch.tensor([0]), torch.tensor([1])
    with torch.inference_mode():
        earlier = _ids(history, 1) if history else None
        for start in range(0, history, 20):  # both rows hold the same earlier tokens
            engine.prefill_rows(reference, earlier[:, start : start + 20], False)
            engine.prefill_rows(padded, earlier[:, start : start + 20], False)
        chunk = _ids(n, 2)
        engine.prefill_rows(reference, chunk, False)
        ids = torch.cat((chunk, _ids(PADDED - n, 3)), dim=1) if n < PADDED else chunk  # random padding
        logits = engine.prefill_rows_padded(padded, ids, torch.tensor([n]))
        engine.sampling.observe(padded, chunk)
        assert logits.shape == (1, 1, runtime.config.vocab_size)
        torch.testing.assert_close(logits[:, 0], engine.next_logits[1:2], rtol=0, atol=0)
        # (float32; the padded step's matmuls have other shapes than the reference's, so other rounding)
        torch.testing.assert_close(engine.next_logits[1], engine.next_logits[0], rtol=1e-4, atol=1e-4)
        assert engine.cache.lengths[:2].tolist() == [history + n] * 2
        held = min(history + n, SINKS + WINDOW)  # (a wrapped row: every slot, the padding's too)
        for layer in runtime.config.kv_layers:
            for buffers in (engine.cache.keys, engine.cache.values):
                torch.testing.assert_close(buffers[layer][1, :, :held], buffers[layer][0, :, :held],
                                           rtol=1e-4, atol=1e-4)
                if history + n >= SINKS + WINDOW:  # every slot holds a token the window keeps
                    assert not torch.equal(buffers[layer][0], torch.zeros_like(buffers[layer][0]))
        # Both rows go on together, greedy, past the slots the padding wrote: the same tokens.
        rows = torch.tensor([0, 1])
        features = engine.sampling.features([0, 1])
        for _ in range(PADDED + 4):
            tokens = engine.decode_rows(rows, features)
            assert tokens[0] == tokens[1]
        torch.testing.assert_close(engine.next_logits[1], engine.next_logits[0], rtol=1e-4, atol=1e-4)


def test_padded_step_refuses_every_position_logits(runtime):
    from streaming.forward import forward_step

    engine = Engine(runtime, 1, sinks=SINKS, window=WINDOW, chunk=32)
    with torch.inference_mode(), pytest.raises(ValueError, match="last real token"):
        forward_step(runtime.model, engine.cache, _ids(PADDED, 1), passes=runtime.config.prefill_passes,
                     all_logits=True, real=torch.tensor([3]))


def test_engine_pads_any_short_chunk_on_any_row(runtime):
    """Which short chunks are padded depends on their length only, not on the row's fill (the
    padding writes nothing, so a wrapped window loses no token to it)."""

    class FakeGraphs:  # the lengths a CUDA engine would have captured
        padded_lengths = [16]

        def padded_length(self, n):
            return 16 if n <= 16 else None

    engine = Engine(runtime, 2, sinks=SINKS, window=WINDOW, chunk=32)
    engine.graphs = FakeGraphs()
    assert engine._padded_length(5, False) == 16
    assert engine._padded_length(16, False) == 16
    assert engine._padded_length(5, True) is None  # every position's logits: not padded
    assert engine._padded_length(20, False) is None  # no captured length holds 20
    assert engine._padded_length(32, False) is None  # a whole chunk: its own graph


@pytest.mark.parametrize("history, n", [(0, 5), (30, 5), (35, 9), (41, 3), (60, 1), (60, 7), (60, 12), (97, 20)])
def test_engine_short_chunks_through_graph_routes_equal_the_eager_engine(runtime, history, n):
    """The engine's routing of a short chunk when graphs exist (padded replay; token by token for an
    evicting LCKV chunk within the passes), each graph's device work run eagerly here, against the
    engine without graphs: the same logits and cache."""
    from streaming.engine import Job
    from streaming.engine_graphs import StepGraphs

    replays = []

    class EagerGraphs:  # StepGraphs' routing, with each replay's device work run eagerly
        padded_lengths = [16, 32]
        padded_length = StepGraphs.padded_length
        prefill_tokens = StepGraphs.prefill_tokens

        def __init__(self, engine):
            self.engine = engine

        def prefill_padded(self, rows, ids, length):
            replays.append((ids.shape[1], length))
            padded = torch.cat((ids, _ids(length - ids.shape[1], 9).expand(ids.shape[0], -1)), dim=1)
            return self.engine.prefill_rows_padded(torch.tensor(rows), padded, torch.tensor([ids.shape[1]]))

    engines = [Engine(runtime, 1, sinks=SINKS, window=WINDOW, chunk=32) for _ in range(2)]
    engines[1].graphs = EagerGraphs(engines[1])
    prompt = _ids(history + n, 1)[0].tolist()
    for engine in engines:
        with torch.inference_mode():
            for start in range(0, history, 20):
                engine.prefill_rows(torch.tensor([0]), torch.tensor([prompt[start : min(start + 20, history)]]), False)
            engine.seen[0] = history
            engine._ingest_chunk([Job(0, prompt[history:], None, None)], n, False)
    lckv_token_by_token = runtime.config.is_condensed and 1 < n <= runtime.config.prefill_passes and history + n > SINKS + WINDOW
    assert replays == ([(1, 1)] * n if lckv_token_by_token else [(n, 16 if n <= 16 else 32)])
    reference, routed = engines
    torch.testing.assert_close(routed.next_logits, reference.next_logits, rtol=1e-4, atol=1e-4)
    assert routed.cache.lengths[0] == reference.cache.lengths[0] == history + n
    for layer in runtime.config.kv_layers:
        for buffers in ("keys", "values"):
            torch.testing.assert_close(getattr(routed.cache, buffers)[layer][0], getattr(reference.cache, buffers)[layer][0],
                                       rtol=1e-4, atol=1e-4)
