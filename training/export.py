"""Write a trained model as a Hugging Face checkpoint directory (config, sharded safetensors, tokenizer)."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from training.model import CausalLM, ModelShape
from training.tokenizer import BOS, EOS


def hf_config(s: ModelShape) -> dict:
    """config.json: Llama keys; LCKV adds the `lckv-llama` fields (layer_types, m, b, force_nodiag)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": s.max_position_embeddings,
        "rms_norm_eps": s.rms_norm_eps,
        "rope_theta": s.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": s.initializer_range,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "torch_dtype": "bfloat16",
    }
    if s.is_lckv:
        cfg.update({
            "architectures": ["LCKVLlamaForCausalLM"],
            "model_type": "lckv-llama",
            "layer_types": "_".join(str(j) for j in s.sources),
            "forward_passes": s.forward_passes,
            "backward_passes": s.backward_passes,
            "force_nodiag": s.force_nodiag,
            "sliding_window": s.max_position_embeddings,
            "use_sequential": False,
        })
    return cfg


def shape_from_config(cfg: dict) -> ModelShape:
    """Inverse of hf_config, for reloading a checkpoint into the training model (tests, evaluation)."""
    sources = [int(t.rstrip("s")) for t in cfg["layer_types"].split("_")] if "layer_types" in cfg else None
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings")
    return ModelShape(**{k: cfg[k] for k in keys}, kv_sources=sources,
                      force_nodiag=cfg.get("force_nodiag", False),
                      forward_passes=cfg.get("forward_passes", 7), backward_passes=cfg.get("backward_passes", 2))


def save_checkpoint(model: CausalLM, out_dir: str, tokenizer: str, shard_bytes: int = 14_000_000,
                    dtype=torch.bfloat16) -> list[str]:
    """Writes config.json, model-0000k-of-0000n.safetensors + index, tokenizer files. Returns shard names."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    shards: list[dict] = [{}]
    size = 0
    for name in sorted(tensors, key=_layer_order):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(files, shards):
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _write_json(os.path.join(out_dir, "config.json"), hf_config(model.s))
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": BOS, "eos_token_id": EOS, "do_sample": True,
        "temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1, "max_new_tokens": 200})
    shutil.copyfile(tokenizer, os.path.join(out_dir, "tokenizer.model"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", "model_max_length": model.s.max_position_embeddings,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False, "legacy": False,
        "clean_up_tokenization_spaces": False})
    return files


def load_checkpoint(path: str, device="cpu") -> CausalLM:
    """Checkpoint dir -> training-side CausalLM (fp32)."""
    from safetensors.torch import load_file
    with open(os.path.join(path, "config.json")) as f:
        model = CausalLM(shape_from_config(json.load(f)))
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for fname in files:
        state.update(load_file(os.path.join(path, fname)))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device)


def _layer_order(name: str):
    parts = name.split(".")
    return (int(parts[2]) if parts[1] == "layers" else (-1 if "embed" in name else 10**6), name)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
