"""Steps on an arbitrary set of cache rows, in place: equal to the same rows stepped alone; the other
rows untouched; a reused row equal to a fresh one (every cyclic-block target restarts from zeros)."""

import pytest
import torch

from streaming.forward import forward_step, forward_tokens
from tests.runtime_helpers import build, sink_cache
from tests.tiny_checkpoint import lckv_config, plain_config

LAYOUTS = {
    "plain": plain_config(3),
    "lckv": lckv_config(6),
    # Two targets read from below inside one cyclic block (layers 1..4): 1 reads 3, 2 reads 4.
    "lckv-two-targets": lckv_config(6, layer_types="0_3_4_3_4_5"),
    "lckv-two-blocks": lckv_config(6, layer_types="0_2_2_0_5_5", force_nodiag=False),
}
SINKS, WINDOW = 2, 12


def _snapshot(cache):
    return ({k: t.clone() for k, t in cache.keys.items()}, {k: t.clone() for k, t in cache.values.items()},
            cache.lengths.clone())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_subset_of_rows_steps_in_place_like_rows_alone(tmp_path, name):
    model, _ = build(tmp_path, LAYOUTS[name])
    passes = model.config.prefill_passes
    gen = torch.Generator().manual_seed(1)
    shared = sink_cache(model, SINKS, WINDOW, batch=4)
    alone = {row: sink_cache(model, SINKS, WINDOW) for row in range(4)}
    with torch.inference_mode():
        # Different histories per row: row r has seen 3 + 5r tokens (rows 2, 3 have evicted).
        for row in range(4):
            ids = torch.randint(3, 500, (1, 3 + 5 * row), generator=gen)
            for piece in ids.split(6, dim=1):  # chunks of at most the window
                forward_tokens(model, alone[row], piece, passes=passes)
                forward_tokens(model, shared, piece, passes=passes, rows=torch.tensor([row]))
        for n in (1, 6, 1, 1):  # decode steps and a parallel chunk, rows out of order
            rows = [3, 0, 2]
            before = _snapshot(shared)
            ids = torch.randint(3, 500, (len(rows), n), generator=gen)
            got = forward_step(model, shared, ids, passes=passes, all_logits=True, rows=torch.tensor(rows))
            for i, row in enumerate(rows):
                want = forward_step(model, alone[row], ids[i : i + 1], passes=passes, all_logits=True)
                torch.testing.assert_close(got[i : i + 1], want, rtol=1e-4, atol=1e-4)  # batched GEMM rounding
            # Row 1 took no part: its keys, values and length did not move.
            for table, old in zip((shared.keys, shared.values), before[:2]):
                for layer in table:
                    assert torch.equal(table[layer][1], old[layer][1])
            assert shared.lengths[1] == before[2][1]
    for row in range(4):
        assert int(shared.lengths[row]) == int(alone[row].lengths[0])
        for layer in shared.keys:
            torch.testing.assert_close(shared.keys[layer][row], alone[row].keys[layer][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["lckv", "lckv-two-targets", "lckv-two-blocks"])
def test_reused_row_equals_fresh_row(tmp_path, name):
    """Engine defect 5: a row reset after use must give the logits of a never-used row, past the
    first m+b tokens (where the parallel prefill's first pass reads every target's new slots)."""
    model, _ = build(tmp_path, LAYOUTS[name])
    passes = model.config.prefill_passes
    gen = torch.Generator().manual_seed(2)
    used = sink_cache(model, SINKS, 30)
    with torch.inference_mode():
        forward_tokens(model, used, torch.randint(3, 500, (1, 25), generator=gen), passes=passes)
        used.reset(0)
        fresh = sink_cache(model, SINKS, 30)
        ids = torch.randint(3, 500, (1, 16), generator=gen)  # 16 > m+b: a parallel, iterated chunk
        want = forward_tokens(model, fresh, ids, passes=passes, all_logits=True)
        got = forward_tokens(model, used, ids, passes=passes, all_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
