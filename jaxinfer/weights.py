"""Hugging Face safetensors checkpoints <-> `Model`, and random models for tests and benchmarks.

One table, `hf_tensor_specs(config)`, names every tensor a checkpoint must hold, its HF shape and
where it goes in the parameter PyTree (see jaxinfer/model.py). Loading checks the whole
checkpoint against that table (from the safetensors headers alone) before reading any data,
so a bad checkpoint fails fast with one error that lists every problem.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safe_open(framework="numpy") reads bf16
import numpy as np
from jax.typing import DTypeLike
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig, config_from_hf, load_config
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.model import Model

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_STORAGE = {"F64", "F32", "F16", "BF16"}
_PROGRESS_BYTES = 100 * 2**20

# HF module (under model.layers.{i}.) -> our weight and bias names.
_LINEARS = {
    "self_attn.q_proj": ("wq", "bq"),
    "self_attn.k_proj": ("wk", "bk"),
    "self_attn.v_proj": ("wv", "bv"),
    "self_attn.o_proj": ("wo", "bo"),
    "mlp.gate_proj": ("w_gate", "b_gate"),
    "mlp.up_proj": ("w_up", "b_up"),
    "mlp.down_proj": ("w_down", "b_down"),
}
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class TensorSpec(NamedTuple):
    """Where one HF tensor lives: its HF shape, its PyTree key, its layer (None: not stacked)."""

    shape: tuple[int, ...]
    key: str  # top-level key, or the key inside params["layers"] when layer is not None
    layer: int | None
    transpose: bool  # a linear weight: HF stores [out, in], we store [in, out]
    kind: str  # "matrix" | "norm" | "bias": how dummy_model initialises it


def hf_tensor_specs(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint for `config` must contain, in HF order (embeddings, layers, head)."""
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    linear_shapes = {  # [out, in] as HF stores them, and whether the bias exists
        "self_attn.q_proj": ((q, d), config.qkv_bias),
        "self_attn.k_proj": ((kv, d), config.qkv_bias),
        "self_attn.v_proj": ((kv, d), config.qkv_bias),
        "self_attn.o_proj": ((d, q), config.o_bias),
        "mlp.gate_proj": ((f, d), config.mlp_bias),
        "mlp.up_proj": ((f, d), config.mlp_bias),
        "mlp.down_proj": ((d, f), config.mlp_bias),
    }
    specs = {"model.embed_tokens.weight": TensorSpec((config.vocab_size, d), "embed", None, False, "matrix")}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        for hf, ours in _NORMS.items():
            specs[f"{prefix}{hf}.weight"] = TensorSpec((d,), ours, i, False, "norm")
        for hf, (shape, has_bias) in linear_shapes.items():
            weight, bias = _LINEARS[hf]
            specs[f"{prefix}{hf}.weight"] = TensorSpec(shape, weight, i, True, "matrix")
            if has_bias:
                specs[f"{prefix}{hf}.bias"] = TensorSpec(shape[:1], bias, i, False, "bias")
    specs["model.norm.weight"] = TensorSpec((d,), "final_norm", None, False, "norm")
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec((config.vocab_size, d), "lm_head", None, True, "matrix")
    return specs


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """The parameter PyTree of model.py as nested dicts of (shape, kind)."""
    layers: dict[str, Any] = {}
    params: dict[str, Any] = {"layers": layers}
    for spec in hf_tensor_specs(config).values():
        shape = spec.shape[::-1] if spec.transpose else spec.shape
        if spec.layer is None:
            params[spec.key] = (shape, spec.kind)
        else:
            layers[spec.key] = ((config.num_layers, *shape), spec.kind)
    return params


def _as_dtype(dtype: DTypeLike) -> np.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d.name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")
    return d


def _tolerated_extra(name: str, config: ModelConfig) -> bool:
    # Tied checkpoints sometimes store lm_head anyway (a copy of the embeddings); old ones store
    # the RoPE buffer, which we recompute from the config.
    return (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith(".rotary_emb.inv_freq")


def _weight_files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    index = path / INDEX_FILE
    if not index.exists():
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    with open(index) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no 'weight_map' object")
    files = [path / name for name in sorted(set(weight_map.values()))]
    absent = [str(f) for f in files if not f.exists()]
    if absent:
        raise FileNotFoundError(f"shard(s) listed in {index} do not exist: {absent}")
    return files


def _check(found: dict[str, tuple[Any, list[int], str]], config: ModelConfig, where: Path) -> None:
    """One CheckpointError listing every missing, unexpected, misshapen or non-float tensor."""
    specs = hf_tensor_specs(config)
    missing = [n for n in specs if n not in found]
    unexpected = sorted(n for n in found if n not in specs and not _tolerated_extra(n, config))
    misshapen = [
        f"{n}: found {list(found[n][1])}, expected {list(s.shape)}"
        for n, s in specs.items() if n in found and tuple(found[n][1]) != s.shape
    ]
    not_float = [f"{n}: {found[n][2]}" for n in specs if n in found and found[n][2] not in _FLOAT_STORAGE]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    if misshapen:
        problems.append(f"tensors with the wrong shape ({len(misshapen)}):\n    " + "\n    ".join(misshapen))
    if not_float:
        problems.append(f"tensors that are not floating point ({len(not_float)}): {', '.join(not_float)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not match its config.json ({config.model_type}, "
            f"{config.num_layers} layers, hidden {config.hidden_size}):\n  " + "\n  ".join(problems)
        )


def load_model(path: str | Path, dtype: DTypeLike = "float32", progress: bool | None = None) -> Model:
    """Load an HF-format Llama / Mistral / Qwen2 checkpoint directory as a `Model` in `dtype`.

    Every tensor's name and shape is checked against config.json before any data is read.
    Tensors are read lazily and written straight into one host buffer per stacked parameter,
    so peak host memory is about one copy of the model. `progress`: a tqdm bar over tensors;
    None shows it for checkpoints over 100 MiB. A directory written by `scripts/quantize.py`
    (`jaxinfer.quant.save_quantized`, orbax) loads as saved, without re-quantizing; its arrays
    keep their stored dtypes.
    """
    from jaxinfer.quant.orbax_io import is_quantized_orbax, load_quantized_orbax

    path = Path(path)
    if is_quantized_orbax(path):
        return load_quantized_orbax(path)
    files = _weight_files(path)
    config = load_config(path)
    dtype = _as_dtype(dtype)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="numpy")) for f in files]
        return _load(path, files, handles, config, dtype, progress)


def _load(path: Path, files: list[Path], handles: list[Any], config: ModelConfig, dtype: np.dtype,
          progress: bool | None) -> Model:
    found: dict[str, tuple[Any, list[int], str]] = {}
    duplicated = []
    for handle, file in zip(handles, files):
        for name in handle.keys():
            if name in found:
                duplicated.append(f"{name} (in {file.name})")
            info = handle.get_slice(name)
            found[name] = (handle, info.get_shape(), info.get_dtype())
    if duplicated:
        raise CheckpointError(f"checkpoint {path}: tensors stored in more than one shard: {duplicated}")
    show = progress if progress is not None else sum(f.stat().st_size for f in files) > _PROGRESS_BYTES
    if config.quant is not None:  # quantized linear layers: checked and read by jaxinfer.quant
        from jaxinfer.quant.load import load_quantized

        return load_quantized(path, found, config, dtype, show)
    _check(found, config, path)

    specs = hf_tensor_specs(config)
    params: dict[str, Any] = {"layers": {}}
    with tqdm(total=len(specs), desc=f"loading {path.name}", unit="tensor", disable=not show) as bar:
        load_dense(found, specs, config.num_layers, dtype, params, bar)
    return Model(config=config, params=params)


def load_dense(found: dict, specs: dict, num_layers: int, dtype, params: dict, bar) -> None:
    """Read the tensors in `specs` from the open safetensors handles in `found` into `params`
    (stacked layers under params["layers"]), one host buffer per destination parameter."""
    # Group HF tensors by destination so each stacked parameter is assembled in one host buffer.
    groups: dict[str, list[tuple[str, TensorSpec]]] = {}
    for name, spec in specs.items():
        groups.setdefault(spec.key, []).append((name, spec))
    for key, members in groups.items():
        first = members[0][1]
        stacked = first.layer is not None
        shape = first.shape[::-1] if first.transpose else first.shape
        buf = np.empty((num_layers, *shape) if stacked else shape, dtype)
        for name, spec in members:
            tensor = found[name][0].get_tensor(name)
            # One copy that converts dtype and transposes.
            buf[spec.layer if stacked else ()] = tensor.T if spec.transpose else tensor
            del tensor
            bar.update(1)
        (params["layers"] if stacked else params)[key] = jax.device_put(buf)
        del buf


def _hash32(x: jax.Array) -> jax.Array:
    # "lowbias32" (Wellons): a uint32 bijection with good avalanche.
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _scaled_normal(seed: jax.Array, shape: tuple[int, ...], std: float, dtype: np.dtype) -> jax.Array:
    """Counter-based normals: one elementwise fusion per tensor, written straight in `dtype`.

    jax.random.normal per tensor costs ~0.2 s of XLA compile per parameter shape and holds a
    float32 copy of the tensor (several GB at 8B scale); a hashed counter needs neither.
    Counters are uint32, so tensors beyond 2**32 elements (none in PRESETS) would repeat.
    """
    counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    bits = _hash32(_hash32(counter) + seed)  # hashing twice: seeds do not just shift one sequence
    # 24 bits -> uniform in (-1, 1), endpoints excluded -> normal by the inverse CDF.
    u = (bits >> 8).astype(jnp.float32) * 2.0**-23 + (2.0**-24 - 1.0)
    return (std * math.sqrt(2.0) * jax.lax.erf_inv(u)).astype(dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_params(config: ModelConfig, dtype: np.dtype, key: jax.Array) -> dict[str, Any]:
    leaves, treedef = jax.tree.flatten(param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    seeds = jax.random.bits(key, (len(leaves),), jnp.uint32)
    stds = {"matrix": 0.02, "bias": 0.002}  # biases exercised but not dominant
    out = [
        jnp.ones(shape, dtype) if kind == "norm" else _scaled_normal(seeds[i], shape, stds[kind], dtype)
        for i, (shape, kind) in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, out)


def dummy_model(config: ModelConfig, dtype: DTypeLike = "float32", seed: int = 0) -> Model:
    """Random weights of the right shapes, generated on device under jit: matrices normal with
    std 0.02, biases std 0.002, norms one. Deterministic per seed."""
    return Model(config=config, params=_random_params(config, _as_dtype(dtype), jax.random.key(seed)))


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


def save_model(model: Model, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write `model` as an HF checkpoint: config.json plus safetensors in HF names and [out, in]
    layout, sharded (with model.safetensors.index.json) when `max_shard_bytes` is given.
    Weight files of an earlier checkpoint in `path` are removed so they cannot shadow these."""
    path = Path(path)
    config = model.config
    expected = jax.tree.map(lambda s: s[0], param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    actual = jax.tree.map(lambda a: tuple(a.shape), model.params)
    if expected != actual:
        raise CheckpointError(f"model params do not match its config: expected shapes {expected}, got {actual}")

    path.mkdir(parents=True, exist_ok=True)
    for old in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    hf = config_to_hf(config)
    hf["dtype"] = str(model.dtype)  # transformers 5 spelling; jaxinfer ignores it
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")

    host = jax.device_get(model.params)

    def hf_tensor(spec: TensorSpec) -> np.ndarray:
        arr = host[spec.key] if spec.layer is None else host["layers"][spec.key][spec.layer]
        return np.ascontiguousarray(arr.T if spec.transpose else arr)

    specs = hf_tensor_specs(config)
    nbytes = {
        n: math.prod(s.shape) * (host[s.key] if s.layer is None else host["layers"][s.key]).itemsize
        for n, s in specs.items()
    }
    shards: list[list[str]] = [[]]
    filled = 0
    for name in specs:  # in HF order, so a shard holds consecutive layers
        if max_shard_bytes is not None and shards[-1] and filled + nbytes[name] > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes[name]
    if max_shard_bytes is None:
        files = [SINGLE_FILE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        # "pt": transformers refuses safetensors files without a known format tag.
        save_file({n: hf_tensor(specs[n]) for n in names}, str(path / file), metadata={"format": "pt"})
    if max_shard_bytes is not None:
        index = {
            "metadata": {"total_size": sum(nbytes.values())},
            "weight_map": {n: file for file, names in zip(files, shards) for n in names},
        }
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
