"""cache/state.py: a saved and restored cache continues the stream exactly as if never interrupted.

Round trips (host memory and disk) for the sink-window ring after many wraps and for the full cache
past its growth; restoring writes in place (same buffers); a state refuses a cache of another layout
or a damaged file with CacheStateError naming the field; the Session save/restore_session pair too.
"""

from __future__ import annotations

import pytest
import torch

import streaming
from cache import state
from cache.errors import CacheStateError
from streaming.forward import forward_tokens
from tests.runtime_helpers import build, full_cache, sink_cache
from tests.tiny_checkpoint import lckv_config, plain_config, random_weights, write_checkpoint


def _ids(n, seed):
    return torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def _feed(model, cache, ids, chunk):
    return torch.cat([forward_tokens(model, cache, ids[:, a : a + chunk], all_logits=True)
                      for a in range(0, ids.shape[1], chunk)], dim=1)


@pytest.fixture(scope="module")
def lckv(tmp_path_factory):
    return build(tmp_path_factory.mktemp("lckv"), lckv_config(6))[0]


@pytest.mark.parametrize("via", ["memory", "disk", "bytes", "packed file"])
@pytest.mark.parametrize("kind", ["sink", "full"])
def test_round_trip_continues_exactly(lckv, tmp_path, via, kind):
    model = lckv
    make = (lambda: sink_cache(model, 3, 10)) if kind == "sink" else (lambda: full_cache(model, initial_slots=4))
    first, rest = _ids(57, 1), _ids(23, 2)
    original = make()
    _feed(model, original, first, 1)  # many ring wraps (sink) / several growths (full)
    tensors, meta = state.capture(original, 0)
    if via == "disk":
        state.save(tmp_path / "s.safetensors", tensors, meta, {"note": "x"})
        tensors, meta, extra = state.load(tmp_path / "s.safetensors")
        assert extra == {"note": "x"}
    elif via == "bytes":
        tensors, meta, extra = state.from_bytes(state.to_bytes(tensors, meta, {"note": "x"}))
        assert extra == {"note": "x"}
    elif via == "packed file":  # the bytes written as a file with its extra updated, read by safetensors
        blob = state.to_bytes(tensors, meta, {"note": "x", "server": "old"})
        state.save_packed(tmp_path / "s.safetensors", blob, {"server": {"messages": ["é" * 13]}})
        tensors, meta, extra = state.load(tmp_path / "s.safetensors")
        assert extra == {"note": "x", "server": {"messages": ["é" * 13]}}
    restored = make()
    ptrs = {layer: restored.keys[layer].data_ptr() for layer in restored.kv_layers}
    state.restore(restored, tensors, meta, 0)
    if kind == "sink":
        assert {layer: restored.keys[layer].data_ptr() for layer in restored.kv_layers} == ptrs
    assert int(restored.lengths[0]) == 57

    expected = _feed(model, original, rest, 1)
    got = _feed(model, restored, rest, 1)
    assert torch.equal(got, expected)
    # And a restored stream is not a fresh one: the history matters.
    fresh = _feed(model, make(), rest, 1)
    assert (fresh - expected).abs().max() > 1e-2


def test_capture_is_a_copy(lckv):
    cache = sink_cache(lckv, 2, 6)
    _feed(lckv, cache, _ids(9, 3), 1)
    tensors, _ = state.capture(cache, 0)
    before = {k: v.clone() for k, v in tensors.items()}
    _feed(lckv, cache, _ids(9, 4), 1)
    for k, v in tensors.items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("other,field", [
    (dict(sinks=2, window=10), "sinks"),
    (dict(sinks=3, window=12), "window"),
    (dict(dtype=torch.bfloat16), "dtype"),
    (dict(kind="full"), "kind"),
])
def test_restore_into_another_layout_is_refused(lckv, other, field):
    cache = sink_cache(lckv, 3, 10)
    _feed(lckv, cache, _ids(20, 5), 1)
    tensors, meta = state.capture(cache, 0)
    c = lckv.config
    if other.get("kind") == "full":
        target = full_cache(lckv)
    else:
        from cache.sink_window import SinkWindowCache

        target = SinkWindowCache(c.kv_layers, 1, c.num_key_value_heads, c.head_dim, sinks=other.get("sinks", 3),
                                 window=other.get("window", 10), dtype=other.get("dtype", torch.float32), device="cpu")
    with pytest.raises(CacheStateError, match=field):
        state.restore(target, tensors, meta, 0)
    assert int(target.lengths[0]) == 0  # nothing half-restored


def test_restore_into_other_model_layers_is_refused(tmp_path, lckv):
    plain, _ = build(tmp_path, plain_config(2))
    cache = sink_cache(lckv, 3, 10)
    _feed(lckv, cache, _ids(5, 6), 1)
    tensors, meta = state.capture(cache, 0)
    with pytest.raises(CacheStateError, match="kv_layers"):
        state.restore(sink_cache(plain, 3, 10), tensors, meta, 0)


def test_damaged_state_tensors(lckv):
    cache = sink_cache(lckv, 3, 10)
    _feed(lckv, cache, _ids(20, 7), 1)
    tensors, meta = state.capture(cache, 0)
    layer = lckv.config.kv_layers[-1]
    bad = dict(tensors)
    bad[f"v.{layer}"] = bad[f"v.{layer}"][:, :5]
    with pytest.raises(CacheStateError, match=f"v.{layer}"):
        state.restore(sink_cache(lckv, 3, 10), bad, meta, 0)
    bad = dict(tensors)
    del bad[f"k.{layer}"]
    with pytest.raises(CacheStateError, match=f"k.{layer}"):
        state.restore(sink_cache(lckv, 3, 10), bad, meta, 0)


def test_bad_bytes_are_refused():
    from safetensors.torch import save

    good = state.to_bytes({"length": torch.tensor([3])}, {"format": state.FORMAT}, {})
    assert state.from_bytes(good)[1] == {"format": state.FORMAT}
    for bad, why in [(b"", "too short"), (good[:7], "too short"), ((1 << 40).to_bytes(8, "little") + good[8:], "past its end"),
                     (good[:8] + b"[" + good[9:], "not JSON"), (good[:-4], "not a sinkstream"),
                     (save({"x": torch.zeros(2)}), "not a sinkstream"),
                     (state.to_bytes({"x": torch.zeros(2)}, {"format": state.FORMAT}, {}), "not a sinkstream")]:
        with pytest.raises(CacheStateError, match=why):
            state.from_bytes(bad)


def test_bad_files(tmp_path):
    with pytest.raises(CacheStateError, match="no such"):
        state.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 20)
    with pytest.raises(CacheStateError):
        state.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CacheStateError, match="not a sinkstream cache state"):
        state.load(tmp_path / "other.safetensors")


def test_session_save_and_restore(tmp_path):
    config = lckv_config(4, m=1, b=1)
    path = write_checkpoint(tmp_path / "m", config, random_weights(config))
    rt = streaming.load(path, device="cpu", dtype="float32")
    s = rt.session(sinks=2, window=12, chunk=5)
    ids = _ids(61, 8)[0].tolist()
    s.feed(ids)
    s.save(tmp_path / "session.safetensors")
    restored = rt.restore_session(tmp_path / "session.safetensors")
    assert restored.stats() == s.stats()
    more = _ids(17, 9)[0].tolist()
    assert torch.equal(restored.feed(more, return_logits=True), s.feed(more, return_logits=True))

    other = write_checkpoint(tmp_path / "other", config, random_weights(config, seed=1))
    with pytest.raises(CacheStateError):
        streaming.load(other, device="cpu", dtype="float32").restore_session(tmp_path / "session.safetensors")


def test_a_bad_state_never_half_loads(lckv):
    """Every check runs before the first write: a state missing its last layer's values leaves a live
    row exactly as it was (it used to overwrite the earlier layers first)."""
    source, live = sink_cache(lckv, 3, 10), sink_cache(lckv, 3, 10)
    _feed(lckv, source, _ids(20, 11), 1)
    _feed(lckv, live, _ids(14, 12), 1)
    values_before = {layer: live.values[layer].clone() for layer in live.kv_layers}
    keys_before = {layer: live.keys[layer].clone() for layer in live.kv_layers}
    tensors, meta = state.capture(source, 0)
    del tensors[f"v.{lckv.config.kv_layers[-1]}"]
    with pytest.raises(CacheStateError, match="v."):
        state.restore(live, tensors, meta, 0)
    assert int(live.lengths[0]) == 14
    for layer in live.kv_layers:
        assert torch.equal(live.keys[layer], keys_before[layer])
        assert torch.equal(live.values[layer], values_before[layer])


def test_session_fingerprint_follows_the_weights_not_the_path(tmp_path):
    """The same weights in another folder restore a saved session; other weights in the same folder
    are refused; a session whose saved state is broken keeps its own state."""
    import shutil

    config = lckv_config(4, m=1, b=1)
    first = write_checkpoint(tmp_path / "a", config, random_weights(config))
    rt = streaming.load(first, device="cpu", dtype="float32")
    s = rt.session(sinks=2, window=12, chunk=5)
    s.feed(_ids(30, 13)[0].tolist())
    s.save(tmp_path / "s.safetensors")
    moved = tmp_path / "elsewhere"
    shutil.copytree(first, moved)  # a reinstall into another folder
    again = streaming.load(moved, device="cpu", dtype="float32").restore_session(tmp_path / "s.safetensors")
    assert again.stats() == s.stats()
    write_checkpoint(first, config, random_weights(config, seed=5))  # other weights, same folder
    with pytest.raises(CacheStateError, match="different model"):
        streaming.load(first, device="cpu", dtype="float32").restore_session(tmp_path / "s.safetensors")

    tensors, meta, extra = state.load(tmp_path / "s.safetensors")
    victim = rt.session(sinks=2, window=12, chunk=5)
    victim.feed(_ids(9, 14)[0].tolist())
    logits, stats = victim.next_logits.clone(), victim.stats()
    del tensors["recent_ids"]
    with pytest.raises(CacheStateError, match="recent_ids"):
        victim.restore(tensors, meta, extra)
    assert victim.stats() == stats and torch.equal(victim.next_logits, logits)
