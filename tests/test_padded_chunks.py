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
@pytest.mark.parametrize("history, n", [(0, 1), (0, 4), (0, 11), (7, 3), (7, 16), (24, 9), (35, 16), (60, 16)])
def test_padded_chunk_equals_unpadded(runtime, history, n):
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
        held = min(history + n, SINKS + WINDOW)
        for layer in runtime.config.kv_layers:
            for buffers in (engine.cache.keys, engine.cache.values):
                torch.testing.assert_close(buffers[layer][1, :, :held], buffers[layer][0, :, :held],
                                           rtol=1e-4, atol=1e-4)
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


def test_engine_pads_only_where_nothing_is_evicted(runtime):
    """Which short chunks may be padded is decided from the host's lengths: never past the window."""

    class FakeGraphs:  # the lengths a CUDA engine would have captured
        padded_lengths = [16]

        def padded_length(self, n):
            return 16 if n <= 16 else None

    engine = Engine(runtime, 2, sinks=SINKS, window=WINDOW, chunk=32)
    engine.graphs = FakeGraphs()
    engine.seen[0], engine.seen[1] = SINKS + WINDOW - 16, SINKS + WINDOW - 15
    assert engine._padded_length([0], 5, False) == 16
    assert engine._padded_length([0, 1], 5, False) is None  # row 1's padding would wrap the window
    assert engine._padded_length([0], 5, True) is None  # every position's logits: not padded
    assert engine._padded_length([0], 20, False) is None  # no captured length holds 20
    assert engine._padded_length([0, 1], 16, False) == 16  # exactly a captured length: no padding, may evict


def test_a_short_rest_on_a_wrapped_row_is_cut_to_captured_lengths(runtime):
    """A prompt's rest that cannot be padded (the window has wrapped) is taken in captured lengths:
    of 20 tokens, 16 now (the last 4 eagerly, later); on a row with room the 20 go padded to 32; a
    whole chunk is never cut."""
    from streaming.engine import Job

    class FakeGraphs:
        padded_lengths = [16, 32]

        def padded_length(self, n):
            return next((length for length in self.padded_lengths if length >= n), None)

    engine = Engine(runtime, 2, sinks=SINKS, window=WINDOW, chunk=32)
    engine.graphs = FakeGraphs()
    engine.seen[0], engine.seen[1] = 100, 3  # row 0 has wrapped (capacity 42), row 1 has room
    assert engine._piece(Job(0, list(range(20)), None, None)) == 16
    assert engine._piece(Job(0, list(range(4)), None, None)) == 4
    assert engine._piece(Job(0, list(range(40)), None, None)) == 32  # a whole chunk
    assert engine._piece(Job(1, list(range(20)), None, None)) == 20  # padded to 32: fits
