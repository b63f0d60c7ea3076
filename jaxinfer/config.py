"""Model configuration: an explicit mapping from Hugging Face `config.json` to a frozen dataclass.

Every field of a config.json is in exactly one of three groups:
- mapped into `ModelConfig` (and its value checked where only some values are supported),
- `_IGNORED`: listed with the reason it cannot change an inference forward pass,
- anything else: a `ConfigError` naming the field. Nothing is dropped silently.

Both RoPE dialects are read: top-level `rope_theta` / `rope_scaling` (older checkpoints such as
stories260K) and the `rope_parameters` dict that transformers 5 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Fields that cannot change the inference forward pass, with the reason.
_IGNORED = {
    "architectures": "model class name; model_type decides the architecture",
    "transformers_version": "provenance",
    "torch_dtype": "storage dtype; load_model(dtype=...) decides the compute dtype",
    "dtype": "storage dtype; load_model(dtype=...) decides the compute dtype",
    "initializer_range": "training-time init",
    "use_cache": "HF generate option; jaxinfer always uses its paged cache",
    "attention_dropout": "dropout is inactive at inference",
    "pretraining_tp": "HF's tensor-parallel slicing computes the same product",
    "pad_token_id": "padding is masked by lengths, never by a pad id",
    "_name_or_path": "provenance",
    "tokenizer_class": "tokenizer is read from tokenizer.json",
    "output_attentions": "HF output option",
    "output_hidden_states": "HF output option",
    "return_dict": "HF output option",
    "max_window_layers": "only used with use_sliding_window, which is checked",
}

_MAPPED = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "layer_types",
    "bos_token_id", "eos_token_id", "hidden_act",
}

_ROPE_KEYS = {
    "rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (HF `rope_type` default / linear / llama3)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim // 2], float32, computed as transformers computes them."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        inv = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.type == "llama3":
            old_ctx = self.original_max_position_embeddings
            low_wavelen = old_ctx / self.low_freq_factor
            high_wavelen = old_ctx / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old_ctx / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        return inv


_GPTQ_BITS = (2, 3, 4, 8)
_GPTQ_FORMATS = ("gptq", "gptq_v2")
_BNB_4BIT_TYPES = ("nf4", "fp4")
# quantization_config fields that cannot change the forward pass of the saved checkpoint.
_QUANT_IGNORED = {
    "meta": "GPTQ quantizer provenance and calibration settings (gptqmodel)",
    "damp_percent": "GPTQ calibration setting", "damp_auto_increment": "GPTQ calibration setting",
    "static_groups": "GPTQ calibration setting (g_idx in the checkpoint decides grouping)",
    "true_sequential": "GPTQ calibration setting", "mse": "GPTQ calibration setting",
    "model_name_or_path": "provenance", "model_file_base_name": "provenance",
    "quantizer": "provenance", "method": "GPTQ algorithm name (quant_method decides the format)",
    "bnb_4bit_compute_dtype": "bitsandbytes compute dtype; load_model(dtype=...) decides it",
    "_load_in_4bit": "duplicate of load_in_4bit", "_load_in_8bit": "duplicate of load_in_8bit",
}
_GPTQ_KEYS = {"quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "format",
              "lm_head", "pack_dtype"}
_BNB_KEYS = {
    "quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage", "llm_int8_threshold", "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight",
}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's linear layers (q/k/v/o, gate/up/down) are quantized; see jaxinfer.quant.

    method "gptq": `bits`-bit integer codes, groups of `group_size` input rows (None: one group
    per output channel), `sym`, `desc_act` (act-order g_idx), `checkpoint_format` "gptq" (v1:
    stored zero points are zero - 1) or "gptq_v2". method "bitsandbytes": bits 8 (LLM.int8 weights,
    `int8_threshold` > 0 selects the outlier-decomposed matmul) or bits 4 with `quant_type`
    nf4 / fp4 and `double_quant`. Embeddings, norms and lm_head always stay dense.
    """

    method: str
    bits: int
    group_size: int | None = None
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str | None = None
    quant_type: str | None = None
    double_quant: bool = False
    int8_threshold: float = 0.0


def _quant_from_hf(raw: Any) -> QuantConfig:
    where = "quantization_config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object, got {raw!r}")
    method = raw.get("quant_method")
    if method not in ("gptq", "bitsandbytes"):
        raise ConfigError(f"{where}.quant_method = {method!r} is not supported; supported: ['gptq', 'bitsandbytes']")
    known = _GPTQ_KEYS if method == "gptq" else _BNB_KEYS
    unknown = sorted(set(raw) - known - set(_QUANT_IGNORED))
    if unknown:
        raise ConfigError(f"unsupported {where} field(s) {unknown} for quant_method {method!r}")

    def flag(key: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
        return value

    if method == "gptq":
        for key in ("bits", "group_size"):
            if key not in raw:
                raise ConfigError(f"{where}.{key} is required for quant_method 'gptq'")
        bits = raw["bits"]
        if bits not in _GPTQ_BITS or isinstance(bits, bool):
            raise ConfigError(f"{where}.bits = {bits!r} is not supported; supported: {list(_GPTQ_BITS)}")
        group = raw["group_size"]
        if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
            raise ConfigError(f"{where}.group_size = {group!r} must be a positive integer or -1 (per channel)")
        fmt = raw.get("checkpoint_format", raw.get("format", "gptq"))
        if "format" in raw and raw["format"] != fmt:
            raise ConfigError(f"{where}.format = {raw['format']!r} contradicts checkpoint_format = {fmt!r}")
        if fmt not in _GPTQ_FORMATS:
            raise ConfigError(f"{where}.checkpoint_format = {fmt!r} is not supported; supported: {list(_GPTQ_FORMATS)}")
        if raw.get("pack_dtype", "int32") != "int32":
            raise ConfigError(f"{where}.pack_dtype = {raw['pack_dtype']!r} is not supported; only 'int32'")
        if flag("lm_head", False):
            raise ConfigError(f"{where}.lm_head = true (a quantized lm_head) is not supported")
        return QuantConfig(method="gptq", bits=bits, group_size=None if group == -1 else group,
                           sym=flag("sym", True), desc_act=flag("desc_act", False), checkpoint_format=fmt)

    in4, in8 = flag("load_in_4bit", False), flag("load_in_8bit", False)
    for key, value in (("_load_in_4bit", in4), ("_load_in_8bit", in8)):
        if key in raw and raw[key] != value:
            raise ConfigError(f"{where}.{key} = {raw[key]!r} contradicts {key[1:]} = {value!r}")
    if in4 == in8:
        raise ConfigError(f"{where}: exactly one of load_in_4bit and load_in_8bit must be true")
    if flag("llm_int8_enable_fp32_cpu_offload", False):
        raise ConfigError(f"{where}.llm_int8_enable_fp32_cpu_offload = true is not supported")
    if flag("llm_int8_has_fp16_weight", False):
        raise ConfigError(f"{where}.llm_int8_has_fp16_weight = true (unquantized weights) is not supported")
    skip = raw.get("llm_int8_skip_modules")
    if skip is not None and (not isinstance(skip, list) or set(skip) - {"lm_head"}):
        raise ConfigError(
            f"{where}.llm_int8_skip_modules = {skip!r} is not supported; only null or ['lm_head'] "
            "(lm_head is never quantized)"
        )
    if in8:
        threshold = raw.get("llm_int8_threshold", 6.0)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold < 0:
            raise ConfigError(f"{where}.llm_int8_threshold = {threshold!r} must be a non-negative number")
        return QuantConfig(method="bitsandbytes", bits=8, group_size=None, sym=True,
                           int8_threshold=float(threshold))
    qtype = raw.get("bnb_4bit_quant_type", "fp4")
    if qtype not in _BNB_4BIT_TYPES:
        raise ConfigError(f"{where}.bnb_4bit_quant_type = {qtype!r} is not supported; supported: {list(_BNB_4BIT_TYPES)}")
    if raw.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise ConfigError(f"{where}.bnb_4bit_quant_storage = {raw['bnb_4bit_quant_storage']!r} is not supported; only 'uint8'")
    # blocksize is not in the config: bitsandbytes defaults to 64; each tensor's quant_state says.
    return QuantConfig(method="bitsandbytes", bits=4, group_size=64, quant_type=qtype,
                       double_quant=flag("bnb_4bit_use_double_quant", False))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static architecture of a Llama-family decoder. Frozen and hashable: a jit static argument."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always; Llama: attention_bias
    o_bias: bool = False  # Llama attention_bias also biases o_proj; Qwen2 never does
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query sees itself and the previous W-1 keys
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    quant: QuantConfig | None = None  # quantized linear layers (quantization_config); None: dense

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")
        group = self.quant.group_size if self.quant is not None else None
        if group is not None:
            for name, k in (("hidden_size", self.hidden_size), ("num_heads * head_dim", self.q_size),
                            ("intermediate_size", self.intermediate_size)):
                if k % group:
                    raise ConfigError(
                        f"quantization_config.group_size = {group} does not divide {name} = {k} "
                        "(the input width of a quantized linear layer)"
                    )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, v, layers = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f + 2 * d
        per_layer += (self.q_size + 2 * self.kv_size) * self.qkv_bias + d * self.o_bias
        per_layer += (2 * f + d) * self.mlp_bias
        return v * d * (1 if self.tie_word_embeddings else 2) + layers * per_layer + d


def _rope_from_dict(raw: dict[str, Any], theta: float | None, where: str) -> RopeConfig:
    unknown = sorted(set(raw) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(f"unsupported field(s) {unknown} in {where}; supported: {sorted(_ROPE_KEYS)}")
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{where}.rope_type = {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    theta = raw.get("rope_theta", theta)
    if theta is None:
        theta = 10000.0
    fields: dict[str, Any] = {"theta": float(theta), "type": rope_type}
    needed = {
        "default": (),
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    }[rope_type]
    for key in needed:
        if key not in raw:
            raise ConfigError(f"{where} with rope_type {rope_type!r} needs field {key!r}")
        fields[key] = raw[key]
    if rope_type == "llama3" and fields["high_freq_factor"] == fields["low_freq_factor"]:
        raise ConfigError(f"{where}: llama3 high_freq_factor must differ from low_freq_factor")
    return RopeConfig(**fields)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Map a parsed HF config.json dict to a ModelConfig. Raises ConfigError naming any bad field."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type = {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    quant = _quant_from_hf(raw["quantization_config"]) if "quantization_config" in raw else None
    unknown = sorted(set(raw) - _MAPPED - set(_IGNORED) - {"quantization_config"})
    if unknown:
        raise ConfigError(
            f"unsupported config field(s) {unknown} for model_type {model_type!r}: jaxinfer maps "
            "config fields explicitly and will not ignore one it does not understand"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act = {raw['hidden_act']!r} is not supported; only 'silu'")

    # RoPE: transformers 5 writes rope_parameters; older files have rope_theta + rope_scaling.
    if raw.get("rope_parameters") is not None:
        if raw.get("rope_scaling") is not None:
            raise ConfigError("both rope_parameters and rope_scaling are set; expected one dialect")
        rope = _rope_from_dict(raw["rope_parameters"], raw.get("rope_theta"), "rope_parameters")
    else:
        rope = _rope_from_dict(raw.get("rope_scaling") or {}, raw.get("rope_theta"), "rope_scaling")

    # Sliding window: Mistral applies it to every layer; Qwen2 only if use_sliding_window.
    window = raw.get("sliding_window")
    if model_type == "qwen2":
        if raw.get("use_sliding_window", False):
            raise ConfigError("use_sliding_window = true (Qwen2 per-layer sliding window) is not supported")
        window = None
    elif "use_sliding_window" in raw:
        raise ConfigError(f"use_sliding_window is not a {model_type} field")
    if model_type == "llama" and window is not None:
        raise ConfigError("sliding_window is not a llama field")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        expected = "sliding_attention" if window is not None else "full_attention"
        if any(t != expected for t in layer_types):
            raise ConfigError(f"layer_types = {layer_types}: only all-{expected!r} is supported")

    num_heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    attention_bias = bool(raw.get("attention_bias", False))
    if attention_bias and model_type != "llama":
        raise ConfigError(f"attention_bias = true is not a {model_type} setting (transformers ignores it there)")
    try:
        return ModelConfig(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=window,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            quant=quant,
        )
    except KeyError as e:
        raise ConfigError(f"config.json is missing required field {e.args[0]!r}") from None


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF config.json dict for `config`; `config_from_hf` reads it back as an equal config."""
    rope = config.rope
    rope_parameters: dict[str, Any] = {"rope_type": rope.type, "rope_theta": rope.theta}
    if rope.type in ("linear", "llama3"):
        rope_parameters["factor"] = rope.factor
    if rope.type == "llama3":
        rope_parameters.update(
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    eos = config.eos_token_ids
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope_parameters,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) or None),
    }
    # Qwen2's q/k/v bias is implied by its model_type; Llama's attention_bias covers q/k/v/o.
    if config.model_type != "qwen2" and (config.model_type == "llama" or config.qkv_bias):
        hf["attention_bias"] = config.qkv_bias
    if config.model_type == "llama" or config.mlp_bias:
        hf["mlp_bias"] = config.mlp_bias
    if config.model_type == "mistral":
        hf["sliding_window"] = config.sliding_window
    if config.model_type == "qwen2":
        hf["use_sliding_window"] = False
    # Some ModelConfigs (e.g. Llama with q/k/v bias but no o bias) have no HF spelling.
    if config_from_hf(hf) != config:
        raise ConfigError(
            f"{config} cannot be written as an HF config.json: it would read back as {config_from_hf(hf)}"
        )
    return hf


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no config.json at {file}")
    try:
        with open(file) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); expected the checkpoint's config.json object") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a JSON object of config fields, got {type(raw).__name__}")
    return config_from_hf(raw)
