"""Named model shapes: real checkpoints' configs (for dummy-weight benchmarks at true size) and
small synthetic ones for tests and CPU benchmarks. Every preset round-trips through
`config.config_to_hf` / `config.config_from_hf`."""

from __future__ import annotations

import os
from pathlib import Path

from jaxinfer.config import ModelConfig, RopeConfig

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
