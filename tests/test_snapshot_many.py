"""snapshot_many (a server saving many sessions at once) equals each session's own snapshot()."""

import pytest
import torch

import streaming
from cache import state as cache_state
from streaming.errors import SessionBusyError
from streaming.session import snapshot_many
from tests.tiny_checkpoint import make_tiny_checkpoint


def _read_directly(session):
    """A session's state read straight from its engine's buffers, one tensor at a time (the reference)."""
    engine, row = session.engine, session.row
    cache = engine.cache
    length = int(cache.lengths[row])
    used = min(length, cache.slots)
    tensors = {"length": torch.tensor([length])}
    for layer in cache.kv_layers:
        tensors[f"k.{layer}"] = cache.keys[layer][row, :, :used].clone()
        tensors[f"v.{layer}"] = cache.values[layer][row, :, :used].clone()
    if engine.seen[row]:
        tensors["next_logits"] = engine.next_logits[row].float().clone()
    ring, head = engine.sampling.ring[row].tolist(), int(engine.sampling.head[row])
    tensors["recent_ids"] = torch.tensor([i for i in ring[head:] + ring[:head] if i >= 0], dtype=torch.long)
    extra = {**session._chat.as_extra(), "chunk": session.chunk, "sequential": session.sequential,
             "model": session.runtime.fingerprint}
    return tensors, cache_state.layout(cache), extra


def _same(a, b):
    (ta, ma, ea), (tb, mb, eb) = a, b
    assert ma == mb and ea == eb
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("group_bytes", [cache_state.CAPTURE_GROUP_BYTES, 1])
def test_snapshot_many_equals_each_snapshot(tmp_path, monkeypatch, group_bytes):
    monkeypatch.setattr(cache_state, "CAPTURE_GROUP_BYTES", group_bytes)  # 1: every row a group of its own
    rt = streaming.load(make_tiny_checkpoint(tmp_path / "m", "lckv", with_tokenizer=False), device="cpu")
    pool = rt.pool(6, sinks=2, window=30, chunk=8)
    sessions = [pool.session(seed=i) for i in range(6)]
    gen = torch.Generator().manual_seed(0)
    for session, n in zip(sessions, [0, 5, 17, 40, 90, 3]):  # fresh, short, wrapped windows (capacity 32)
        if n:
            session.feed(torch.randint(3, rt.config.vocab_size, (n,), generator=gen).tolist())
    list(sessions[2].generate(max_new_tokens=4, temperature=0.9, repetition_penalty=1.3))  # penalty history
    busy = sessions[5].generate(max_new_tokens=50)
    next(busy)  # an open iterator: that session is busy
    pool.release(sessions[1])
    results = snapshot_many(sessions)
    assert isinstance(results[5], SessionBusyError)
    assert isinstance(results[1], Exception) and "released" in str(results[1])
    busy.close()
    for i in (0, 2, 3, 4):
        _same(results[i], _read_directly(sessions[i]))
        _same(results[i], sessions[i].snapshot())
    assert "next_logits" not in results[0][0] and results[4][0]["k.0"].shape[1] == 32  # the ring's capacity
    # And it restores: a new session from the batch's state answers as the original.
    twin = pool.session(seed=3)
    twin.restore(*results[3])
    ids = [[t for r in s.generate(max_new_tokens=6, temperature=0.0) for t in r.token_ids] for s in (sessions[3], twin)]
    assert ids[0] == ids[1]
