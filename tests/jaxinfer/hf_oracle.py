"""Random-weight Hugging Face checkpoints of any config, made locally: the numerical oracle."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
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


def make_checkpoint(path, name: str, seed: int = 0, **overrides):
    """save_pretrained a random model of CONFIGS[name] into `path`; returns the torch model."""
    cfg_cls, model_cls, extra = CONFIGS[name]
    torch.manual_seed(seed)
    config = cfg_cls(**{**_BASE, **extra, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # make biases and norms non-trivial so they are really tested
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
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
