"""Loading a Hugging Face checkpoint directory: config.json + *.safetensors (sharded or not).

Every tensor name and shape is checked against the model before a single weight is read, so a bad
checkpoint raises CheckpointError naming the tensor and never leaves a half-loaded model. Pickle
files (pytorch_model.bin) are refused: only safetensors are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .errors import CheckpointError
from .model import CausalLM
from .rope import inverse_frequencies

INDEX_FILE = "model.safetensors.index.json"


def _ignorable(name: str, config: ModelConfig) -> bool:
    # Old checkpoints store RoPE frequencies (recomputed here); tied checkpoints may repeat the head.
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings)


def weight_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed index file ({exc})") from None
        files = {}
        for name, file in weight_map.items():
            path = directory / file
            if not path.is_file():
                raise CheckpointError(f"{index}: tensor '{name}' is mapped to missing file '{file}'")
            files[name] = path
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {pickled}: pickle checkpoints are never loaded; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"{directory}: no *.safetensors weights{hint}")
    files = {}
    for shard in shards:
        for name in _open(shard).keys():
            if name in files:
                raise CheckpointError(f"tensor '{name}' appears in both {files[name].name} and {shard.name}")
            files[name] = shard
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def load_model(directory: str | Path, *, device: torch.device, dtype: torch.dtype | None) -> CausalLM:
    """Build the model of `directory`/config.json and load its weights onto `device` in `dtype`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    config = ModelConfig.from_file(directory / "config.json")
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    files = weight_files(directory)
    _check_names_and_shapes(files, expected, config)

    state = {}
    handles = {}
    for name in expected:
        path = files[name]
        handle = handles.get(path) or handles.setdefault(path, _open(path))
        tensor = handle.get_tensor(name)
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor '{name}' has non-float dtype {tensor.dtype}")
        state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    # The model holds the weights now: without these references, stacking a layer's projections
    # frees its originals before the next layer's are stacked (else the peak is 1.6x the weights).
    del state, handles
    model.inv_freq = inverse_frequencies(config.rope, config.head_dim).to(device)
    model.eval().requires_grad_(False)
    model.stack_weights()
    return model


def _check_names_and_shapes(files: dict[str, Path], expected: dict[str, tuple], config: ModelConfig) -> None:
    found = {name for name in files if not _ignorable(name, config)}
    missing = sorted(set(expected) - found)
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(found - set(expected))
    if unexpected:
        name = unexpected[0]
        why = ""
        if ".self_attn.k_proj" in name or ".self_attn.v_proj" in name:
            layer = int(name.split(".")[2])
            if layer < config.num_hidden_layers:
                why = f" (layer {layer} reads layer {config.kv_sources[layer]}'s KV and owns no k_proj/v_proj)"
        raise CheckpointError(f"checkpoint has unexpected tensor(s) {unexpected[:5]}{why}")
    handles = {}
    for name, shape in expected.items():
        path = files[name]
        handle = handles.get(path) or handles.setdefault(path, _open(path))
        try:
            actual = tuple(handle.get_slice(name).get_shape())
        except Exception:
            raise CheckpointError(f"tensor '{name}' is listed for {path.name} but not stored there") from None
        if actual != shape:
            raise CheckpointError(f"tensor '{name}' has shape {list(actual)}, expected {list(shape)}")
