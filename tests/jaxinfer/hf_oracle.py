"""Random-weight Hugging Face checkpoints of any config, made locally: the numerical oracle."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
    MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM,
    Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
)

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             bos_token_id=1, eos_token_id=2)

# name -> (config class, model class, overrides). Each covers one feature the issue lists.
CONFIGS = {
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, {}),
    "llama_mha_tied": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3_rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16), rope_theta=500.0)),
    "llama_linear_rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama_bias_headdim": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True, head_dim=16,
                                                               num_attention_heads=8, num_key_value_heads=2)),
    "mistral_window": (MistralConfig, MistralForCausalLM, dict(sliding_window=8)),
    "qwen2_bias": (Qwen2Config, Qwen2ForCausalLM, dict(num_attention_heads=8, num_key_value_heads=2,
                                                       tie_word_embeddings=True)),
}


# The families of issue 16, each with its odd cases (tests/jaxinfer/test_model_families.py). Windows
# (8) are shorter than the test prompts (40); soft-caps are small so they bite on random weights.
FAMILY_CONFIGS = {
    # Explicit head_dim (16, not hidden / heads = 8), per-head q/k norms, no q/k/v bias.
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=True)),
    # Every second layer MoE (a periodic dense/MoE pattern), renormalised top-k.
    "qwen3_moe_norm": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(
        num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
        decoder_sparse_step=2)),
    # A dense first layer (mlp_only_layers), top-k probabilities not renormalised.
    "qwen3_moe_raw": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(
        num_hidden_layers=3, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=False,
        mlp_only_layers=[0])),
    # Alternating local/global, query_pre_attn_scalar != head_dim, both soft-caps biting.
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(
        num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=12, attn_logit_softcapping=1.0,
        final_logit_softcapping=2.0)),
    # Local layers with their own RoPE base, a global one with linear scaling; q/k norms.
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})),
    # Fused qkv_proj / gate_up_proj, tied embeddings, a sliding window (Phi-3-mini has 2047).
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(tie_word_embeddings=True, sliding_window=8, pad_token_id=0)),
    # 8 experts, top-2, sliding window.
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
                                                        intermediate_size=24)),
}


def make_checkpoint(path, name: str, seed: int = 0, **overrides):
    """save_pretrained a random model of CONFIGS[name] (or FAMILY_CONFIGS[name]) into `path`;
    returns the torch model. The families run transformers' eager attention: its reference
    implementation, and the only one with Gemma's logit soft-capping."""
    family = name in FAMILY_CONFIGS
    cfg_cls, model_cls, extra = FAMILY_CONFIGS[name] if family else CONFIGS[name]
    torch.manual_seed(seed)
    config = cfg_cls(**{**_BASE, **extra, **overrides})
    if family:
        config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():  # make biases and norms non-trivial so they are really tested
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            elif family and ("mlp.gate." in n or "block_sparse_moe.gate." in n):  # routers: clear top-k margins
                p.mul_(20.0)
            elif family and any(w in n for w in ("q_proj", "k_proj", "qkv_proj")):  # sharper attention, so
                p.mul_(6.0)  # windows and soft-caps change the result
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt, max_new_tokens: int, eos_token_id=None) -> list[int]:
    """HF greedy generate; returns the generated ids only (stopping after EOS if given)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos_token_id, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()
