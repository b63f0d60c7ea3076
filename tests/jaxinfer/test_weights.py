"""Checkpoint loading and saving against tiny random transformers models saved locally.

The expected layout is spelled out here independently of weights.py (HF name -> our key), so a
mapping mistake there cannot hide behind the same mistake in the test.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from jaxinfer.errors import CheckpointError
from jaxinfer.presets import get_preset
from jaxinfer.weights import dummy_model, load_model, save_model

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LAYER_KEYS = {  # HF suffix under model.layers.{i}. -> (our key, stored transposed)
    "input_layernorm.weight": ("attn_norm", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    **{f"self_attn.{p}_proj.weight": (f"w{p}", True) for p in "qkvo"},
    **{f"self_attn.{p}_proj.bias": (f"b{p}", False) for p in "qkvo"},
    **{f"mlp.{p}_proj.weight": (f"w_{p}", True) for p in ("gate", "up", "down")},
    **{f"mlp.{p}_proj.bias": (f"b_{p}", False) for p in ("gate", "up", "down")},
}
VARIANTS = {
    "llama_tied_gqa": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama_untied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, num_key_value_heads=4)),
    "llama_biases": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True, head_dim=16)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=16, head_dim=8)),
}


def make_hf(path, variant="llama_tied_gqa", dtype=torch.float32, **save_kwargs):
    """Save a tiny random HF model to `path`; returns its state dict (float32, torch)."""
    config_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(0)
    model = model_cls(config_cls(**SMALL | extra))
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise so every tensor is checked
        for p in model.parameters():
            p.normal_()
    model.to(dtype).save_pretrained(path, **save_kwargs)
    return {k: v.float() for k, v in model.state_dict().items()}


def ours(params, name):
    """Our array for HF tensor `name`, back in HF layout."""
    if name == "model.embed_tokens.weight":
        return params["embed"]
    if name == "model.norm.weight":
        return params["final_norm"]
    if name == "lm_head.weight":
        return params["lm_head"].T
    layer, suffix = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
    key, transposed = LAYER_KEYS[suffix]
    arr = params["layers"][key][int(layer)]
    return arr.T if transposed else arr


def assert_matches(model, state, dtype=np.float32):
    state = {k: v for k, v in state.items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    for name, expected in state.items():
        got = ours(model.params, name)
        assert got.dtype == dtype, name
        np.testing.assert_array_equal(np.asarray(got, np.float32), expected.float().numpy(), err_msg=name)
    # Nothing beyond the checkpoint: every parameter element came from some HF tensor.
    assert sum(x.size for x in jax.tree.leaves(model.params)) == sum(v.numel() for v in state.values())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_load_matches_transformers_state_dict(tmp_path, variant):
    state = make_hf(tmp_path, variant)
    model = load_model(tmp_path)
    assert_matches(model, state)
    layer_keys = set(model.params["layers"])
    assert ("bq" in layer_keys) == (variant in ("qwen2", "llama_biases"))
    assert ("bo" in layer_keys) == ("b_up" in layer_keys) == (variant == "llama_biases")
    assert ("lm_head" in model.params) == (not model.config.tie_word_embeddings)


def test_sharded_checkpoint_loads_identically(tmp_path):
    state = make_hf(tmp_path / "one")
    make_hf(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert_matches(load_model(tmp_path / "sharded"), state)


def test_stories260k_loads(assets_dir):
    path = assets_dir / "stories260K"
    if not (path / "model.safetensors").exists():
        pytest.skip(f"stories260K checkpoint not found at {path}")
    model = load_model(path, progress=True)
    assert model.config.num_layers == 5 and model.config.tie_word_embeddings
    assert_matches(model, load_file(path / "model.safetensors"))
    assert sum(x.size for x in jax.tree.leaves(model.params)) == model.config.num_params()


def test_bfloat16_load(tmp_path):
    state = make_hf(tmp_path, "qwen2")
    model = load_model(tmp_path, dtype=jnp.bfloat16)
    assert_matches(model, {k: v.to(torch.bfloat16) for k, v in state.items()}, dtype=jnp.bfloat16)
    assert load_model(tmp_path, dtype="float16").params["embed"].dtype == jnp.float16
    with pytest.raises(ValueError, match="int8"):
        load_model(tmp_path, dtype="int8")


def test_bfloat16_checkpoint_loads(tmp_path):
    state = make_hf(tmp_path, "llama_untied", dtype=torch.bfloat16)
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    assert_matches(load_model(tmp_path), bf16)  # upcast to float32 exactly
    assert_matches(load_model(tmp_path, dtype="bfloat16"), bf16, dtype=jnp.bfloat16)


def rewrite(path, edit):
    """Apply `edit` to the checkpoint's tensors in place."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    make_hf(tmp_path, "llama_untied")
    rewrite(tmp_path, lambda t: [t.pop("model.layers.1.mlp.up_proj.weight"), t.pop("lm_head.weight")])
    with pytest.raises(CheckpointError, match="missing") as e:
        load_model(tmp_path)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value) and "lm_head.weight" in str(e.value)


def test_misshapen_tensor(tmp_path):
    make_hf(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}))
    with pytest.raises(CheckpointError, match=re.escape(
            "model.layers.0.self_attn.k_proj.weight: found [32, 32], expected [16, 32]")):
        load_model(tmp_path)


def test_unexpected_tensor(tmp_path):
    make_hf(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)}))
    with pytest.raises(CheckpointError, match="unexpected.*model.layers.0.self_attn.q_norm.weight"):
        load_model(tmp_path)


def test_every_problem_reported_at_once(tmp_path):
    make_hf(tmp_path, "qwen2")

    def edit(t):
        del t["model.layers.0.self_attn.q_proj.bias"]
        t["model.norm.weight"] = torch.ones(33)
        t["model.layers.1.mlp.up_proj.bias"] = torch.zeros(48)
        t["model.layers.1.input_layernorm.weight"] = torch.ones(32, dtype=torch.int32)

    rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    message = str(e.value)
    for expected in ("missing tensors (1): model.layers.0.self_attn.q_proj.bias",
                     "unexpected tensors (1): model.layers.1.mlp.up_proj.bias",
                     "model.norm.weight: found [33], expected [32]",
                     "model.layers.1.input_layernorm.weight: I32"):
        assert expected in message


def test_tolerated_extras(tmp_path):
    state = make_hf(tmp_path)  # tied: HF leaves lm_head out of the file
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    rewrite(tmp_path, lambda t: t.update({
        "lm_head.weight": t["model.embed_tokens.weight"].clone(),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
        "model.rotary_emb.inv_freq": torch.ones(4),
    }))
    model = load_model(tmp_path)
    assert "lm_head" not in model.params
    assert_matches(model, state)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    make_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_missing_shard(tmp_path):
    make_hf(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(tmp_path)


# A Llama with every optional tensor, so round trips cover biases and an untied head.
BIASED = get_preset("tiny").replace(num_layers=2, intermediate_size=96, qkv_bias=True, o_bias=True,
                                    mlp_bias=True)


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip(tmp_path, max_shard_bytes, dtype):
    model = dummy_model(BIASED, dtype, seed=3)
    save_model(model, tmp_path, max_shard_bytes=max_shard_bytes)
    shards = list(tmp_path.glob("model-*-of-*.safetensors"))
    assert (len(shards) > 1) == (max_shard_bytes is not None)
    loaded = load_model(tmp_path, dtype=dtype)
    assert loaded.config == model.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded.params, model.params)


def test_save_replaces_previous_checkpoint(tmp_path):
    save_model(dummy_model(BIASED, seed=1), tmp_path, max_shard_bytes=40_000)
    model = dummy_model(BIASED, seed=2)
    save_model(model, tmp_path)
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()
    np.testing.assert_array_equal(load_model(tmp_path).params["embed"], model.params["embed"])


@pytest.mark.parametrize("preset, model_cls", [("tiny", LlamaForCausalLM), ("qwen2", Qwen2ForCausalLM)])
def test_saved_checkpoint_loads_in_transformers(tmp_path, preset, model_cls):
    config = get_preset("tiny").replace(num_layers=2)
    if preset == "qwen2":
        config = config.replace(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True)
    model = dummy_model(config, seed=4)
    save_model(model, tmp_path)
    hf = model_cls.from_pretrained(tmp_path)
    assert_matches(model, hf.state_dict())


def test_dummy_model_shapes_and_statistics():
    config = get_preset("tiny")
    model = dummy_model(config)
    d, f, L = 64, config.intermediate_size, config.num_layers
    expected = {
        "embed": (258, d), "final_norm": (d,), "lm_head": (d, 258),
        "layers": {"attn_norm": (L, d), "mlp_norm": (L, d), "wq": (L, d, 64), "wk": (L, d, 32),
                   "wv": (L, d, 32), "wo": (L, 64, d), "w_gate": (L, d, f), "w_up": (L, d, f),
                   "w_down": (L, f, d)},
    }
    assert jax.tree.map(lambda a: a.shape, model.params) == expected
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model.params))
    np.testing.assert_array_equal(model.params["layers"]["mlp_norm"], 1.0)
    assert float(jnp.std(model.params["layers"]["w_up"])) == pytest.approx(0.02, rel=0.05)
    # Deterministic per seed; distinct tensors and seeds differ.
    again, other = dummy_model(config), dummy_model(config, seed=1)
    np.testing.assert_array_equal(again.params["layers"]["wq"], model.params["layers"]["wq"])
    assert not np.array_equal(other.params["layers"]["wq"], model.params["layers"]["wq"])
    assert not np.array_equal(model.params["layers"]["w_gate"], model.params["layers"]["w_up"])


def test_dummy_model_distribution():
    model = dummy_model(get_preset("llama-20m"), "bfloat16")
    assert model.params["layers"]["w_gate"].dtype == jnp.bfloat16
    w = np.asarray(model.params["layers"]["w_gate"], np.float32)
    assert w.std() == pytest.approx(0.02, rel=0.01) and abs(w.mean()) < 1e-4
    assert abs(np.mean((w / 0.02) ** 4) - 3) < 0.05  # normal, not uniform (kurtosis 1.8)
    assert abs(np.corrcoef(w[0].ravel(), w[1].ravel())[0, 1]) < 0.01  # layers are independent
    biases = dummy_model(BIASED).params["layers"]["bq"]
    assert 0 < float(jnp.std(biases)) < 0.005
