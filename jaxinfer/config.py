"""Model configuration: an explicit mapping from Hugging Face `config.json` to a frozen dataclass.

Every field of a config.json is in exactly one of three groups:
- mapped into `ModelConfig` (and its value checked where only some values are supported),
- ignored: listed with the reason it cannot change an inference forward pass (`_IGNORED` for
  every family, `_FAMILY_IGNORED` per family),
- anything else: a `ConfigError` naming the field. Nothing is dropped silently.

Families (model_type): llama, mistral, qwen2, qwen3, qwen3_moe, gemma2, gemma3_text, phi3,
mixtral. Which fields each reads is `_FAMILY_FIELDS`; transformers' defaults for fields that
change the forward pass and that older config.json files leave out are `_FAMILY_DEFAULTS`.

Both RoPE dialects are read: top-level `rope_theta` / `rope_scaling` (older checkpoints such as
stories260K) and the `rope_parameters` dict that transformers 5 writes (per layer type for
Gemma 3: `{"full_attention": {...}, "sliding_attention": {...}}`; the old Gemma 3 spelling is
`rope_theta` + `rope_scaling` for the global layers and `rope_local_base_freq` for the local ones).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.errors import ConfigError

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM",
}
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
_GEMMA = ("gemma2", "gemma3_text")
_MOE = ("mixtral", "qwen3_moe")
# Families whose quantized checkpoints load (one dense MLP per layer, no Gemma embedding scale,
# no fused tensors): quantization_config on any other is a ConfigError, and quantize() refuses.
QUANT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

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

# Per family: fields read beyond `_COMMON`, and fields ignored with the reason.
_COMMON = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
    "sliding_window", "layer_types", "bos_token_id", "eos_token_id",
}
_LLAMA_LIKE = {"attention_bias", "mlp_bias", "use_sliding_window", "hidden_act"}  # as before the families
_MOE_FIELDS = {"num_experts", "num_local_experts", "num_experts_per_tok"}
_GEMMA_FIELDS = {"attention_bias", "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping",
                 "final_logit_softcapping", "use_bidirectional_attention"}
_FAMILY_FIELDS = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE,
    "qwen3": {"attention_bias", "hidden_act", "use_sliding_window"},
    "qwen3_moe": {"attention_bias", "hidden_act", "use_sliding_window", "moe_intermediate_size", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers"} | _MOE_FIELDS,
    "mixtral": {"hidden_act"} | _MOE_FIELDS,
    "phi3": {"hidden_act", "partial_rotary_factor"},
    "gemma2": _GEMMA_FIELDS,
    "gemma3_text": _GEMMA_FIELDS | {"rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"},
}
_ROUTER_IGNORED = {
    "router_aux_loss_coef": "training loss weight",
    "output_router_logits": "HF output option (router logits for the training loss)",
}
_GEMMA_IGNORED = {
    "cache_implementation": "HF generate option; jaxinfer always uses its paged cache",
    "hidden_act": "Gemma's MLP reads hidden_activation; transformers never reads hidden_act",
}
_FAMILY_IGNORED = {
    "qwen3_moe": _ROUTER_IGNORED,
    "mixtral": _ROUTER_IGNORED | {"router_jitter_noise": "transformers adds router noise only in training mode"},
    "phi3": {"embd_pdrop": "dropout is inactive at inference", "resid_pdrop": "dropout is inactive at inference",
             "original_max_position_embeddings": "read only by longrope scaling, which is rejected"},
    "gemma2": _GEMMA_IGNORED,
    "gemma3_text": _GEMMA_IGNORED,
}
# transformers' defaults where they change the forward pass (or the context limit) and Hub
# config.json files may omit them.
_FAMILY_DEFAULTS = {
    "qwen3": dict(max_position_embeddings=32768),
    "qwen3_moe": dict(num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=32768),
    "mixtral": dict(num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072),
    "phi3": dict(rms_norm_eps=1e-5, max_position_embeddings=4096),
    "gemma2": dict(head_dim=256, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, max_position_embeddings=8192),
    "gemma3_text": dict(head_dim=256, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                        query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1e6,
                        rope_local_base_freq=10000.0, max_position_embeddings=131072),
}
_DEFAULT_EXPERTS = {"qwen3_moe": 128, "mixtral": 8}
# Gemma 3's multimodal (Gemma3ForConditionalGeneration) fields: named, so a vision checkpoint's
# config says what it is instead of listing unknown fields.
_VISION_FIELDS = {"vision_config", "text_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index",
                  "image_token_index", "image_token_id", "boi_token_id", "eoi_token_id", "vision_soft_tokens_per_image"}

_ROPE_KEYS = {
    "rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings", "partial_rotary_factor",
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
    """Static architecture of a decoder-only model of one of the supported families. Frozen and
    hashable: a jit static argument. Per-layer variation is data here (`layer_types`, the two
    RoPE configs, `moe_layers`), read by the one layer body of jaxinfer/model.py."""

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
    sliding_window: int | None = None  # a query sees itself and the previous W-1 keys
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    quant: QuantConfig | None = None  # quantized linear layers (quantization_config); None: dense
    # Per layer "sliding_attention" (the window applies) or "full_attention"; None: every layer
    # alike (all sliding when sliding_window is set: Mistral, Mixtral, Phi-3). Gemma 2 alternates,
    # Gemma 3 has 5 local : 1 global. Only mixed lists are stored (config_from_hf normalises).
    layer_types: tuple[str, ...] | None = None
    rope_local: RopeConfig | None = None  # Gemma 3: the sliding layers' RoPE; None: all use `rope`
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k, before RoPE
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w), computed in float32
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size), in the activation dtype
    hidden_act: str = "silu"  # the MLP gate: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    sandwich_norms: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by this ** -0.5, not head_dim's
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    # Mixture of experts (Mixtral, Qwen3-MoE): layers in moe_layers route each token to its top
    # num_experts_per_tok of num_experts MLPs of width moe_intermediate_size (jaxinfer/moe.py);
    # norm_topk_prob renormalises the chosen probabilities (always for Mixtral).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()

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
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ConfigError(f"layer_types must list one of {LAYER_TYPES} per layer ({self.num_layers}), "
                                  f"got {list(self.layer_types)}")
            if self.sliding_window is None and "sliding_attention" in self.layer_types:
                raise ConfigError("layer_types has sliding_attention layers but sliding_window is null")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act = {self.hidden_act!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}")
        for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive or null, got {value!r}")
        self._check_moe()
        group = self.quant.group_size if self.quant is not None else None
        if group is not None:
            for name, k in (("hidden_size", self.hidden_size), ("num_heads * head_dim", self.q_size),
                            ("intermediate_size", self.intermediate_size)):
                if k % group:
                    raise ConfigError(
                        f"quantization_config.group_size = {group} does not divide {name} = {k} "
                        "(the input width of a quantized linear layer)"
                    )

    def _check_moe(self):
        if self.num_experts == 0:
            if self.moe_layers:
                raise ConfigError(f"moe_layers = {list(self.moe_layers)} without experts (num_experts = 0)")
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok = {self.num_experts_per_tok} must be in [1, num_experts = "
                              f"{self.num_experts}]")
        if self.moe_intermediate_size <= 0:
            raise ConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        if list(self.moe_layers) != sorted(set(self.moe_layers)) or not set(self.moe_layers) <= set(range(self.num_layers)):
            raise ConfigError(f"moe_layers must be distinct increasing layer indices < {self.num_layers}, "
                              f"got {list(self.moe_layers)}")
        if self.quant is not None:
            raise ConfigError("quantization_config is not supported for mixture-of-experts models")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attn_scale(self) -> float:
        """The attention score scale: query_pre_attn_scalar ** -0.5 (Gemma) or head_dim ** -0.5."""
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim) ** -0.5

    def layer_window(self, i: int) -> int | None:
        """Layer i's sliding window (None: it attends to every earlier position)."""
        if self.layer_types is not None and self.layer_types[i] != "sliding_attention":
            return None
        return self.sliding_window

    def layer_rope(self, i: int) -> int:
        """Which RoPE layer i uses: 0 = `rope`, 1 = `rope_local` (Gemma 3's sliding layers)."""
        return int(self.rope_local is not None and self.layer_window(i) is not None)

    def is_moe(self, i: int) -> bool:
        return i in self.moe_layers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, v, layers = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + d * self.o_bias + 2 * self.head_dim * self.qk_norm
        norms = (4 if self.sandwich_norms else 2) * d
        dense = 3 * d * f + (2 * f + d) * self.mlp_bias
        moe = d * self.num_experts + self.num_experts * 3 * d * self.moe_intermediate_size
        n_moe = len(self.moe_layers)
        per_layers = layers * (attn + norms) + (layers - n_moe) * dense + n_moe * moe
        return v * d * (1 if self.tie_word_embeddings else 2) + per_layers + d


def _rope_from_dict(raw: dict[str, Any], theta: float | None, where: str) -> RopeConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object, got {raw!r}")
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        hint = " (Phi-3's long-context scaling is not implemented)" if rope_type in ("longrope", "su") else ""
        raise ConfigError(
            f"{where}.rope_type = {rope_type!r} is not supported{hint}; supported: {SUPPORTED_ROPE_TYPES}"
        )
    unknown = sorted(set(raw) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(f"unsupported field(s) {unknown} in {where}; supported: {sorted(_ROPE_KEYS)}")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}.partial_rotary_factor = {raw['partial_rotary_factor']} (RoPE on part of each "
                          "head) is not supported; only 1.0")
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


def _ropes(raw: dict[str, Any], model_type: str) -> tuple[RopeConfig, RopeConfig | None]:
    """(the RoPE of global layers, that of Gemma 3's local layers or None when they share it)."""
    params, scaling = raw.get("rope_parameters"), raw.get("rope_scaling")
    if params is not None and scaling is not None:
        raise ConfigError("both rope_parameters and rope_scaling are set; expected one dialect")
    if model_type == "phi3" and raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor = {raw['partial_rotary_factor']} (RoPE on part of each head) "
                          "is not supported; only 1.0")
    if model_type != "gemma3_text":
        if params is not None:
            return _rope_from_dict(params, raw.get("rope_theta"), "rope_parameters"), None
        return _rope_from_dict(scaling or {}, raw.get("rope_theta"), "rope_scaling"), None
    # Gemma 3: scaling (e.g. linear x8 on the 4B+ models) applies to the global layers only.
    if params is not None:
        if not isinstance(params, dict) or not set(params) <= set(LAYER_TYPES):
            raise ConfigError(f"rope_parameters for gemma3_text must be keyed by layer type {LAYER_TYPES}, "
                              f"got {params!r}")
        full = _rope_from_dict(params.get("full_attention") or {}, raw.get("rope_theta"),
                               "rope_parameters.full_attention")
        local = _rope_from_dict(params.get("sliding_attention") or {}, raw.get("rope_local_base_freq"),
                                "rope_parameters.sliding_attention")
    else:
        full = _rope_from_dict(scaling or {}, raw.get("rope_theta"), "rope_scaling")
        local = RopeConfig(theta=float(raw["rope_local_base_freq"]))
    return full, (None if local == full else local)


def _attention_layers(raw: dict[str, Any], model_type: str) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types normalised: None when every layer is alike)."""
    window = raw.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):  # the window applies only with use_sliding_window
        if raw.get("use_sliding_window", False):
            raise ConfigError("use_sliding_window = true (Qwen per-layer sliding window) is not supported")
        window = None
    elif "use_sliding_window" in raw:
        raise ConfigError(f"use_sliding_window is not a {model_type} field")
    if model_type == "llama" and window is not None:
        raise ConfigError("sliding_window is not a llama field")
    types = raw.get("layer_types")
    if model_type not in _GEMMA:  # one kind of layer: the window (if any) applies everywhere
        if types is not None:
            expected = "sliding_attention" if window is not None else "full_attention"
            if any(t != expected for t in types):
                raise ConfigError(f"layer_types = {types}: only all-{expected!r} is supported")
        return window, None
    if raw.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention = true is not supported (causal decoding only)")
    if types is None:  # transformers' default patterns: Gemma 2 alternates, Gemma 3 is 5 local : 1 global
        pattern = 2 if model_type == "gemma2" else raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6))
        if not isinstance(pattern, int) or pattern < 1:
            raise ConfigError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(raw["num_hidden_layers"])]
    types = tuple(types)
    if set(types) - set(LAYER_TYPES):
        raise ConfigError(f"layer_types = {list(types)}: entries must be one of {LAYER_TYPES}")
    if window is None and "sliding_attention" in types:
        raise ConfigError("sliding_window is null but layer_types has sliding_attention layers")
    if all(t == "full_attention" for t in types):
        return None, None
    if all(t == "sliding_attention" for t in types):
        return window, None
    return window, types


def _experts(raw: dict[str, Any], model_type: str) -> dict[str, Any]:
    """ModelConfig's MoE fields: Mixtral routes every layer through experts of width
    intermediate_size; Qwen3-MoE every layer not in mlp_only_layers whose (index + 1) is a
    multiple of decoder_sparse_step, through experts of width moe_intermediate_size."""
    if model_type not in _MOE:
        return {}
    named = {n: raw[n] for n in ("num_experts", "num_local_experts") if n in raw}
    if len(set(named.values())) > 1:
        raise ConfigError(f"num_experts and num_local_experts disagree: {named}")
    experts = next(iter(named.values()), _DEFAULT_EXPERTS[model_type])
    for name, value in (("num_experts", experts), ("num_experts_per_tok", raw["num_experts_per_tok"])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    layers = raw["num_hidden_layers"]
    if model_type == "mixtral":
        return dict(num_experts=experts, num_experts_per_tok=raw["num_experts_per_tok"],
                    moe_intermediate_size=raw["intermediate_size"], norm_topk_prob=True, moe_layers=tuple(range(layers)))
    step, only = raw["decoder_sparse_step"], raw["mlp_only_layers"] or []
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ConfigError(f"decoder_sparse_step must be a positive integer, got {step!r}")
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise ConfigError(f"mlp_only_layers must be a list of layer indices, got {only!r}")
    moe_layers = tuple(i for i in range(layers) if experts > 0 and i not in only and (i + 1) % step == 0)
    return dict(num_experts=experts, num_experts_per_tok=raw["num_experts_per_tok"],
                moe_intermediate_size=raw["moe_intermediate_size"], norm_topk_prob=bool(raw["norm_topk_prob"]),
                moe_layers=moe_layers)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Map a parsed HF config.json dict to a ModelConfig. Raises ConfigError naming any bad field."""
    model_type = raw.get("model_type")
    if model_type == "gemma3":
        raise ConfigError(
            "model_type = 'gemma3' (Gemma3ForConditionalGeneration: vision_config, text_config) is not supported: "
            "jaxinfer loads text-only Gemma 3 checkpoints (model_type 'gemma3_text', Gemma3ForCausalLM)"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type = {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    vision = sorted(set(raw) & _VISION_FIELDS)
    if vision:
        raise ConfigError(f"vision / multimodal field(s) {vision} in a text-only {model_type} config: jaxinfer "
                          "runs the text model only (for Gemma 3: Gemma3ForCausalLM, model_type 'gemma3_text')")
    quant = _quant_from_hf(raw["quantization_config"]) if "quantization_config" in raw else None
    if quant is not None and model_type not in QUANT_MODEL_TYPES:
        raise ConfigError(f"quantization_config is not supported for model_type {model_type!r}")
    known = _COMMON | _FAMILY_FIELDS[model_type] | set(_IGNORED) | set(_FAMILY_IGNORED.get(model_type, {}))
    unknown = sorted(set(raw) - known - {"quantization_config"})
    if unknown:
        raise ConfigError(
            f"unsupported config field(s) {unknown} for model_type {model_type!r}: jaxinfer maps "
            "config fields explicitly and will not ignore one it does not understand"
        )
    raw = {**_FAMILY_DEFAULTS.get(model_type, {}), **raw}
    gemma = model_type in _GEMMA
    act_field = "hidden_activation" if gemma else "hidden_act"
    act = raw.get(act_field, "silu")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise ConfigError(f"{act_field} = {act!r} is not supported; only {'gelu_pytorch_tanh' if gemma else 'silu'!r}")
    rope, rope_local = _ropes(raw, model_type)
    window, layer_types = _attention_layers(raw, model_type)

    num_heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    attention_bias = bool(raw.get("attention_bias", False))
    if attention_bias and model_type != "llama":
        raise ConfigError(f"attention_bias = true is not a supported {model_type} setting")

    def optional_float(name):
        return None if raw.get(name) is None else float(raw[name])

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
            layer_types=layer_types,
            rope_local=rope_local,
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            norm_plus_one=gemma,
            embed_scale=gemma,
            hidden_act=act,
            sandwich_norms=gemma,
            query_pre_attn_scalar=optional_float("query_pre_attn_scalar") if gemma else None,
            attn_softcap=optional_float("attn_logit_softcapping") if gemma else None,
            final_softcap=optional_float("final_logit_softcapping") if gemma else None,
            **_experts(raw, model_type),
        )
    except KeyError as e:
        raise ConfigError(f"config.json is missing required field {e.args[0]!r}") from None


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": rope.type, "rope_theta": rope.theta}
    if rope.type in ("linear", "llama3"):
        out["factor"] = rope.factor
    if rope.type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    return out


def _int_if_whole(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x  # HF types query_pre_attn_scalar as int


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF config.json dict for `config`; `config_from_hf` reads it back as an equal config."""
    eos = config.eos_token_ids
    mt = config.model_type
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[mt]],
        "model_type": mt,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": _rope_to_hf(config.rope),
        "hidden_act": config.hidden_act,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) or None),
    }
    # Qwen2's q/k/v bias is implied by its model_type; Llama's attention_bias covers q/k/v/o.
    if mt in ("llama", "mistral") and (mt == "llama" or config.qkv_bias):
        hf["attention_bias"] = config.qkv_bias
    if mt == "llama" or config.mlp_bias:
        hf["mlp_bias"] = config.mlp_bias
    if mt in ("mistral", "mixtral", "phi3", "gemma2", "gemma3_text"):
        hf["sliding_window"] = config.sliding_window
    if mt in ("qwen2", "qwen3", "qwen3_moe"):
        hf["use_sliding_window"] = False
    if mt == "mixtral":
        hf.update(num_local_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok)
    if mt == "qwen3_moe":
        hf.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                  moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=[i for i in range(config.num_layers) if not config.is_moe(i)])
    if mt in _GEMMA:
        del hf["hidden_act"]
        hf.update(hidden_activation=config.hidden_act, query_pre_attn_scalar=_int_if_whole(config.query_pre_attn_scalar),
                  attn_logit_softcapping=config.attn_softcap, final_logit_softcapping=config.final_softcap,
                  layer_types=["sliding_attention" if config.layer_window(i) is not None else "full_attention"
                               for i in range(config.num_layers)])
    if mt == "gemma3_text":
        hf["rope_parameters"] = {"full_attention": _rope_to_hf(config.rope),
                                 "sliding_attention": _rope_to_hf(config.rope_local or config.rope)}
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
