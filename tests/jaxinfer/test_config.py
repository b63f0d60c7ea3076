"""config.json -> ModelConfig: supported fields map, unsupported ones fail loudly, both RoPE
dialects agree, RoPE frequencies match transformers, and presets round-trip through config_to_hf."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import (
    Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config, Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from jaxinfer.config import ModelConfig, RopeConfig, config_from_hf, load_config
from jaxinfer.errors import ConfigError
from jaxinfer.presets import PRESETS, get_preset
from jaxinfer.config import config_to_hf

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_json(config) -> dict:
    """The dict transformers writes to config.json (only non-default fields, like save_pretrained)."""
    return json.loads(config.to_json_string())


def test_transformers_configs_map():
    llama = config_from_hf(hf_json(LlamaConfig(**SMALL, tie_word_embeddings=True, rms_norm_eps=1e-5)))
    assert (llama.model_type, llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim) == (
        "llama", 2, 4, 2, 8)
    assert llama.tie_word_embeddings and llama.rms_norm_eps == 1e-5
    assert not (llama.qkv_bias or llama.o_bias or llama.mlp_bias) and llama.sliding_window is None

    biased = config_from_hf(hf_json(LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)))
    assert biased.qkv_bias and biased.o_bias and biased.mlp_bias

    qwen = config_from_hf(hf_json(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_window is None

    mistral = config_from_hf(hf_json(MistralConfig(**SMALL, head_dim=16, sliding_window=5)))
    assert mistral.sliding_window == 5 and mistral.head_dim == 16 and not mistral.qkv_bias


def test_load_config_reads_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_json(LlamaConfig(**SMALL))))
    assert load_config(tmp_path) == load_config(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"foo_bar": 1}, "foo_bar"),
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ],
)
def test_unsupported_llama_fields_raise(change, field):
    raw = hf_json(LlamaConfig(**SMALL)) | change
    with pytest.raises(ConfigError, match=field):
        config_from_hf(raw)


def test_qwen2_sliding_window_raises():
    raw = hf_json(Qwen2Config(**SMALL)) | {"use_sliding_window": True, "sliding_window": 16}
    with pytest.raises(ConfigError, match="use_sliding_window"):
        config_from_hf(raw)


def test_attention_bias_only_for_llama():
    for cls in (MistralConfig, Qwen2Config):
        with pytest.raises(ConfigError, match="attention_bias"):
            config_from_hf(hf_json(cls(**SMALL)) | {"attention_bias": True})
    assert config_from_hf(hf_json(LlamaConfig(**SMALL, attention_bias=True))).o_bias


def test_num_params_matches_transformers():
    import torch
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    for model in (LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)),
                  Qwen2ForCausalLM(Qwen2Config(**SMALL))):
        cfg = config_from_hf(hf_json(model.config))
        assert cfg.num_params() == sum(p.numel() for p in model.parameters()), cfg.model_type


@pytest.mark.parametrize(
    "legacy",
    [
        {"type": "linear", "factor": 2.0},
        {"rope_type": "linear", "factor": 2.0},
        LLAMA3_ROPE,
        None,
    ],
)
def test_rope_dialects_agree(legacy):
    base = {k: v for k, v in hf_json(LlamaConfig(**SMALL)).items() if k != "rope_parameters"}
    old = config_from_hf(base | {"rope_theta": 500000.0, "rope_scaling": legacy})
    params = {"rope_type": "default"} if legacy is None else {
        ("rope_type" if k == "type" else k): v for k, v in legacy.items()}
    new = config_from_hf(base | {"rope_parameters": params | {"rope_theta": 500000.0}})
    assert old == new
    assert old.rope.theta == 500000.0
    assert old.rope.type == ("default" if legacy is None else params["rope_type"])


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        LLAMA3_ROPE | {"rope_theta": 500000.0},
        LLAMA3_ROPE | {"rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 2.0,
                       "original_max_position_embeddings": 1024},
    ],
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_inv_freq_matches_transformers(rope_parameters, head_dim):
    hf = LlamaConfig(**SMALL | {"hidden_size": 4 * head_dim}, rope_parameters=rope_parameters,
                     max_position_embeddings=131072)
    expected, _ = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](hf, None)
    ours = config_from_hf(hf_json(hf))
    assert ours.head_dim == head_dim
    np.testing.assert_allclose(ours.rope.inv_freq(head_dim), expected.numpy(), rtol=1e-6, atol=0)


def test_default_inv_freq_matches_transformers():
    hf = LlamaConfig(**SMALL, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    np.testing.assert_allclose(RopeConfig(theta=500000.0).inv_freq(8), expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_hf_config(name):
    config = get_preset(name)
    hf = config_to_hf(config)
    assert config_from_hf(json.loads(json.dumps(hf))) == config
    # transformers itself accepts the dict, and reads the same shapes.
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "qwen3_moe": Qwen3MoeConfig, "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig, "phi3": Phi3Config,
           "mixtral": MixtralConfig}[config.model_type]
    theirs = cls(**{k: v for k, v in hf.items() if k != "model_type"})  # a class attribute of the newer configs
    assert (theirs.num_hidden_layers, theirs.num_key_value_heads, theirs.head_dim) == (
        config.num_layers, config.num_kv_heads, config.head_dim)


def test_config_to_hf_round_trips_variants():
    tiny = get_preset("tiny")
    variants = [
        tiny.replace(qkv_bias=True, o_bias=True, mlp_bias=True),
        tiny.replace(rope=RopeConfig(theta=1e4, type="linear", factor=4.0), eos_token_ids=()),
        tiny.replace(model_type="mistral", sliding_window=7, bos_token_id=None, eos_token_ids=(3, 4)),
        tiny.replace(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True),
    ]
    for config in variants:
        assert config_from_hf(config_to_hf(config)) == config


def test_config_to_hf_rejects_what_hf_cannot_express():
    with pytest.raises(ConfigError, match="cannot be written"):
        config_to_hf(get_preset("tiny").replace(qkv_bias=True))  # llama biases q/k/v and o together
    with pytest.raises(ConfigError, match="cannot be written"):
        config_to_hf(get_preset("tiny").replace(model_type="qwen2"))  # qwen2 always has q/k/v bias


def test_preset_sizes():
    assert get_preset("llama-3.2-1b").num_params() == pytest.approx(1.24e9, rel=0.01)
    assert get_preset("llama-3-8b").num_params() == pytest.approx(8.03e9, rel=0.01)
    assert get_preset("llama-2-7b").num_params() == pytest.approx(6.74e9, rel=0.01)
    assert get_preset("qwen2-0.5b").num_params() == pytest.approx(0.494e9, rel=0.01)
    assert get_preset("llama-20m").num_params() == pytest.approx(20e6, rel=0.1)
    assert 0.5e6 < get_preset("tiny").num_params() < 1.5e6
    tiny = get_preset("tiny")
    assert (tiny.vocab_size, tiny.bos_token_id, tiny.eos_token_ids) == (258, 256, (257,))
    assert all(isinstance(c, ModelConfig) for c in PRESETS.values())


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="llama-3.2-1b"):
        get_preset("gpt-5")
