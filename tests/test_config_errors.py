"""Malformed or unsupported configs and impossible cache settings get a clear error naming the problem.

config.json problems raise streaming.errors.ConfigError (also through load_model / streaming.load,
before any weight is read); sinks/window/chunk problems raise cache.errors.CacheConfigError; text given
to a model without tokenizer raises TokenizerMissingError.
"""

from __future__ import annotations

import json

import pytest
import torch

import streaming
from cache.errors import CacheConfigError
from cache.sink_window import SinkWindowCache
from streaming.checkpoint import load_model
from streaming.config import ModelConfig
from streaming.errors import ConfigError, TokenizerMissingError
from tests.tiny_checkpoint import lckv_config, plain_config, random_weights, write_checkpoint


def _opt_llama(**overrides):
    config = plain_config(4, model_type="opt-llama", layer_types="0_1_2_0", target_layer=2,
                          num_encoders=4, num_trained_encoders=1)
    config.update(overrides)
    return config


def _drop(config, key):
    config = dict(config)
    del config[key]
    return config


# (config dict, text the message must contain)
BAD = {
    "unknown-field": (plain_config(2, use_magic_attention=True), "use_magic_attention"),
    "wrong-model-type": (plain_config(2, model_type="gpt2"), "model_type"),
    "missing-model-type": (_drop(plain_config(2), "model_type"), "model_type"),
    "missing-hidden-size": (_drop(plain_config(2), "hidden_size"), "hidden_size"),
    "layer-types-too-short": (lckv_config(6, layer_types="0_4_4_4_5"), "layer_types"),
    "layer-types-too-long": (lckv_config(4, layer_types="0_2_2_3_3"), "layer_types"),
    "layer-types-not-index": (lckv_config(4, layer_types="0_x_2_3"), "layer_types"),
    "layer-types-out-of-range": (lckv_config(4, layer_types="0_9_2_3"), "layer_types"),
    "layer-types-chained": (lckv_config(4, layer_types="0_2_3_3"), "layer_types"),
    "layer-types-missing": (_drop(lckv_config(4), "layer_types"), "layer_types"),
    "sliding-lckv-layer": (lckv_config(4, layer_types="0_2_2_3s"), "layer_types"),
    "force-nodiag-not-bool": (lckv_config(4, force_nodiag="yes"), "force_nodiag"),
    "forward-passes-zero": (lckv_config(4, forward_passes=0), "forward_passes"),
    "backward-passes-float": (lckv_config(4, backward_passes=2.0), "backward_passes"),
    "opt-llama-bad-code": (_opt_llama(layer_types="0_1_3_0"), "layer_types"),
    "opt-llama-target-mismatch": (_opt_llama(target_layer=1), "target_layer"),
    "opt-llama-target-missing": (_drop(_opt_llama(), "target_layer"), "target_layer"),
    "opt-llama-two-targets": (_opt_llama(layer_types="0_2_2_0"), "layer_types"),
    "opt-llama-no-forward-pass": (_opt_llama(num_encoders=1, num_trained_encoders=1), "num_encoders"),
    "bad-rope-type": (plain_config(2, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    "bad-rope-type-new-key": (plain_config(2, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}), "dynamic"),
    "rope-scaling-not-object": (plain_config(2, rope_scaling="llama3"), "rope_scaling"),
    "llama3-missing-field": (plain_config(2, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                             "low_freq_factor"),
    "rope-theta-negative": (plain_config(2, rope_theta=-1.0), "rope_theta"),
    "rope-theta-string": (plain_config(2, rope_theta="10000"), "rope_theta"),
    "sliding-window-mistral": (plain_config(2, model_type="mistral", sliding_window=4096), "sliding_window"),
    "sliding-window-llama": (plain_config(2, use_sliding_window=True), "use_sliding_window"),
    "hidden-size-string": (plain_config(2, hidden_size="64"), "hidden_size"),
    "vocab-size-float": (plain_config(2, vocab_size=512.0), "vocab_size"),
    "layers-bool": (plain_config(2, num_hidden_layers=True), "num_hidden_layers"),
    "layers-zero": (plain_config(2, num_hidden_layers=0), "num_hidden_layers"),
    "heads-not-multiple": (plain_config(2, num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    "head-dim-odd": (plain_config(2, head_dim=15), "head_dim"),
    "rms-eps-negative": (plain_config(2, rms_norm_eps=-1e-6), "rms_norm_eps"),
    "eos-not-int": (plain_config(2, eos_token_id="</s>"), "eos_token_id"),
    "bos-float": (plain_config(2, bos_token_id=1.5), "bos_token_id"),
    "gelu": (plain_config(2, hidden_act="gelu"), "hidden_act"),
    "attention-bias": (plain_config(2, attention_bias=True), "attention_bias"),
    "mlp-bias": (plain_config(2, mlp_bias=True), "mlp_bias"),
    "pretraining-tp": (plain_config(2, pretraining_tp=2), "pretraining_tp"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_dict(case):
    config, needle = BAD[case]
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(config)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, streaming.SinkstreamError)


def test_good_configs_parse():
    """The fixtures above differ from accepted configs only in the one bad field."""
    for config in (plain_config(2), lckv_config(4), _opt_llama(), plain_config(2, model_type="mistral", sliding_window=None)):
        ModelConfig.from_dict(config)


@pytest.mark.parametrize("case", ["unknown-field", "layer-types-too-short", "bad-rope-type", "hidden-size-string"])
def test_bad_config_through_load_model(tmp_path, case):
    """A checkpoint whose config.json is bad fails before any weight is read (weights are fine)."""
    config, needle = BAD[case]
    good = lckv_config(6) if config["model_type"] == "lckv-llama" else plain_config(2)
    write_checkpoint(tmp_path, good, random_weights(good))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=needle):
        load_model(tmp_path, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ConfigError, match=needle):
        streaming.load(tmp_path, device="cpu")


@pytest.mark.parametrize("text,needle", [
    ('{"model_type": "llama", "hidden_size": 64,', "JSON"),
    ("[1, 2, 3]", "object"),
    ("", "JSON"),
])
def test_config_json_syntax(tmp_path, text, needle):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        ModelConfig.from_file(tmp_path / "config.json")
    assert "config.json" in str(info.value)
    config = plain_config(2)
    write_checkpoint(tmp_path, config, random_weights(config))
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError):
        streaming.load(tmp_path, device="cpu")


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_file(tmp_path / "config.json")


# ---- cache settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("sinks,window,needle", [
    (4, 0, "window"),
    (0, -3, "window"),
    (8, 4, "sinks"),
    (-1, 4, "sinks"),
    (4, 16.0, "window"),
    (True, 16, "sinks"),
])
def test_impossible_sink_window(sinks, window, needle):
    with pytest.raises(CacheConfigError, match=needle):
        SinkWindowCache([0], 1, 1, 2, sinks=sinks, window=window, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def runtime_without_tokenizer(tmp_path_factory):
    config = plain_config(2)
    path = write_checkpoint(tmp_path_factory.mktemp("notok"), config, random_weights(config))
    return streaming.load(path, device="cpu", dtype="float32")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(sinks=4, window=0), "window"),
    (dict(sinks=8, window=4), "sinks"),
    (dict(sinks=-1, window=4), "sinks"),
    (dict(sinks=4, window=16, chunk=17), "chunk"),
    (dict(sinks=4, window=16, chunk=0), "chunk"),
])
def test_impossible_session_settings(runtime_without_tokenizer, kwargs, needle):
    with pytest.raises(CacheConfigError, match=needle):
        runtime_without_tokenizer.session(**kwargs)


def test_text_without_tokenizer(runtime_without_tokenizer):
    rt = runtime_without_tokenizer
    assert rt.tokenizer is None
    s = rt.session(sinks=2, window=8)
    with pytest.raises(TokenizerMissingError):
        s.feed("hello")
    with pytest.raises(TokenizerMissingError):
        s.generate("hello", max_new_tokens=2)
    assert s.stats().tokens_seen == 0  # nothing was fed
    s.feed([1, 5, 7])  # ids still work
    assert s.stats().tokens_seen == 3
