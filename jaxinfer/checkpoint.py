"""The Hugging Face safetensors checkpoint format: which tensors a config needs, where each goes
in the parameter PyTree (jaxinfer/model.py), how the files are found and opened, one problem
report for every way a checkpoint can disagree with its config, and the dense-tensor reader.

Dense (jaxinfer/weights.py) and quantized (jaxinfer/quant/load.py) loading both build on this
module; it imports neither.

Family differences in the layout, all decided here: Gemma's four norms per layer, Qwen3 / Gemma 3's
per-head q/k norms, Phi-3's fused `qkv_proj` and `gate_up_proj` (split at load time into the
parameters every other family has, so the layer body never sees them), and the experts of
Mixtral (`block_sparse_moe.experts.{e}.w1/w3/w2`) and Qwen3-MoE (`mlp.experts.{e}.gate_proj/...`).
Parameters that only some layers have are stacked over those layers only: the dense MLP over
the dense layers, the router and experts over the MoE layers with an expert axis
`[moe_layers, experts, ...]` (the axis expert parallelism will shard).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safe_open(framework="numpy") reads bf16
import numpy as np
from jax.sharding import NamedSharding
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
# Gemma: post_attention_layernorm normalises the attention output; pre_feedforward_layernorm is
# the MLP's input norm (Llama's post_attention_layernorm), post_feedforward_layernorm its output's.
_GEMMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_out_norm",
                "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_out_norm"}
# Expert MLP tensors under model.layers.{i}.<prefix>: (router, per-expert gate, up, down).
_EXPERTS = {
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                "block_sparse_moe.experts.{e}.w2"),
    "qwen3_moe": ("mlp.gate", "mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj"),
}

# name -> (open safetensors handle, shape, safetensors dtype string), from the headers alone.
Found = dict[str, tuple[Any, list[int], str]]


class TensorSpec(NamedTuple):
    """Where one HF tensor lives: its HF shape, its PyTree key, its index in the stacked
    parameter (None: not stacked) and that parameter's leading (stacked) dimensions."""

    shape: tuple[int, ...]
    key: str  # top-level key, or the key inside params["layers"] when layer is not None
    layer: int | tuple[int, int] | None  # index into the stack: a layer (of its group), or (layer, expert)
    transpose: bool  # a linear weight: HF stores [out, in], we store [in, out]
    kind: str  # "matrix" | "norm" | "bias": how dummy_model initialises it
    stack: tuple[int, ...] = ()  # the parameter's leading dims: (layers,), (dense layers,), (moe layers, experts)
    # A fused HF tensor (Phi-3): split along its first (HF out) axis into these (key, width)
    # parameters; `key` then names no parameter.
    parts: tuple[tuple[str, int], ...] = ()

    def destinations(self) -> tuple[tuple[str, int | None, int | None], ...]:
        """(parameter key, first HF row, end HF row) per parameter this tensor fills (rows None: all)."""
        if not self.parts:
            return ((self.key, None, None),)
        ends = np.cumsum([width for _, width in self.parts])
        return tuple((key, int(end - width), int(end)) for (key, width), end in zip(self.parts, ends))

    def dest_shape(self, lo: int | None, hi: int | None) -> tuple[int, ...]:
        """The parameter's shape for rows [lo, hi) of this tensor, stacked dims included."""
        shape = self.shape if lo is None else (hi - lo, *self.shape[1:])
        shape = shape[::-1] if self.transpose else shape
        return shape if self.layer is None else (*self.stack, *shape)


class ExpectedTensor(NamedTuple):
    """What one stored tensor must look like: HF shape (None: any; a float entry flags a packed
    width that is not a whole number of words), allowed storage dtypes, and whether it must exist."""

    shape: tuple[int | float, ...] | None
    dtypes: frozenset[str]
    required: bool = True


def hf_tensor_specs(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint for `config` must contain, in HF order (embeddings, layers, head)."""
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    fused = config.model_type == "phi3"
    attn_shapes = {  # [out, in] as HF stores them, and whether the bias exists
        "self_attn.q_proj": ((q, d), config.qkv_bias),
        "self_attn.k_proj": ((kv, d), config.qkv_bias),
        "self_attn.v_proj": ((kv, d), config.qkv_bias),
    }
    mlp_shapes = {
        "mlp.gate_proj": ((f, d), config.mlp_bias),
        "mlp.up_proj": ((f, d), config.mlp_bias),
        "mlp.down_proj": ((d, f), config.mlp_bias),
    }
    moe = [i for i in range(config.num_layers) if config.is_moe(i)]
    dense = [i for i in range(config.num_layers) if not config.is_moe(i)]
    specs = {"model.embed_tokens.weight": TensorSpec((config.vocab_size, d), "embed", None, False, "matrix")}

    def linear(name, shape, weight, bias, has_bias, index, stack, parts=()):
        specs[f"{name}.weight"] = TensorSpec(shape, weight, index, True, "matrix", stack, parts)
        if has_bias:
            specs[f"{name}.bias"] = TensorSpec(shape[:1], bias, index, False, "bias", stack)

    all_layers = (config.num_layers,)
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        for hf, ours in (_GEMMA_NORMS if config.sandwich_norms else _NORMS).items():
            specs[f"{prefix}{hf}.weight"] = TensorSpec((d,), ours, i, False, "norm", all_layers)
        if fused:
            linear(f"{prefix}self_attn.qkv_proj", (q + 2 * kv, d), "wqkv", None, False, i, all_layers,
                   (("wq", q), ("wk", kv), ("wv", kv)))
        else:
            for hf, (shape, has_bias) in attn_shapes.items():
                linear(prefix + hf, shape, *_LINEARS[hf], has_bias, i, all_layers)
        linear(f"{prefix}self_attn.o_proj", (d, q), "wo", "bo", config.o_bias, i, all_layers)
        if config.qk_norm:
            for which in ("q_norm", "k_norm"):
                specs[f"{prefix}self_attn.{which}.weight"] = TensorSpec((config.head_dim,), which, i, False, "norm",
                                                                        all_layers)
        if config.is_moe(i):
            r, n, fm = moe.index(i), config.num_experts, config.moe_intermediate_size
            router, gate, up, down = _EXPERTS[config.model_type]
            specs[f"{prefix}{router}.weight"] = TensorSpec((n, d), "router", r, True, "matrix", (len(moe),))
            for e in range(n):
                for hf, key, shape in ((gate, "moe_gate", (fm, d)), (up, "moe_up", (fm, d)), (down, "moe_down", (d, fm))):
                    specs[f"{prefix}{hf.format(e=e)}.weight"] = TensorSpec(shape, key, (r, e), True, "matrix",
                                                                           (len(moe), n))
        elif fused:
            r = dense.index(i)
            linear(f"{prefix}mlp.gate_up_proj", (2 * f, d), "w_gate_up", None, False, r, (len(dense),),
                   (("w_gate", f), ("w_up", f)))
            linear(f"{prefix}mlp.down_proj", (d, f), "w_down", "b_down", False, r, (len(dense),))
        else:
            for hf, (shape, has_bias) in mlp_shapes.items():
                linear(prefix + hf, shape, *_LINEARS[hf], has_bias, dense.index(i), (len(dense),))
    specs["model.norm.weight"] = TensorSpec((d,), "final_norm", None, False, "norm")
    if not config.tie_word_embeddings:
        specs["lm_head.weight"] = TensorSpec((config.vocab_size, d), "lm_head", None, True, "matrix")
    return specs


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """The parameter PyTree of model.py as nested dicts of (shape, kind)."""
    layers: dict[str, Any] = {}
    params: dict[str, Any] = {"layers": layers}
    for spec in hf_tensor_specs(config).values():
        for key, lo, hi in spec.destinations():
            (params if spec.layer is None else layers)[key] = (spec.dest_shape(lo, hi), spec.kind)
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


# Bytes of tensor data read from safetensors files by this process (a diagnostic: the sharded
# loader's tests check that each process reads only its own slices).
_bytes_read = [0]


def _is_float(dtype: np.dtype) -> bool:
    """NumPy floats plus ml_dtypes' (bfloat16, float8_*), whose kind is 'V'."""
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8"))


def _by_destination(specs: dict[str, TensorSpec]) -> dict[str, list[tuple[str, TensorSpec, int | None, int | None]]]:
    """Checkpoint tensors grouped by the parameter they land in: key -> [(name, spec, lo, hi)]
    (lo/hi: the rows of a fused tensor, such as Phi-3's qkv, that go to that parameter)."""
    groups: dict[str, list[tuple[str, TensorSpec, int | None, int | None]]] = {}
    for name, spec in specs.items():
        for key, lo, hi in spec.destinations():
            groups.setdefault(key, []).append((name, spec, lo, hi))
    return groups


def _check_finite(name: str, tensor: np.ndarray) -> None:
    if _is_float(tensor.dtype) and not np.isfinite(tensor).all():
        bad = "NaN" if np.isnan(tensor).any() else "inf"
        raise CheckpointError(f"{name} contains {bad} values ({int((~np.isfinite(tensor)).sum())} of "
                              f"{tensor.size}); expected finite weights: the checkpoint is corrupt")


def load_dense(found: Found, specs: dict[str, TensorSpec], num_layers: int, dtype, params: dict, bar) -> None:
    """Read the tensors in `specs` from the open handles in `found` into `params` (stacked layers
    under params["layers"]), one host buffer per destination parameter, so peak host memory is
    about one copy of the largest parameter beside the model. Fused tensors (Phi-3) are split
    here, each part read into its own parameter. (`num_layers` is unused: each spec carries the
    stacked shape of its parameter, which for expert and dense-MLP groups is not num_layers.)"""
    for key, members in _by_destination(specs).items():
        _, first, lo, hi = members[0]
        stacked = first.layer is not None
        buf = np.empty(first.dest_shape(lo, hi), dtype)
        for name, spec, lo, hi in members:
            try:
                tensor = found[name][0].get_tensor(name)
                _bytes_read[0] += tensor.nbytes
            except (SafetensorError, OSError) as e:  # header fine, data cut short
                raise CheckpointError(f"{name}: cannot read its data ({e}); the safetensors file is "
                                      "truncated or corrupt") from e
            _check_finite(name, tensor)
            part = tensor if lo is None else tensor[lo:hi]
            # One copy that converts dtype and transposes.
            buf[spec.layer if stacked else ()] = part.T if spec.transpose else part
            del tensor, part
            bar.update(1 if lo is None else (hi - lo) / spec.shape[0])
        (params["layers"] if stacked else params)[key] = jax.device_put(buf)
        del buf


def bytes_read() -> int:
    return _bytes_read[0]


def _row_segments(a: int, b: int, key: str, spec: TensorSpec, lo: int | None, layout, config: ModelConfig,
                  kv_keys) -> list[tuple[int, int, int, int]]:
    """Rows [a, b) of a sharded parameter's HF row axis (the HF tensor's axis 0: out features of a
    linear, the vocabulary of the embedding / head) as (dst_lo, dst_hi, src_lo, src_hi) runs of
    the stored tensor: KV heads replicated (`layout.kv_replicas`), vocabulary padding (no
    source: left zero), a fused tensor's part offset (`lo`)."""
    out = []
    if key in kv_keys and layout.kv_replicas > 1:
        hd, r = config.head_dim, layout.kv_replicas
        j = a
        while j < b:
            end = min(b, (j // hd + 1) * hd)
            src = (j // hd // r) * hd + j % hd
            out.append((j - a, end - a, src, src + end - j))
            j = end
    else:
        top = min(b, config.vocab_size) if key in ("embed", "lm_head") else b  # padding rows: no source
        if top > a:
            out.append((0, top - a, a, top))
    base = 0 if lo is None else lo
    return [(d0, d1, s0 + base, s1 + base) for d0, d1, s0, s1 in out]


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}


class SliceReader:
    """Rows and columns of safetensors tensors read with `os.pread` (the format: an 8-byte
    little-endian header length, a JSON header of dtype / shape / data_offsets, then the data,
    row-major). Unlike the memory-mapped `safe_open`, whose touched pages count in the process's
    RSS until the file is closed (a whole second copy of the checkpoint by the end of a load),
    only the bytes of the slice pass through memory."""

    def __init__(self, files: list[Path]):
        self._fds, self._index = [], {}
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            self._fds.append(fd)
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            header = json.loads(os.pread(fd, n, 8))
            for name, info in header.items():
                if name != "__metadata__":
                    self._index[name] = (fd, np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"]),
                                         8 + n + info["data_offsets"][0])

    def read(self, name: str, rows: slice, rest: tuple[slice, ...] = ()) -> np.ndarray:
        """tensor[rows, *rest] (a 1-D or 2-D tensor; contiguous ranges)."""
        fd, dtype, shape, start = self._index[name]
        r0, r1, _ = rows.indices(shape[0])
        if len(shape) == 1:
            data = os.pread(fd, (r1 - r0) * dtype.itemsize, start + r0 * dtype.itemsize)
            _bytes_read[0] += len(data)
            return np.frombuffer(data, dtype).copy()
        width = shape[1]
        c0, c1, _ = (rest[0] if rest else slice(None)).indices(width)
        row_bytes = width * dtype.itemsize
        if c0 == 0 and c1 == width:  # whole rows: one contiguous read
            data = os.pread(fd, (r1 - r0) * row_bytes, start + r0 * row_bytes)
            _bytes_read[0] += len(data)
            return np.frombuffer(data, dtype).reshape(r1 - r0, width).copy()
        out = np.empty((r1 - r0, c1 - c0), dtype)
        length = (c1 - c0) * dtype.itemsize
        for i, r in enumerate(range(r0, r1)):
            data = os.pread(fd, length, start + r * row_bytes + c0 * dtype.itemsize)
            out[i] = np.frombuffer(data, dtype)
            _bytes_read[0] += length
        return out

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def load_dense_sharded(reader: SliceReader, specs: dict[str, TensorSpec], dtype, params: dict, bar, mesh, layout,
                       config: ModelConfig, global_shape, spec_of, kv_keys) -> None:
    """`load_dense` for a mesh: every parameter is built from its devices' shards, each read
    from the files by `reader` (only the rows and columns the device holds;
    a slice that several local devices replicate is read once). Nothing whole is built: peak
    host memory beside the model is one device's slice of one parameter. `global_shape(key,
    shape)` gives the sharded parameter's shape (KV heads replicated, vocabulary padded),
    `spec_of(key, ndim)` its PartitionSpec."""
    for key, members in _by_destination(specs).items():
        _, first, lo, hi = members[0]
        stacked = first.layer is not None
        shape = global_shape(key, first.dest_shape(lo, hi))
        sharding = NamedSharding(mesh, spec_of(key, len(shape)))
        by_index: dict[tuple, list] = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            by_index.setdefault(tuple((s.start, s.stop) for s in index), []).append(device)
        arrays = {}
        for index, devices in by_index.items():
            ranges = [(0 if s0 is None else s0, n if s1 is None else s1) for (s0, s1), n in zip(index, shape)]
            buf = np.zeros([r1 - r0 for r0, r1 in ranges], dtype)
            nstack = len(first.stack) if stacked else 0
            tensor_ranges = ranges[nstack:]
            for name, spec, mlo, _ in members:
                hf_ranges = tensor_ranges[::-1] if spec.transpose else tensor_ranges
                row_axis = len(tensor_ranges) - 1 if spec.transpose else 0  # HF axis 0 in our layout
                rest = tuple(slice(r0, r1) for r0, r1 in hf_ranges[1:])
                for d0, d1, s0, s1 in _row_segments(*hf_ranges[0], key, spec, mlo, layout, config, kv_keys):
                    try:
                        part = reader.read(name, slice(s0, s1), rest)
                    except (OSError, ValueError) as e:
                        raise CheckpointError(f"{name}: cannot read its data ({e}); the safetensors file is "
                                              "truncated or corrupt") from e
                    _check_finite(name, part)
                    dst = [slice(None)] * len(tensor_ranges)
                    dst[row_axis] = slice(d0, d1)
                    lead = (spec.layer if isinstance(spec.layer, tuple) else (spec.layer,)) if stacked else ()
                    buf[(*lead, *dst)] = part.T if spec.transpose else part
                    del part
            arrays.update({d: jax.device_put(buf, d) for d in devices})
            del buf
        bar.update(len(members))
        ordered = [arrays[d] for d in sharding.addressable_devices_indices_map(shape)]
        value = jax.make_array_from_single_device_arrays(shape, sharding, ordered)
        (params["layers"] if stacked else params)[key] = value
