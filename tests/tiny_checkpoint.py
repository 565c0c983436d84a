"""Tiny random checkpoints written to disk the way Hugging Face writes them (for tests; no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

BASE = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}


def lckv_config(layers: int = 6, *, m: int = 3, b: int = 2, force_nodiag: bool = True, **overrides) -> dict:
    """LCKV w=2: layer 0 and the top layer own KV; layers 1..L-2 read layer L-2 (the target)."""
    target = layers - 2
    types = [0] + [target] * (layers - 2) + [layers - 1]
    config = dict(BASE, model_type="lckv-llama", num_hidden_layers=layers,
                  layer_types="_".join(map(str, types)), forward_passes=m, backward_passes=b,
                  force_nodiag=force_nodiag)
    config.update(overrides)
    return config


def plain_config(layers: int = 3, **overrides) -> dict:
    config = dict(BASE, model_type="llama", num_hidden_layers=layers)
    config.update(overrides)
    return config


def random_weights(config: dict, *, std: float = 0.2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights named like HF Llama keys; layers that read another layer's KV get no k_proj/v_proj."""
    from streaming.config import ModelConfig
    from streaming.model import CausalLM

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_dict(config))
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            weights[name] = 1.0 + 0.1 * torch.randn(tensor.shape)
        else:
            weights[name] = std * torch.randn(tensor.shape)
    return weights


def write_checkpoint(directory, config: dict, weights: dict[str, torch.Tensor], *, shards: int = 1) -> Path:
    """Write config.json and `shards` safetensors files (with an index when sharded)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(weights)
    if shards == 1:
        save_file({n: weights[n].contiguous() for n in names}, str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n].contiguous() for n in part}, str(directory / file))
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def make_tiny_checkpoint(directory, kind: str = "lckv", *, with_tokenizer: bool = True, std: float = 0.2,
                         seed: int = 0, **config_overrides) -> Path:
    """A tiny random `kind` ("lckv" or "plain") checkpoint, optionally with a real sentencepiece tokenizer."""
    config = lckv_config(**config_overrides) if kind == "lckv" else plain_config(**config_overrides)
    directory = write_checkpoint(directory, config, random_weights(config, std=std, seed=seed))
    if with_tokenizer:
        from tests.tiny_tokenizer import make_tiny_tokenizer

        make_tiny_tokenizer(directory)
    return directory
