"""Readers for quantized HF checkpoints (GPTQ v1/v2, bitsandbytes int8 and NF4/FP4).

Each quantized linear layer is unpacked on the host with numpy into the integer codes, scales
and zero points of a `QuantizedWeight` (jaxinfer/quant/weight.py); float weights are never
materialised. Layers are stacked on a leading axis like the dense parameters, so the layer
`lax.scan` of jaxinfer/model.py slices them. Embeddings, norms, biases and lm_head load dense.

As for dense checkpoints, every tensor name, shape and storage dtype is checked against the
config (from the safetensors headers alone) before any data is read, and one CheckpointError
lists every problem.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.checkpoint import (
    FLOAT_STORAGE, ExpectedTensor, Found, check_tensors, dense_expected, hf_tensor_specs, load_dense,
)
from jaxinfer.config import ModelConfig, QuantConfig
from jaxinfer.errors import CheckpointError
from jaxinfer.model import Model
from jaxinfer.quant.weight import QuantizedWeight

_INV_127 = np.float32(7.874015718698502e-3)  # bitsandbytes' float32 1/127
_INT8_OFFSET = 128  # signed int8 codes are stored as uint8 code + 128 with zero point 128


class QuantLinear(NamedTuple):
    """One quantized HF linear module: where it goes and its logical [K, N] size."""

    prefix: str  # e.g. "model.layers.0.self_attn.q_proj"
    key: str  # params["layers"] key, e.g. "wq"
    layer: int
    k: int
    n: int


def quant_linears(config: ModelConfig) -> list[QuantLinear]:
    """The linear modules a quantized checkpoint stores quantized (all of each layer's seven)."""
    out = []
    for name, spec in hf_tensor_specs(config).items():
        if spec.layer is not None and spec.transpose:  # a layer's linear weight, HF [out, in]
            n, k = spec.shape
            out.append(QuantLinear(name[: -len(".weight")], spec.key, spec.layer, k, n))
    return out


def _nested_blocks(n_blocks: int) -> int:
    return math.ceil(n_blocks / 256)


def quant_tensor_specs(config: ModelConfig) -> dict[str, ExpectedTensor]:
    """Every tensor that replaces a linear `.weight` in a checkpoint quantized as `config.quant`."""
    q = config.quant
    assert q is not None
    i32, u8, i8, f32 = frozenset({"I32"}), frozenset({"U8"}), frozenset({"I8"}), frozenset({"F32"})
    specs: dict[str, ExpectedTensor] = {}
    for lin in quant_linears(config):
        p, k, n = lin.prefix, lin.k, lin.n
        if q.method == "gptq":
            g = _num_groups(q, k)
            # Packed widths that are not whole int32 words are reported as the fractional shape.
            specs[f"{p}.qweight"] = ExpectedTensor((_words(k, q.bits), n), i32)
            specs[f"{p}.qzeros"] = ExpectedTensor((g, _words(n, q.bits)), i32)
            specs[f"{p}.scales"] = ExpectedTensor((g, n), FLOAT_STORAGE)
            specs[f"{p}.g_idx"] = ExpectedTensor((k,), i32, required=q.desc_act)
        elif q.bits == 8:
            specs[f"{p}.weight"] = ExpectedTensor((n, k), i8)
            specs[f"{p}.SCB"] = ExpectedTensor((n,), f32)
            specs[f"{p}.weight_format"] = ExpectedTensor((), u8, required=False)
        else:
            blocks = n * k // q.group_size
            specs[f"{p}.weight"] = ExpectedTensor((n * k // 2, 1), u8)
            specs[f"{p}.weight.absmax"] = ExpectedTensor((blocks,), u8 if q.double_quant else f32)
            specs[f"{p}.weight.quant_map"] = ExpectedTensor((16,), f32)
            specs[f"{p}.weight.quant_state.bitsandbytes__{q.quant_type}"] = ExpectedTensor(None, u8)
            if q.double_quant:
                specs[f"{p}.weight.nested_absmax"] = ExpectedTensor((_nested_blocks(blocks),), f32)
                specs[f"{p}.weight.nested_quant_map"] = ExpectedTensor((256,), f32)
    return specs


def _num_groups(q: QuantConfig, k: int) -> int:
    return 1 if q.group_size is None else k // q.group_size


def _words(width: int, bits: int) -> int | float:
    # int32 words holding `width` codes of `bits` bits; a non-integer flags an impossible packing.
    return width * bits // 32 if (width * bits) % 32 == 0 else width * bits / 32


def check_quantized(found: Found, config: ModelConfig, where: Path) -> None:
    """One CheckpointError listing every missing, unexpected, misshapen or mistyped tensor."""
    linear_weights = {f"{lin.prefix}.weight" for lin in quant_linears(config)}
    expected = {**dense_expected(config, skip=linear_weights), **quant_tensor_specs(config)}
    check_tensors(found, expected, config, where, what="quantized checkpoint")


# ---------------------------------------------------------------------------------------------
# Unpacking (host, numpy)


def unpack_int32_rows(packed: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """Codes uint8 [rows, C] from int32 words [rows * bits / 32, C] packed along axis 0.

    Each column is a little-endian bit stream: code r occupies bits r*bits .. r*bits+bits-1
    counting from the least significant bit of word 0 (GPTQ's packing, 3-bit included: a code
    may straddle two words).
    """
    words = np.ascontiguousarray(packed).view(np.uint32)
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits)[None, :, None]
        codes = (words[:, None, :] >> shifts) & np.uint32((1 << bits) - 1)
        return codes.reshape(words.shape[0] * per, words.shape[1])[:rows].astype(np.uint8)
    cols = words.shape[1]
    le = words.astype("<u4").view(np.uint8).reshape(words.shape[0], cols, 4)
    stream = np.unpackbits(le.transpose(1, 0, 2).reshape(cols, -1), axis=1, bitorder="little")
    stream = stream[:, : rows * bits].reshape(cols, rows, bits)
    codes = (stream.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)
    return np.ascontiguousarray(codes.T)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """QuantizedWeight's storage of codes uint8 [K, N]: two per byte along K for 4 bits."""
    if bits != 4:
        return codes.astype(np.uint8)
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def gptq_arrays(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
                q: QuantConfig, k: int, n: int, prefix: str) -> dict[str, np.ndarray]:
    """One GPTQ layer: codes [K(/2), N], scales f32 [G, N], zeros u8 [G, N], g_idx i32 [K]."""
    groups = _num_groups(q, k)
    codes = unpack_int32_rows(qweight, q.bits, k)
    zeros = unpack_int32_rows(np.ascontiguousarray(qzeros.T), q.bits, n).T  # packed along N
    if q.checkpoint_format == "gptq":  # v1 stores zero - 1 (wrapped to `bits` bits)
        zeros = (zeros.astype(np.int32) + 1) & ((1 << q.bits) - 1)
    if g_idx is None:
        g_idx = np.arange(k, dtype=np.int32) // (k // groups)
    g_idx = np.asarray(g_idx, np.int32)
    if g_idx.min() < 0 or g_idx.max() >= groups:
        raise CheckpointError(
            f"{prefix}.g_idx: group indices must lie in [0, {groups}), found {int(g_idx.min())}..{int(g_idx.max())}"
        )
    return {"codes": pack_codes(codes, q.bits), "scales": scales.astype(np.float32),
            "zeros": np.ascontiguousarray(zeros, dtype=np.uint8), "g_idx": g_idx}


def bnb_int8_arrays(weight: np.ndarray, scb: np.ndarray, weight_format: np.ndarray | None,
                    prefix: str) -> dict[str, np.ndarray]:
    """One bitsandbytes int8 layer (weight int8 [N, K], SCB [N]): W = q * SCB / 127 per output row."""
    if weight_format is not None and int(np.asarray(weight_format)) != 0:
        raise CheckpointError(
            f"{prefix}.weight_format = {int(np.asarray(weight_format))}: only 0 (row-major int8) is supported"
        )
    n = weight.shape[0]
    codes = (weight.T.astype(np.int16) + _INT8_OFFSET).astype(np.uint8)
    return {"codes": codes, "scales": (scb.astype(np.float32) * _INV_127)[None, :],
            "zeros": np.full((1, n), _INT8_OFFSET, np.uint8)}


def bnb_4bit_arrays(tensors: dict[str, np.ndarray], q: QuantConfig, k: int, n: int,
                    prefix: str) -> dict[str, np.ndarray]:
    """One bitsandbytes NF4/FP4 layer: codes of the row-major [N, K] matrix, high nibble first,
    one absmax per `blocksize` consecutive elements; W = quant_map[code] * absmax[block]."""
    state_name = f"{prefix}.weight.quant_state.bitsandbytes__{q.quant_type}"
    try:
        state = json.loads(bytes(tensors[state_name]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_name}: not a JSON quant state ({e})") from None
    expect = {"quant_type": q.quant_type, "blocksize": q.group_size, "shape": [n, k]}
    for field, value in expect.items():
        if state.get(field) != value:
            raise CheckpointError(f"{state_name}: {field} = {state.get(field)!r}, expected {value!r}")
    bs = q.group_size
    packed = tensors[f"{prefix}.weight"].reshape(-1)
    codes_nk = np.empty((n * k,), np.uint8)
    codes_nk[0::2], codes_nk[1::2] = packed >> 4, packed & 0xF
    codes = codes_nk.reshape(n, k).T
    absmax = tensors[f"{prefix}.weight.absmax"]
    if q.double_quant:
        if "nested_offset" not in state:
            raise CheckpointError(f"{state_name}: nested_offset is missing (double quantization)")
        nested_bs = state.get("nested_blocksize", 256)
        if nested_bs != 256:
            raise CheckpointError(f"{state_name}: nested_blocksize = {nested_bs!r}, expected 256")
        nested_map = tensors[f"{prefix}.weight.nested_quant_map"].astype(np.float32)
        nested_absmax = tensors[f"{prefix}.weight.nested_absmax"].astype(np.float32)
        block = np.arange(absmax.shape[0]) // nested_bs
        absmax = nested_map[absmax] * nested_absmax[block] + np.float32(state["nested_offset"])
    scales = absmax.astype(np.float32).reshape(n, k // bs).T
    return {"codes": pack_codes(codes, 4), "scales": np.ascontiguousarray(scales),
            "table": tensors[f"{prefix}.weight.quant_map"].astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# Loading


def _layer_arrays(found: Found, lin: QuantLinear,
                  q: QuantConfig) -> dict[str, np.ndarray]:
    def get(name: str) -> np.ndarray | None:
        entry = found.get(name)
        return None if entry is None else entry[0].get_tensor(name)

    p = lin.prefix
    if q.method == "gptq":
        return gptq_arrays(get(f"{p}.qweight"), get(f"{p}.qzeros"), get(f"{p}.scales"), get(f"{p}.g_idx"),
                           q, lin.k, lin.n, p)
    if q.bits == 8:
        return bnb_int8_arrays(get(f"{p}.weight"), get(f"{p}.SCB"), get(f"{p}.weight_format"), p)
    names = [n for n in found if n == f"{p}.weight" or n.startswith(f"{p}.weight.")]
    return bnb_4bit_arrays({n: get(n) for n in names}, q, lin.k, lin.n, p)


def _weight_meta(q: QuantConfig, k: int) -> dict[str, Any]:
    if q.method == "gptq":
        return {"bits": q.bits, "group_size": q.group_size or k, "kind": "affine"}
    if q.bits == 8:
        if q.int8_threshold > 0:
            return {"bits": 8, "group_size": k, "kind": "llm_int8", "threshold": q.int8_threshold}
        return {"bits": 8, "group_size": k, "kind": "affine"}
    return {"bits": 4, "group_size": q.group_size, "kind": "table"}


def load_quantized(path: Path, found: Found, config: ModelConfig,
                   dtype: np.dtype, show: bool = False) -> Model:
    """Builds the Model of a quantized checkpoint; `found` maps names to (handle, shape, dtype)."""
    check_quantized(found, config, path)
    q = config.quant
    linears = quant_linears(config)
    linear_weights = {f"{lin.prefix}.weight" for lin in linears}
    dense = {n: s for n, s in hf_tensor_specs(config).items() if n not in linear_weights}
    params: dict[str, Any] = {"layers": {}}
    with tqdm(total=len(dense) + len(linears), desc=f"loading {path.name}", unit="tensor",
              disable=not show) as bar:
        load_dense(found, dense, config.num_layers, dtype, params, bar)

        by_key: dict[str, list[QuantLinear]] = {}
        for lin in linears:
            by_key.setdefault(lin.key, []).append(lin)
        for key, members in by_key.items():
            bufs: dict[str, np.ndarray] = {}
            for lin in members:
                arrays = _layer_arrays(found, lin, q)
                for field, a in arrays.items():
                    if field not in bufs:
                        bufs[field] = np.empty((config.num_layers, *a.shape), a.dtype)
                    bufs[field][lin.layer] = a
                bar.update(1)
            k = members[0].k
            meta = _weight_meta(q, k)
            g_idx = bufs.pop("g_idx", None)
            if g_idx is not None and np.array_equal(g_idx, np.broadcast_to(np.arange(k) // meta["group_size"], g_idx.shape)):
                g_idx = None  # the trivial grouping k // group_size: no gather needed
            params["layers"][key] = QuantizedWeight(
                codes=jax.device_put(bufs["codes"]),
                scales=jax.device_put(bufs["scales"]),
                zeros=None if "zeros" not in bufs else jax.device_put(bufs["zeros"]),
                g_idx=None if g_idx is None else jax.device_put(g_idx),
                table=None if "table" not in bufs else jax.device_put(bufs["table"]),
                **meta,
            )
            del bufs
    return Model(config=config, params=params)
