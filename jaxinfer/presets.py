"""Named model shapes: real checkpoints' configs (for dummy-weight benchmarks at true size) and
small synthetic ones for tests and CPU benchmarks. Every preset round-trips through
`config.config_to_hf` / `config.config_from_hf`."""

from __future__ import annotations

import os
from pathlib import Path

from jaxinfer.config import ModelConfig, RopeConfig


def _alternating(layers: int, period: int) -> tuple[str, ...]:
    """Gemma's layer pattern: every period-th layer global, the others local (sliding)."""
    return tuple("full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers))


PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0, type="llama3", factor=32.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0),
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "llama-2-7b": ModelConfig(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0), bos_token_id=1, eos_token_ids=(2,),
    ),
    # Qwen/Qwen2-0.5B: q/k/v biases (implied by model_type qwen2), tied embeddings.
    "qwen2-0.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-6, rope=RopeConfig(theta=1000000.0), tie_word_embeddings=True,
        qkv_bias=True, bos_token_id=151643, eos_token_ids=(151643,),
    ),
    # Qwen/Qwen3-0.6B and Qwen3-8B: per-head q/k norms, head_dim 128 (not hidden / heads for 0.6B).
    "qwen3-0.6b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope=RopeConfig(theta=1000000.0), tie_word_embeddings=True, qk_norm=True,
        bos_token_id=151643, eos_token_ids=(151645,),
    ),
    "qwen3-8b": ModelConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope=RopeConfig(theta=1000000.0), qk_norm=True,
        bos_token_id=151643, eos_token_ids=(151645,),
    ),
    # Qwen/Qwen3-30B-A3B: 128 experts of width 768, top-8 renormalised, every layer MoE.
    "qwen3-30b-a3b": ModelConfig(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope=RopeConfig(theta=1000000.0), qk_norm=True,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        moe_layers=tuple(range(48)), bos_token_id=151643, eos_token_ids=(151645,),
    ),
    # google/gemma-3-1b-it: 5 local (window 512, RoPE base 10k) : 1 global (base 1M) layers.
    "gemma-3-1b": ModelConfig(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope=RopeConfig(theta=1000000.0), rope_local=RopeConfig(theta=10000.0),
        tie_word_embeddings=True, sliding_window=512, layer_types=_alternating(26, 6),
        qk_norm=True, norm_plus_one=True, embed_scale=True, hidden_act="gelu_pytorch_tanh", sandwich_norms=True,
        query_pre_attn_scalar=256.0, bos_token_id=2, eos_token_ids=(1, 106),
    ),
    # google/gemma-2-2b: local (window 4096) and global layers alternate; both soft-caps.
    "gemma-2-2b": ModelConfig(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256, max_position_embeddings=8192,
        rms_norm_eps=1e-6, rope=RopeConfig(theta=10000.0), tie_word_embeddings=True, sliding_window=4096,
        layer_types=_alternating(26, 2), norm_plus_one=True, embed_scale=True, hidden_act="gelu_pytorch_tanh",
        sandwich_norms=True, query_pre_attn_scalar=256.0, attn_softcap=50.0, final_softcap=30.0,
        bos_token_id=2, eos_token_ids=(1,),
    ),
    # microsoft/Phi-3-mini-4k-instruct: fused qkv / gate_up in the checkpoint, window 2047.
    "phi-3-mini": ModelConfig(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=96, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0), sliding_window=2047,
        bos_token_id=1, eos_token_ids=(32000,),
    ),
    # mistralai/Mixtral-8x7B-v0.1: 8 experts of width 14336, top-2.
    "mixtral-8x7b": ModelConfig(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope=RopeConfig(theta=1000000.0), num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=14336, norm_topk_prob=True, moe_layers=tuple(range(32)),
        bos_token_id=1, eos_token_ids=(2,),
    ),
    # ~0.87M params; vocab matches a byte tokenizer (256 bytes + BOS 256 + EOS 257). Untied, so
    # tests exercise the lm_head path (stories260K covers tied).
    "tiny": ModelConfig(
        model_type="llama", vocab_size=258, hidden_size=64, intermediate_size=1024,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-5, bos_token_id=256, eos_token_ids=(257,),
    ),
    # ~21M params for CPU benchmarks: big enough that matmuls dominate per-step overhead.
    "llama-20m": ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=512, intermediate_size=1152,
        num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}") from None


def default_model_dir() -> Path | None:
    """The built-in default checkpoint: $JAXINFER_DEFAULT_MODEL, else the real pretrained
    stories260K of the shared test assets next to the repository (../shared/assets/stories260K,
    looked up beside the package and beside the working directory); None when neither exists
    (the CLI then falls back to the random-weight "tiny" preset)."""
    env = os.environ.get("JAXINFER_DEFAULT_MODEL")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[1]
    candidates += [repo.parent / "shared" / "assets" / "stories260K",
                   Path.cwd().parent / "shared" / "assets" / "stories260K"]
    return next((c for c in candidates if (c / "config.json").exists()), None)
