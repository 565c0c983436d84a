"""Malformed checkpoints raise CheckpointError naming the tensor or file, and load nothing.

"Nothing loaded": every name and shape is checked before the first tensor is read, so a bad tensor
late in the file costs no weight reads (a spy on the safetensors handles counts them).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import streaming
import streaming.checkpoint as checkpoint
from streaming.errors import CheckpointError
from tests.tiny_checkpoint import lckv_config, plain_config, random_weights, write_checkpoint

CPU = torch.device("cpu")


def _load(path):
    return checkpoint.load_model(path, device=CPU, dtype=torch.float32)


@pytest.fixture
def reads(monkeypatch):
    """Count get_tensor calls on every safetensors handle the loader opens."""
    counter = {"n": 0}
    real_open = checkpoint.safe_open

    class Spy:
        def __init__(self, handle):
            self._handle = handle

        def get_tensor(self, name):
            counter["n"] += 1
            return self._handle.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self._handle, name)

    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: Spy(real_open(*a, **k)))
    return counter


def _write(tmp_path, config, mutate=None, **kwargs):
    weights = random_weights(config)
    if mutate:
        mutate(weights)
    return write_checkpoint(tmp_path, config, weights, **kwargs)


def test_good_checkpoint_loads(tmp_path, reads):
    config = lckv_config(6)
    model = _load(_write(tmp_path, config))
    assert reads["n"] == len(model.state_dict())


def test_wrong_shape(tmp_path, reads):
    name = "model.layers.5.mlp.down_proj.weight"  # sorted last among the layer tensors

    def mutate(w):
        w[name] = torch.zeros(64, 127)

    path = _write(tmp_path, plain_config(6), mutate)
    with pytest.raises(CheckpointError, match=name) as info:
        _load(path)
    assert "[64, 127]" in str(info.value) and "[64, 128]" in str(info.value)
    assert reads["n"] == 0


def test_missing_tensor(tmp_path, reads):
    name = "model.layers.1.self_attn.o_proj.weight"
    path = _write(tmp_path, plain_config(2), lambda w: w.pop(name))
    with pytest.raises(CheckpointError, match=name):
        _load(path)
    assert reads["n"] == 0


def test_missing_lm_head_when_untied(tmp_path):
    config = plain_config(2, tie_word_embeddings=False)
    path = _write(tmp_path, config, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        _load(path)


def test_k_proj_on_condensed_layer(tmp_path, reads):
    """Layer 2 of the LCKV model reads layer 4's KV: a k_proj there means the config is wrong."""
    name = "model.layers.2.self_attn.k_proj.weight"
    path = _write(tmp_path, lckv_config(6), lambda w: w.__setitem__(name, torch.zeros(32, 64)))
    with pytest.raises(CheckpointError, match=name) as info:
        _load(path)
    assert "layer 2" in str(info.value)
    assert reads["n"] == 0


def test_unknown_tensor(tmp_path):
    name = "model.layers.0.self_attn.q_norm.weight"
    path = _write(tmp_path, plain_config(2), lambda w: w.__setitem__(name, torch.ones(16)))
    with pytest.raises(CheckpointError, match=name):
        _load(path)


def test_rotary_inv_freq_is_ignored(tmp_path):
    """Old checkpoints store RoPE frequencies: harmless, recomputed."""
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _load(_write(tmp_path, plain_config(2), lambda w: w.__setitem__(name, torch.ones(8))))


def test_integer_tensor(tmp_path):
    name = "model.norm.weight"
    path = _write(tmp_path, plain_config(2), lambda w: w.__setitem__(name, torch.ones(64, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=name):
        _load(path)


def test_pickle_only_checkpoint(tmp_path):
    config = plain_config(2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(random_weights(config), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as info:
        _load(tmp_path)
    assert "pickle" in str(info.value)
    with pytest.raises(CheckpointError, match="pickle"):
        streaming.load(tmp_path, device="cpu")


def test_no_weights_at_all(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(plain_config(2)))
    with pytest.raises(CheckpointError, match="safetensors"):
        _load(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(tmp_path, damage):
    path = _write(tmp_path, plain_config(2))
    file = path / "model.safetensors"
    data = file.read_bytes()
    if damage == "garbage":
        file.write_bytes(b"\x00\x01not a safetensors file" * 10)
    elif damage == "truncated":
        file.write_bytes(data[: len(data) // 2])
    else:
        file.write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _load(path)
    with pytest.raises(CheckpointError):
        streaming.load(path, device="cpu")


def test_index_points_to_missing_shard(tmp_path):
    path = _write(tmp_path, plain_config(2), shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        _load(path)


def test_index_maps_tensor_to_wrong_shard(tmp_path, reads):
    path = _write(tmp_path, plain_config(2), shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[0]
    other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
             "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors"}
    index["weight_map"][name] = other[index["weight_map"][name]]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=name):
        _load(path)
    assert reads["n"] == 0


def test_malformed_index(tmp_path):
    path = _write(tmp_path, plain_config(2), shards=2)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="index"):
        _load(path)


def test_tensor_in_two_unindexed_files(tmp_path):
    config = plain_config(2)
    path = _write(tmp_path, config)
    save_file({"model.norm.weight": torch.ones(64)}, str(path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        _load(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        _load(tmp_path / "nope")
    with pytest.raises(CheckpointError):
        streaming.load(tmp_path / "nope", device="cpu")
