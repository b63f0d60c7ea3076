"""`quantize(model, method, **options)`: offline quantization of a dense `Model` into
`QuantizedWeight`s (jaxinfer/quant/weight.py).

The seven linear weights of every layer (wq, wk, wv, wo, w_gate, w_up, w_down) are quantized;
embeddings, norms, biases and lm_head stay dense. Quantizers work on the host in NumPy (float64
where it matters), one layer's [K, N] weight at a time (K = input dim, N = output dim). Methods:

- "int8": round-to-nearest per output channel (one group of K rows), 8 bits, on GPTQ's affine grid
  (jaxinfer/quant/gptq.py docstring): symmetric (default, sym=True: scale = 2 absmax / 255, zero
  128) or asymmetric (sym=False: scale = (max - min) / 255 over [min(w, 0), max(w, 0)], zero point
  round(-min / scale)).
- "int4": the same grid with bits=4 (default; 2, 3, 8 also accepted) in groups of `group_size`
  input rows (default 128; None: per output channel), sym default True.
- "nf4": bitsandbytes' NF4: blocks of `group_size` (default 64) consecutive input rows of one
  output column (bitsandbytes' row-major [N, K] blocks when K is a multiple of the block size),
  absmax per block, code = nearest NF4 level of w * (1 / absmax) (ties to the lower level, as
  bitsandbytes' bucketize), W = NF4[code] * absmax.
- "gptq": GPTQ (gptq.py) with bits (4), group_size (128; None: per channel), sym (True),
  act_order (False), damp (0.01), blocksize (128) and `calibration`: int token ids [n, seq]
  (required). The model runs layer by layer on the calibration tokens, collecting each linear
  layer's inputs, sequentially: q/k/v first, then o from the quantized q/k/v, gate/up, then down;
  the next layer sees this layer fully quantized.
- "llm_int8": bitsandbytes `load_in_8bit`: per output row absmax SCB of the float16 weight,
  q = round(W_fp16 * (127 / SCB)) (torch's float32 evaluation), kind "llm_int8" with `threshold`
  (default 6.0) for the outlier-decomposed matmul.

A group size that does not divide K (e.g. 32 for stories260K's ffn 172) leaves a shorter last group,
recorded through g_idx (no padding). 4-bit codes need an even K.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import QUANT_MODEL_TYPES
from jaxinfer.model import Model, causal_attend, layer, rope_tables
from jaxinfer.quant.gptq import affine_codes, affine_params, gptq_quantize, hessian
from jaxinfer.quant.load import pack_codes
from jaxinfer.quant.weight import QuantizedWeight

LINEAR_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
METHODS = ("int8", "int4", "nf4", "gptq", "llm_int8")
# bitsandbytes' NF4 levels (bitsandbytes.functional.get_4bit_type("nf4")), exactly.
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)
_INV_127 = np.float32(7.874015718698502e-3)  # bitsandbytes' float32 1/127

Arrays = dict[str, Any]  # codes (unpacked uint8 [K, N]), scales, zeros, g_idx; plus "meta"


# ---------------------------------------------------------------------------------------------
# Per-matrix quantizers (w: float [K, N]); each returns unpacked codes and the metadata.


def _groups(k: int, group_size: int | None) -> tuple[int, np.ndarray | None]:
    """(group size, g_idx or None): g_idx only when the groups are ragged."""
    gs = k if group_size is None or group_size >= k else int(group_size)
    if gs < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return gs, None if k % gs == 0 else (np.arange(k) // gs).astype(np.int32)


def rtn_affine(w: np.ndarray, bits: int, group_size: int | None, sym: bool) -> Arrays:
    """Round-to-nearest on the affine grid, groups of `group_size` input rows."""
    w = np.asarray(w, np.float64)
    k, n = w.shape
    gs, g_idx = _groups(k, group_size)
    codes, scales, zeros = np.empty((k, n), np.uint8), [], []
    for g, start in enumerate(range(0, k, gs)):
        block = w[start:start + gs]
        scale, zero = affine_params(block, bits, sym)
        codes[start:start + gs] = affine_codes(block, scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    return {"codes": codes, "scales": np.stack(scales).astype(np.float32), "zeros": np.stack(zeros).astype(np.uint8),
            "g_idx": g_idx, "meta": {"bits": bits, "group_size": gs, "kind": "affine"}}


def nf4(w: np.ndarray, blocksize: int = 64) -> Arrays:
    w = np.asarray(w, np.float32)
    k, n = w.shape
    gs, g_idx = _groups(k, blocksize)
    bounds = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2
    codes, scales = np.empty((k, n), np.uint8), []
    for start in range(0, k, gs):
        block = w[start:start + gs]
        absmax = np.abs(block).max(axis=0)
        scaled = np.clip(block * (np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))), -1, 1)
        codes[start:start + gs] = np.searchsorted(bounds, scaled, side="left")
        scales.append(absmax)
    return {"codes": codes, "scales": np.stack(scales).astype(np.float32), "zeros": None, "g_idx": g_idx,
            "table": NF4_TABLE.copy(), "meta": {"bits": 4, "group_size": gs, "kind": "table"}}


def llm_int8(w: np.ndarray, threshold: float = 6.0) -> Arrays:
    """bitsandbytes Int8Params: row-wise (per output) absmax of the float16 weight."""
    w16 = np.asarray(w, np.float32).T.astype(np.float16)  # HF [N, K]
    scb = np.abs(w16).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = (np.float32(1.0) / scb) * np.float32(127.0)  # torch's `127.0 / SCB`
    q = np.round(w16.astype(np.float32) * np.where(scb > 0, inv, 0)[:, None]).astype(np.int16)
    n = w16.shape[0]
    return {"codes": (q.T + 128).astype(np.uint8), "scales": (scb * _INV_127)[None, :].astype(np.float32),
            "zeros": np.full((1, n), 128, np.uint8), "g_idx": None,
            "meta": {"bits": 8, "group_size": w16.shape[1], "kind": "llm_int8", "threshold": float(threshold)}}


def gptq(w: np.ndarray, h: np.ndarray, bits: int = 4, group_size: int | None = 128, sym: bool = True,
         act_order: bool = False, damp: float = 0.01, blocksize: int = 128) -> Arrays:
    k = np.shape(w)[0]
    r = gptq_quantize(w, h, bits, group_size, sym, act_order, damp, blocksize)
    gs, ragged = _groups(k, group_size)
    trivial = np.array_equal(r.g_idx, np.arange(k) // gs) and ragged is None
    return {"codes": r.codes, "scales": r.scales, "zeros": r.zeros, "g_idx": None if trivial else r.g_idx,
            "meta": {"bits": bits, "group_size": gs, "kind": "affine"}}


def to_quantized_weight(per_layer: list[Arrays]) -> QuantizedWeight:
    """Stack one key's per-layer results on a leading layer axis (packing 4-bit codes)."""
    meta = per_layer[0]["meta"]
    bits = meta["bits"]
    if bits == 4 and per_layer[0]["codes"].shape[0] % 2:
        raise ValueError(f"4-bit codes are packed in pairs of input rows: K = {per_layer[0]['codes'].shape[0]} is odd")

    def stack(field: str, fn: Callable = lambda a: a):
        if per_layer[0].get(field) is None:
            return None
        return jnp.asarray(np.stack([fn(r[field]) for r in per_layer]))

    return QuantizedWeight(codes=stack("codes", lambda c: pack_codes(c, bits)), scales=stack("scales"),
                           zeros=stack("zeros"), g_idx=stack("g_idx"), table=stack("table"), **meta)


# ---------------------------------------------------------------------------------------------
# One decoder layer (the model's own), exposing each linear layer's input for GPTQ's calibration.


@jax.jit
def _layer_io(model: Model, lp: dict[str, Any], x: jax.Array) -> dict[str, jax.Array]:
    """The model's own layer on calibration activations x: each linear group's input and the output."""
    b, t, _ = x.shape
    rope = rope_tables(model.config, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    out, _, taps = layer(model.config, lp, x, rope, causal_attend(model.config), None, jnp.int32(0))
    return {**taps, "out": out}


_STAGES = (("wq", ("wq", "wk", "wv")), ("wo", ("wo",)), ("w_gate", ("w_gate", "w_up")), ("w_down", ("w_down",)))


# ---------------------------------------------------------------------------------------------
# Public entry


def quantize(model: Model, method: str, *, bits: int | None = None, group_size: int | None | str = "default",
             sym: bool = True, act_order: bool = False, damp: float = 0.01, blocksize: int = 128,
             threshold: float = 6.0, calibration=None, progress: bool = False) -> Model:
    """A copy of `model` with every layer's seven linear weights quantized by `method`; see the
    module docstring for the methods and their options."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; supported: {list(METHODS)}")
    if model.config.model_type not in QUANT_MODEL_TYPES:
        raise ValueError(f"quantize supports model types {QUANT_MODEL_TYPES}, not {model.config.model_type!r} "
                         "(its quantized checkpoint would not load)")
    layers = model.params["layers"]
    already = [key for key in LINEAR_KEYS if isinstance(layers[key], QuantizedWeight)]
    if already:
        raise ValueError(f"model is already quantized ({', '.join(already)}); quantize a dense model")
    defaults = {"int8": (8, None), "int4": (4, 128), "nf4": (4, 64), "gptq": (4, 128), "llm_int8": (8, None)}
    bits = defaults[method][0] if bits is None else int(bits)
    gs = defaults[method][1] if group_size == "default" else group_size
    if method in ("nf4", "llm_int8") and bits != defaults[method][0]:
        raise ValueError(f"method {method!r} has {defaults[method][0]} bits, got bits={bits}")
    if method in ("int4", "gptq", "int8") and bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if method == "nf4" and gs is None:
        gs = 64
    num_layers = model.config.num_layers
    dense = {key: np.asarray(layers[key], np.float32) for key in LINEAR_KEYS}

    def one(key: str, i: int, h: np.ndarray | None = None) -> Arrays:
        w = dense[key][i]
        if method in ("int8", "int4"):
            return rtn_affine(w, bits, gs, sym)
        if method == "nf4":
            return nf4(w, gs)
        if method == "llm_int8":
            return llm_int8(w, threshold)
        return gptq(w, h, bits, gs, sym, act_order, damp, blocksize)

    results: dict[str, list[Arrays]] = {key: [] for key in LINEAR_KEYS}
    bar = tqdm(total=num_layers * len(LINEAR_KEYS), desc=f"quantize {method}", unit="linear", disable=not progress)
    if method != "gptq":
        for key in LINEAR_KEYS:
            for i in range(num_layers):
                results[key].append(one(key, i))
                bar.update(1)
    else:
        if calibration is None:
            raise ValueError("method 'gptq' needs calibration=: int token ids [n, seq]")
        tokens = np.asarray(calibration)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
            raise ValueError(f"calibration must be a non-empty int token array [n, seq], got {tokens.dtype}{list(tokens.shape)}")
        if tokens.min() < 0 or tokens.max() >= model.config.vocab_size:
            raise ValueError(f"calibration token ids must lie in [0, {model.config.vocab_size})")
        x = model.params["embed"][jnp.asarray(tokens, jnp.int32)]
        for i in range(num_layers):
            lp = {name: a[i] for name, a in layers.items()}
            for probe, keys in _STAGES:
                inputs = np.asarray(_layer_io(model, lp, x)[probe], np.float64)
                h = hessian(inputs)
                for key in keys:
                    r = one(key, i, h)
                    results[key].append(r)
                    lp[key] = jax.tree.map(lambda a: a[0], to_quantized_weight([r]))
                    bar.update(1)
            x = _layer_io(model, lp, x)["out"]
    bar.close()
    new_layers = dict(layers)
    for key in LINEAR_KEYS:
        new_layers[key] = to_quantized_weight(results[key])
    return model.replace(params={**model.params, "layers": new_layers})
