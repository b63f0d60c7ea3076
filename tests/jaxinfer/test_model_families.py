"""Issue 16's model families against transformers: Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 (text),
Phi-3 and Mixtral.

For random tiny checkpoints of each family (tests/jaxinfer/hf_oracle.py FAMILY_CONFIGS, with
the odd cases: windows shorter than the prompts, Gemma's soft-caps biting, Gemma 3's two RoPE
bases, Qwen3-MoE with norm_topk_prob both ways and dense layers among the MoE ones, Phi-3 with
tied embeddings), in float32:
- `forward` equals transformers' logits within 1e-4 x max|logit|, stacked (one lax.scan, the
  per-layer windows and RoPE tables traced) and unstacked (a Python layer loop);
- chunked prefill + paged decode through the engine's steps equals transformers' logits at
  every position, on the "reference" (stacked) and "xla" (unstacked) attention paths;
- greedy `Engine.generate` equals HF greedy `generate` token for token, more requests than slots.
Then config mapping (what is rejected, by name; presets; parameter counts) and the MoE FLOPs.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import jaxinfer
from jaxinfer.config import config_from_hf, config_to_hf
from jaxinfer.errors import ConfigError
from jaxinfer.model import layer_segments
from jaxinfer.moe import moe_flops_per_token, moe_mlp, route, tile_plan
from jaxinfer.presets import PRESETS
from jaxinfer.sampling import SamplingParams
from jaxinfer.state import EngineConfig, init_state
from jaxinfer.steps import admit_jit, decode_forward_jit, make_chunk, make_requests, prefill_jit

from hf_oracle import FAMILY_CONFIGS, _BASE, hf_greedy, hf_logits, make_checkpoint

REL_TOL = 1e-4  # fp32 both sides: summation order and kernels only


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(path, request.param)
    return request.param, hf, jaxinfer.load_model(path, dtype="float32")


def _check(name, got, want, what):
    err = np.abs(np.asarray(got) - want).max()
    assert err <= REL_TOL * np.abs(want).max(), f"{name} {what}: max abs err {err} vs scale {np.abs(want).max()}"


def test_forward_equals_hf(family):
    name, hf, model = family
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 40))  # 40 > windows of 8
    ref = hf_logits(hf, tokens)
    _check(name, jaxinfer.forward(model, tokens), ref, "stacked")
    _check(name, jaxinfer.forward(model.unstacked(), tokens), ref, "unstacked")


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_chunked_prefill_and_paged_decode_equal_hf(family, backend):
    """A 21-token prompt prefilled in two chunks (7 + 13: the second attends to the first
    through the pages, across the window), then teacher-forced paged decode to position 33."""
    name, hf, model = family
    model = model.unstacked() if backend == "xla" else model
    cfg = EngineConfig(max_slots=2, page_size=4, num_pages=32, max_seq_len=48, prefill_buckets=(16, 48),
                       attention_backend=backend)
    seq = np.random.default_rng(1).integers(0, model.config.vocab_size, 34).tolist()
    ref = hf_logits(hf, [seq])[0]
    prompt = seq[:21]
    state = init_state(cfg, model.config)
    reqs = make_requests(cfg, [prompt], [SamplingParams(max_tokens=40, temperature=0.0, seed=0)], [7], 1, 32)
    state, adm = admit_jit(cfg, state, reqs)
    slot = int(adm.slot[0])
    for start, n in ((0, 7), (7, 13)):
        state, pre = prefill_jit(cfg, model, state, make_chunk(cfg, [(slot, prompt, start, n, -1)], 1, 16))
        assert int(pre.n[0]) == n
    for pos in range(20, len(seq)):
        state = state.replace(last_token=state.last_token.at[slot].set(seq[pos]))
        state, logits, ran = decode_forward_jit(cfg, model, state)
        assert bool(ran[slot])
        _check(name, logits[slot], ref[pos], f"{backend} position {pos}")


def test_engine_greedy_equals_hf(family):
    """Three requests on two slots (one waits, then reuses a freed slot); prompts of 5, 13 and 20
    tokens, so generation runs past the windows of 8. One prefill bucket (32) of batch 1 keeps
    the compiles (the CI cost of this test) to one prefill and two decode shapes per family."""
    name, hf, model = family
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (5, 13, 20)]
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    engine = jaxinfer.Engine(model, max_slots=2, page_size=4, num_pages=32, max_seq_len=32, decode_steps=4,
                             prefill_buckets=(32,), max_prefill_batch=1)
    outs = engine.generate(prompts, sp)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, sp.max_tokens, eos_token_id=list(model.config.eos_token_ids)), \
            f"{name}: prompt of {len(p)}"
    assert engine.stats()["pages_used"] == 0


def test_save_model_round_trip(family, tmp_path):
    """save_model writes the HF layout back (Phi-3's fused tensors re-fused, experts per expert):
    loading it gives the same parameters bit for bit."""
    name, _, model = family
    jaxinfer.save_model(model, tmp_path, max_shard_bytes=50_000)
    again = jaxinfer.load_model(tmp_path, dtype="float32")
    assert again.config == model.config, name
    jax.tree.map(np.testing.assert_array_equal, again.params, model.params)


# ----------------------------------------------------------------------------- config mapping

def _hf_json(name, **overrides) -> dict:
    cfg_cls, _, extra = FAMILY_CONFIGS[name]
    return json.loads(cfg_cls(**{**_BASE, **extra, **overrides}).to_json_string())


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_num_params_and_round_trip(name):
    cfg_cls, model_cls, extra = FAMILY_CONFIGS[name]
    raw = _hf_json(name)
    config = config_from_hf(raw)
    assert config.num_params() == sum(p.numel() for p in model_cls(cfg_cls(**{**_BASE, **extra})).parameters())
    assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config


def test_family_fields_map():
    gemma2 = config_from_hf(_hf_json("gemma2"))
    assert gemma2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.attn_scale) == (1.0, 2.0, 12**-0.5)
    assert gemma2.norm_plus_one and gemma2.embed_scale and gemma2.sandwich_norms and gemma2.hidden_act == "gelu_pytorch_tanh"
    gemma3 = config_from_hf(_hf_json("gemma3"))
    assert gemma3.qk_norm and gemma3.rope.type == "linear" and gemma3.rope_local.theta == 50.0
    assert [gemma3.layer_rope(i) for i in range(3)] == [1, 1, 0]
    assert [gemma3.layer_window(i) for i in range(3)] == [8, 8, None]
    qwen3 = config_from_hf(_hf_json("qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim == 16 and not qwen3.qkv_bias and qwen3.sliding_window is None
    moe = config_from_hf(_hf_json("qwen3_moe_norm"))
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_layers, moe.norm_topk_prob) == (8, 2, (1, 3), True)
    raw = config_from_hf(_hf_json("qwen3_moe_raw"))
    assert raw.moe_layers == (1, 2) and not raw.norm_topk_prob
    mixtral = config_from_hf(_hf_json("mixtral"))
    assert mixtral.moe_layers == (0, 1) and mixtral.norm_topk_prob and mixtral.sliding_window == 8
    assert mixtral.moe_intermediate_size == mixtral.intermediate_size
    phi3 = config_from_hf(_hf_json("phi3"))
    assert phi3.tie_word_embeddings and phi3.sliding_window == 8 and phi3.layer_types is None


def test_gemma3_hub_dialect_equals_transformers_reading():
    """The Hub's gemma-3 config.json spelling (rope_theta + rope_local_base_freq + rope_scaling,
    sliding_window_pattern, no layer_types) maps to what transformers 5 makes of it."""
    old = {"model_type": "gemma3_text", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
           "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
           "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
           "cache_implementation": "hybrid", "eos_token_id": [1, 106], "bos_token_id": 2}
    ours = config_from_hf(old)
    assert ours.layer_types == tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(8))
    assert ours.rope.factor == 8.0 and ours.rope.theta == 1e6 and ours.rope_local.theta == 1e4
    assert ours.eos_token_ids == (1, 106) and ours.tie_word_embeddings
    theirs = json.loads(transformers.Gemma3TextConfig(**{k: v for k, v in old.items() if k != "model_type"}).to_json_string())
    assert config_from_hf(theirs) == ours


@pytest.mark.parametrize("name, change, field", [
    ("gemma3", {"vision_config": {"hidden_size": 8}}, "vision_config"),
    ("gemma3", {"mm_tokens_per_image": 256}, "mm_tokens_per_image"),
    ("gemma3", {"model_type": "gemma3"}, "vision_config"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation"),
    ("gemma2", {"attention_bias": True}, "attention_bias"),
    ("gemma2", {"sliding_window": None}, "sliding_window"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                  "long_factor": [2.0] * 4}}, "longrope"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ("qwen3", {"num_experts": 4}, "num_experts"),
    ("qwen3_moe_norm", {"num_experts": 8, "num_local_experts": 4}, "num_local_experts"),
    ("qwen3_moe_norm", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("qwen3_moe_norm", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("mixtral", {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}}, "quantization_config"),
    ("mixtral", {"moe_intermediate_size": 16}, "moe_intermediate_size"),
    ("gemma3", {"layer_types": ["sliding_attention", "bogus", "full_attention"]}, "layer_types"),
])
def test_unsupported_settings_raise_naming_the_field(name, change, field):
    with pytest.raises(ConfigError, match=field):
        config_from_hf(_hf_json(name) | change)


# ----------------------------------------------------------------------------- presets

PUBLISHED = {  # parameter counts of the released checkpoints
    "qwen3-0.6b": 0.596e9, "qwen3-8b": 8.19e9, "qwen3-30b-a3b": 30.5e9, "gemma-3-1b": 1.0e9,
    "gemma-2-2b": 2.61e9, "phi-3-mini": 3.82e9, "mixtral-8x7b": 46.7e9,
}
HF_CLASSES = {"qwen3": transformers.Qwen3Config, "qwen3_moe": transformers.Qwen3MoeConfig,
              "gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig,
              "phi3": transformers.Phi3Config, "mixtral": transformers.MixtralConfig}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_family_presets(name):
    config = PRESETS[name]
    assert config.num_params() == pytest.approx(PUBLISHED[name], rel=0.01)
    hf = config_to_hf(config)
    assert config_from_hf(json.loads(json.dumps(hf))) == config
    theirs = HF_CLASSES[config.model_type](**{k: v for k, v in hf.items() if k != "model_type"})
    assert (theirs.num_hidden_layers, theirs.num_key_value_heads, theirs.head_dim) == (
        config.num_layers, config.num_kv_heads, config.head_dim)
    assert config_from_hf(json.loads(theirs.to_json_string())) == config


def test_qwen3_30b_active_params():
    # "A3B": ~3.3B parameters active per token (8 of 128 experts).
    c = PRESETS["qwen3-30b-a3b"]
    inactive = len(c.moe_layers) * (c.num_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
    assert c.num_params() - inactive == pytest.approx(3.35e9, rel=0.02)


# ----------------------------------------------------------------------------- layers and MoE

@pytest.mark.parametrize("moe_layers, segments", [
    ((), ((0, (False,), 6),)),
    ((0, 1, 2, 3, 4, 5), ((0, (True,), 6),)),
    ((1, 3, 5), ((0, (False, True), 3),)),  # decoder_sparse_step = 2: one scan of (dense, MoE) pairs
    ((1, 2, 3, 4, 5), ((0, (False,), 1), (1, (True,), 5))),  # a dense first layer: two scans
])
def test_layer_segments_group_not_unroll(moe_layers, segments):
    c = PRESETS["tiny"].replace(num_layers=6, num_experts=4 if moe_layers else 0, num_experts_per_tok=2,
                                moe_intermediate_size=8, moe_layers=moe_layers)
    assert layer_segments(c) == segments


def _moe_case(experts=16, k=2, tokens=64, d=32, f=24, norm=True):
    cfg = PRESETS["tiny"].replace(hidden_size=d, num_experts=experts, num_experts_per_tok=k, moe_intermediate_size=f,
                                  norm_topk_prob=norm, moe_layers=(0,))
    rng = np.random.default_rng(0)
    lp = {"router": jnp.asarray(rng.normal(size=(d, experts)), jnp.float32),
          "moe_gate": jnp.asarray(rng.normal(size=(experts, d, f)) * 0.2, jnp.float32),
          "moe_up": jnp.asarray(rng.normal(size=(experts, d, f)) * 0.2, jnp.float32),
          "moe_down": jnp.asarray(rng.normal(size=(experts, f, d)) * 0.2, jnp.float32)}
    return cfg, lp, jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)


def _all_experts(cfg, lp, x):
    """Every expert on every token, weighted by the routing (zero for the unchosen): the oracle."""
    weights, experts = route(cfg, x @ lp["router"])
    dense = jnp.zeros((x.shape[0], cfg.num_experts)).at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, lp["moe_gate"])) * jnp.einsum("nd,edf->nef", x, lp["moe_up"])
    return jnp.einsum("ne,nef,efd->nd", dense, h, lp["moe_down"])


@pytest.mark.parametrize("tokens", [3, 64, 200])  # tiles of 1 row (exact), 1 row, 2 rows with padding
@pytest.mark.parametrize("norm", [True, False])
def test_grouped_moe_equals_all_experts(tokens, norm):
    cfg, lp, x = _moe_case(tokens=tokens, norm=norm)
    # fp32 both sides, outputs O(1-10): they differ only in summation order (per-tile matmuls vs
    # one einsum over all experts, the zero weights included), ~1e-6; a wrong row or expert is O(1).
    np.testing.assert_allclose(np.asarray(moe_mlp(cfg, lp, x)), np.asarray(_all_experts(cfg, lp, x)),
                               rtol=1e-4, atol=1e-4)


def test_moe_computes_only_the_routed_experts():
    """FLOPs of the compiled HLO: the grouped MoE spends what moe_flops_per_token says, within
    1.25 x the ideal top_k / num_experts share; running all 16 experts costs ~6 x more (7.3 x the ideal)."""
    cfg, lp, x = _moe_case(experts=16, k=2, tokens=256)

    def flops(f):
        cost = jax.jit(f).lower(lp, x).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    routed = flops(lambda lp, x: moe_mlp(cfg, lp, x))
    dense = flops(lambda lp, x: _all_experts(cfg, lp, x))
    want = moe_flops_per_token(cfg, 256)
    assert tile_plan(512, 16) == (8, 78)  # 512 assignments: tiles of 8 rows, 624 rows (1.22 x the ideal)
    matmul = want["spent"] * 256
    assert matmul <= routed <= 1.1 * matmul, (routed, want)  # + softmax / top-k / scatter, a few %
    assert want["spent"] <= 1.25 * want["ideal"]
    assert routed * 6 < dense, (routed, dense)
