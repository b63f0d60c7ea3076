"""`load_model` / `save_model` (Hugging Face safetensors checkpoints <-> `Model`) and
`dummy_model` (random weights of any config, for tests and benchmarks).

The checkpoint format itself (the tensor table, shard listing, the problem report, the dense
reader) is jaxinfer/checkpoint.py; quantized checkpoints are read by jaxinfer/quant/. Loading
checks the whole checkpoint against the table (from the safetensors headers alone) before
reading any data, so a bad checkpoint fails fast with one error that lists every problem.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jaxinfer.checkpoint import (
    INDEX_FILE, SINGLE_FILE, TensorSpec, check_tensors, dense_expected, hf_tensor_specs, load_dense,
    SliceReader, load_dense_sharded, open_checkpoint, param_shapes, weight_files,
)
from jaxinfer.config import ModelConfig, config_to_hf, load_config
from jaxinfer.errors import CheckpointError
from jaxinfer.model import Model
from jaxinfer.quant.load import load_quantized
from jaxinfer.quant.orbax_io import is_quantized_orbax, load_quantized_orbax
from jaxinfer.sharding import KV_KEYS, TPLayout, check_mesh, dense_spec, tp_size

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_PROGRESS_BYTES = 100 * 2**20


def _as_dtype(dtype: DTypeLike) -> np.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d.name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {SUPPORTED_DTYPES}")
    return d


def load_model(path: str | Path, dtype: DTypeLike = "float32", progress: bool | None = None, *,
               compute_dtype: DTypeLike | None = None, mesh=None) -> Model:
    """Load an HF-format Llama / Mistral / Qwen2 checkpoint directory as a `Model` in `dtype`.

    `compute_dtype`: activations and KV cache (None: `dtype`). On CPU, `dtype="bfloat16",
    compute_dtype="float32"` is the fast mode: half the weight bytes and XLA:CPU's fastest dot
    (bf16 inputs, f32 accumulation), with norms, residuals and attention in float32.

    Every tensor's name and shape is checked against config.json before any data is read.
    Tensors are read lazily and written straight into one host buffer per stacked parameter,
    so peak host memory is about one copy of the model. `progress`: a tqdm bar over tensors;
    None shows it for checkpoints over 100 MiB. A checkpoint with a `quantization_config`
    (GPTQ, bitsandbytes) loads through jaxinfer.quant.load; a directory written by
    `scripts/quantize.py` (`jaxinfer.quant.save_quantized`, orbax) loads as saved, without
    re-quantizing, its arrays in their stored dtypes.

    `mesh` (jaxinfer.make_mesh): tensor parallel, every tensor placed with its NamedSharding
    (layout in jaxinfer/sharding.py). A dense checkpoint is read slice by slice: each process
    reads only the rows and columns its own devices hold (`safe_open(...).get_slice`), so no
    whole tensor is built on a device or in host memory. A quantized checkpoint is unpacked
    per tensor on the host as without a mesh (its packed formats are not sliceable the same
    way) and then split, group boundaries respected.
    """
    path = Path(path)
    compute = None if compute_dtype is None else _as_dtype(compute_dtype).name
    if mesh is not None:
        check_mesh(mesh)
    if is_quantized_orbax(path):
        model = load_quantized_orbax(path).replace(compute_dtype=compute)
        return model if mesh is None else model.on_mesh(mesh)
    files = weight_files(path)
    config = load_config(path)
    dtype = _as_dtype(dtype)
    with open_checkpoint(path, files) as found:
        show = progress if progress is not None else sum(f.stat().st_size for f in files) > _PROGRESS_BYTES
        if config.quant is not None:  # quantized linear layers: checked and read by jaxinfer.quant
            model = load_quantized(path, found, config, dtype, show).replace(compute_dtype=compute)
            return model if mesh is None else model.on_mesh(mesh)
        check_tensors(found, dense_expected(config), config, path)
        specs = hf_tensor_specs(config)
        params: dict[str, Any] = {"layers": {}}
        with tqdm(total=len(specs), desc=f"loading {path.name}", unit="tensor", disable=not show) as bar:
            if mesh is None:
                load_dense(found, specs, config.num_layers, dtype, params, bar)
            else:
                layout = TPLayout.plan(config, tp_size(mesh))
                reader = SliceReader(files)
                try:
                    load_dense_sharded(reader, specs, dtype, params, bar, mesh, layout, config,
                                       functools.partial(_sharded_shape, config, layout), dense_spec, KV_KEYS)
                finally:
                    reader.close()
                config = layout.sharded_config(config)
    return Model(config=config, params=params, compute_dtype=compute, mesh=mesh)


def _sharded_shape(config: ModelConfig, layout: TPLayout, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A parameter's shape on the mesh: KV projections widened by the KV-head copies, the
    embedding / head padded to a vocabulary tp divides."""
    shape = list(shape)
    if key in KV_KEYS:
        shape[-1] *= layout.kv_replicas
    elif key == "embed":
        shape[0] = layout.vocab_padded
    elif key == "lm_head":
        shape[-1] = layout.vocab_padded
    return tuple(shape)


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


def dummy_model(config: ModelConfig, dtype: DTypeLike = "float32", seed: int = 0, *,
                compute_dtype: DTypeLike | None = None, mesh=None) -> Model:
    """Random weights of the right shapes, generated on device under jit: matrices normal with
    std 0.02, biases std 0.002, norms one. Deterministic per seed. `compute_dtype` as for
    `load_model`. `mesh`: the same weights laid out on it (generated on one device, then
    split: random models are for tests and benchmarks, not for sizes one device cannot hold)."""
    compute = None if compute_dtype is None else _as_dtype(compute_dtype).name
    model = Model(config=config, params=_random_params(config, _as_dtype(dtype), jax.random.key(seed)),
                  compute_dtype=compute)
    return model if mesh is None else model.on_mesh(mesh)


def save_model(model: Model, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write `model` as an HF checkpoint: config.json plus safetensors in HF names and [out, in]
    layout, sharded (with model.safetensors.index.json) when `max_shard_bytes` is given.
    Weight files of an earlier checkpoint in `path` are removed so they cannot shadow these."""
    path = Path(path)
    model = model.stacked()
    config = model.config
    expected = jax.tree.map(lambda s: s[0], param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    actual = jax.tree.map(lambda a: tuple(a.shape), model.params)
    if expected != actual:
        raise CheckpointError(f"model params do not match its config: expected shapes {expected}, got {actual}")

    path.mkdir(parents=True, exist_ok=True)
    for old in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    hf = config_to_hf(config)
    hf["dtype"] = str(model.weight_dtype)  # transformers 5 spelling; jaxinfer ignores it
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")

    host = jax.device_get(model.params)

    def part(key: str, spec: TensorSpec) -> np.ndarray:
        arr = host[key] if spec.layer is None else host["layers"][key][spec.layer]
        return arr.T if spec.transpose else arr

    def hf_tensor(spec: TensorSpec) -> np.ndarray:
        # A fused HF tensor (Phi-3's qkv_proj, gate_up_proj) is its parts stacked on the out axis.
        return np.ascontiguousarray(np.concatenate([part(key, spec) for key, _, _ in spec.destinations()]))

    specs = hf_tensor_specs(config)
    nbytes = {
        n: math.prod(s.shape) * (host[s.destinations()[0][0]] if s.layer is None
                                 else host["layers"][s.destinations()[0][0]]).itemsize
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
