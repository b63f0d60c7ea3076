"""The Hugging Face safetensors checkpoint format: which tensors a config needs, where each goes
in the parameter PyTree (jaxinfer/model.py), how the files are found and opened, one problem
report for every way a checkpoint can disagree with its config, and the dense-tensor reader.

Dense (jaxinfer/weights.py) and quantized (jaxinfer/quant/load.py) loading both build on this
module; it imports neither.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safe_open(framework="numpy") reads bf16
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_STORAGE = frozenset({"F64", "F32", "F16", "BF16"})

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

# name -> (open safetensors handle, shape, safetensors dtype string), from the headers alone.
Found = dict[str, tuple[Any, list[int], str]]


class TensorSpec(NamedTuple):
    """Where one HF tensor lives: its HF shape, its PyTree key, its layer (None: not stacked)."""

    shape: tuple[int, ...]
    key: str  # top-level key, or the key inside params["layers"] when layer is not None
    layer: int | None
    transpose: bool  # a linear weight: HF stores [out, in], we store [in, out]
    kind: str  # "matrix" | "norm" | "bias": how dummy_model initialises it


class ExpectedTensor(NamedTuple):
    """What one stored tensor must look like: HF shape (None: any; a float entry flags a packed
    width that is not a whole number of words), allowed storage dtypes, and whether it must exist."""

    shape: tuple[int | float, ...] | None
    dtypes: frozenset[str]
    required: bool = True


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


def tolerated_extra(name: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may hold beyond the specs: tied checkpoints sometimes store lm_head
    anyway (a copy of the embeddings); old ones store the RoPE buffer, which we recompute."""
    return (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith(".rotary_emb.inv_freq")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the single file, or the index's shards."""
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


@contextlib.contextmanager
def open_checkpoint(path: Path, files: list[Path]) -> Iterator[Found]:
    """Opens the weight files (`weight_files(path)`) lazily and yields every tensor's header.
    Data is read only by `get_tensor` on the handles, inside the `with`."""
    with contextlib.ExitStack() as stack:
        found: Found = {}
        duplicated = []
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="numpy"))
                for name in handle.keys():
                    if name in found:
                        duplicated.append(f"{name} (in {file.name})")
                    info = handle.get_slice(name)
                    found[name] = (handle, info.get_shape(), info.get_dtype())
            except (SafetensorError, OSError) as e:  # truncated file, corrupt header, unreadable
                raise CheckpointError(f"{file} is not a readable safetensors file ({e}); "
                                      "expected a complete file as written by safetensors") from e
        if duplicated:
            raise CheckpointError(f"checkpoint {path}: tensors stored in more than one shard: {duplicated}")
        yield found


def dense_expected(config: ModelConfig, skip: set[str] = frozenset()) -> dict[str, ExpectedTensor]:
    """The dense tensors of `config` (all but `skip`) as ExpectedTensors: float, of the spec's shape."""
    return {n: ExpectedTensor(s.shape, FLOAT_STORAGE) for n, s in hf_tensor_specs(config).items() if n not in skip}


def check_tensors(found: Found, expected: dict[str, ExpectedTensor], config: ModelConfig, where: Path,
                  what: str = "checkpoint") -> None:
    """The one problem report: a CheckpointError listing every missing, unexpected, misshapen or
    mistyped tensor of the checkpoint at `where`, so a bad file fails once with everything wrong."""
    missing = [n for n, e in expected.items() if e.required and n not in found]
    unexpected = sorted(n for n in found if n not in expected and not tolerated_extra(n, config))
    misshapen = [
        f"{n}: found {list(found[n][1])}, expected {list(e.shape)}"
        + (" (the packed width is not a whole number of int32 words)" if any(isinstance(d, float) for d in e.shape) else "")
        for n, e in expected.items() if n in found and e.shape is not None and tuple(found[n][1]) != e.shape
    ]
    bad_dtype = [
        f"{n}: {found[n][2]} (expected {'floating point' if e.dtypes == FLOAT_STORAGE else ' or '.join(sorted(e.dtypes))})"
        for n, e in expected.items() if n in found and found[n][2] not in e.dtypes
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    if misshapen:
        problems.append(f"tensors with the wrong shape ({len(misshapen)}):\n    " + "\n    ".join(misshapen))
    if bad_dtype:
        problems.append(f"tensors with the wrong dtype ({len(bad_dtype)}): {', '.join(bad_dtype)}")
    if problems:
        quant = "" if config.quant is None else f", {config.quant.method} {config.quant.bits}-bit"
        raise CheckpointError(
            f"{what} {where} does not match its config.json ({config.model_type}, "
            f"{config.num_layers} layers, hidden {config.hidden_size}{quant}):\n  " + "\n  ".join(problems)
        )


def _is_float(dtype: np.dtype) -> bool:
    """NumPy floats plus ml_dtypes' (bfloat16, float8_*), whose kind is 'V'."""
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8"))


def load_dense(found: Found, specs: dict[str, TensorSpec], num_layers: int, dtype, params: dict, bar) -> None:
    """Read the tensors in `specs` from the open handles in `found` into `params` (stacked layers
    under params["layers"]), one host buffer per destination parameter, so peak host memory is
    about one copy of the largest parameter beside the model."""
    groups: dict[str, list[tuple[str, TensorSpec]]] = {}
    for name, spec in specs.items():
        groups.setdefault(spec.key, []).append((name, spec))
    for key, members in groups.items():
        first = members[0][1]
        stacked = first.layer is not None
        shape = first.shape[::-1] if first.transpose else first.shape
        buf = np.empty((num_layers, *shape) if stacked else shape, dtype)
        for name, spec in members:
            try:
                tensor = found[name][0].get_tensor(name)
            except (SafetensorError, OSError) as e:  # header fine, data cut short
                raise CheckpointError(f"{name}: cannot read its data ({e}); the safetensors file is "
                                      "truncated or corrupt") from e
            if _is_float(tensor.dtype) and not np.isfinite(tensor).all():
                bad = "NaN" if np.isnan(tensor).any() else "inf"
                raise CheckpointError(f"{name} contains {bad} values ({int((~np.isfinite(tensor)).sum())} of "
                                      f"{tensor.size}); expected finite weights: the checkpoint is corrupt")
            # One copy that converts dtype and transposes.
            buf[spec.layer if stacked else ()] = tensor.T if spec.transpose else tensor
            del tensor
            bar.update(1)
        (params["layers"] if stacked else params)[key] = jax.device_put(buf)
        del buf
