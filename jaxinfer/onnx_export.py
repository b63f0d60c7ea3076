"""ONNX export of a `Model` through jax2onnx, and the plain ONNX Runtime loops that run it.

    jaxinfer.export_onnx(model, "model.onnx")                   # full-sequence forward
    jaxinfer.export_onnx(model, "decode.onnx", kind="decode")   # one step with an explicit KV cache

Both graphs are jaxinfer's own model code traced by the converter (jax2onnx, which lowers each
JAX primitive to ONNX operators): `decoder` (one `layer` body per layer, the Python loop over an
`unstacked()` model, so the graph holds one copy of the layer per layer and no ONNX Loop) and
`lm_head`, with an `attend` callback written for the export (`_attend` below). Nothing here
builds ONNX nodes by hand; after conversion the integer inputs are widened to int64 (see
`_int64_inputs`), the symbolic dims renamed and metadata set with onnx helpers.

Graphs (fp32 weights, activations and cache; float32 logits):

- kind="forward": `input_ids` int64 [batch_size, sequence_length] -> `logits` [batch_size,
  sequence_length, vocab]; every row full and causal (what `jaxinfer.forward` computes).
- kind="decode": the layout of optimum's `decoder_model_merged` / ONNX Runtime GenAI's decoder:
  `input_ids` int64 [batch_size, sequence_length], `attention_mask` int64 [batch_size,
  total_sequence_length] (1 = real token; total = past + sequence), `position_ids` int64
  [batch_size, sequence_length], `past_key_values.{i}.key` / `.value` float32 [batch_size,
  kv_heads, past_sequence_length, head_dim] -> `logits`, `present.{i}.key` / `.value` [batch_size,
  kv_heads, total_sequence_length, head_dim] (the past with this step's K/V appended). Query j of
  the step sits at cache index past + j and sees index i iff attention_mask[b, i] and i <= past + j
  (and, with a sliding window, past + j - i < window). With past_sequence_length = 0 the same
  graph prefills a (left-padded) prompt batch; `ort_generate` is the greedy loop over it.

Weights: the seven linear weights of every layer go through `linear`'s `matmul` protocol as
`_ExportLinear`, so they lower to ONNX MatMul (a plain `jnp.einsum` lowers to Einsum, which
ORT's MatMul fusions and `quantize_dynamic` do not touch). A quantized weight
(`jaxinfer.quantize(model, "int8" | "int4" | "nf4" | "gptq")`) exports as dequantize-then-matmul:
its uint8 codes, scales and zero points are initializers and the dequantization (nibble unpack,
zero-point subtract, per-group scale gather and multiply: `QuantizedWeight.dequantize`) is graph
ops feeding the MatMul. Not MatMulNBits / DequantizeLinear: those need a converter plugin that
emits them (jax2onnx has none for our layout). ONNX Runtime constant-folds the dequantization at
session creation (every input is an initializer), so it then runs fp32 MatMuls: the file is
small, the session's memory is the fp32 model's. LLM.int8 weights (outlier decomposition)
are not exported.

Why int64 inputs need a step: with JAX's default 32-bit mode the traced integers are int32, and
tracing with x64 on makes jax2onnx promote float32 `where`s against Python scalars to float64.
So the graph is traced in int32 and each integer input gets a Cast(int64 -> int32) in front.

jax2onnx quirks this module works around (0.17): `jnp.arange` of a symbolic length gives a
data-dependent dim that later indexing rejects, so positions and masks come from
`lax.broadcasted_iota`, and `jnp.concatenate` drops symbolic sizes, so the cache append is
`lax.concatenate`; jaxinfer's CPU attention (`prefill_attention`) uses `jnp.arange`, hence the
export's own `_attend`.

onnx, jax2onnx and onnxruntime are an optional dependency (`pip install -e ".[onnx]"`): they
are imported inside the functions that need them, so `import jaxinfer` works without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import config_to_hf
from jaxinfer.model import Model, decoder, lm_head
from jaxinfer.quant.weight import QuantizedWeight

KINDS = ("forward", "decode")
LINEAR_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# Symbolic dims as optimum / ONNX Runtime GenAI name them.
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
INSTALL_HINT = 'the ONNX export needs the optional "onnx" extra: pip install -e ".[onnx]"'


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


# ------------------------------------------------------------------------------ the exported model
@flax.struct.dataclass
class _ExportLinear:
    """A linear weight (dense [K, N] or a QuantizedWeight) multiplied with `jnp.matmul`, which
    jax2onnx lowers to ONNX MatMul; a QuantizedWeight is dequantized first (its own
    `dequantize`), as its reference `matmul` does."""

    w: Any

    def matmul(self, x: jax.Array) -> jax.Array:
        w = self.w.dequantize() if isinstance(self.w, QuantizedWeight) else self.w
        return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def export_form(model: Model) -> Model:
    """The model as it is exported: unstacked layers (a Python loop: no ONNX Loop in the graph),
    float32 dense arrays and compute (the ORT CPU EP's dtype), linear weights as `_ExportLinear`."""
    for lp in (model.params["layers"] if isinstance(model.params["layers"], tuple) else [model.params["layers"]]):
        for key in LINEAR_KEYS:
            w = lp[key]
            if isinstance(w, QuantizedWeight) and w.kind == "llm_int8" and w.threshold > 0:
                raise NotImplementedError(f"{key}: LLM.int8 weights (outlier decomposition) are not exportable")
    model = model.unstacked()

    def f32(x):
        if isinstance(x, QuantizedWeight):
            return x
        return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

    is_q = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    params = jax.tree.map(f32, model.params, is_leaf=is_q)
    params["layers"] = tuple({k: _ExportLinear(v) if k in LINEAR_KEYS else v for k, v in lp.items()}
                             for lp in params["layers"])
    return Model(config=model.config, params=params, compute_dtype="float32")


def _attend(visible: jax.Array, qi: jax.Array, kj: jax.Array, past: tuple | None, keep: bool,
            default_window: int | None):
    """The export's attention: layer i's K/V as [batch, kv_heads, seq, head_dim] appended to the
    past (if any), a float32 masked softmax (`_masked_softmax`) over `visible` [batch or 1, q_seq,
    kv_seq] and the layer's sliding window (qi / kj: the [q_seq, kv_seq] cache indices of query
    and key), GQA by grouping query heads per KV head (K/V never repeated). With `keep` the
    layer's full K/V is added to the cache tuple (the `present` outputs). `spec` is the layer's
    LayerAttention (window, soft-cap, scale) where model.layer passes one."""

    def attend(i, q, k, v, cache, spec=None):
        b, t, hq, d = q.shape
        kvh = k.shape[2]
        g = hq // kvh
        window = getattr(spec, "window", default_window) if spec is not None else default_window
        softcap = getattr(spec, "softcap", None)
        scale = getattr(spec, "scale", None) or d**-0.5
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kvh, t, d]
        if past is not None:  # lax.concatenate: jnp.concatenate loses the symbolic length in jax2onnx
            kt = jax.lax.concatenate([past[2 * i].astype(kt.dtype), kt], 2)
            vt = jax.lax.concatenate([past[2 * i + 1].astype(vt.dtype), vt], 2)
        qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d).astype(jnp.float32)
        scores = jnp.matmul(qg, jnp.swapaxes(kt.astype(jnp.float32), 2, 3)) * scale  # [b, kvh, g*t, S]
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        s = scores.shape[-1]
        scores = scores.reshape(b, kvh, g, t, s)
        vis = visible if window is None else visible & ((qi - kj) < window)[None]
        probs = _masked_softmax(scores, vis[:, None, None]).reshape(b, kvh, g * t, s)
        o = jnp.matmul(probs, vt.astype(jnp.float32))  # [b, kvh, g*t, d]
        o = o.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)
        return o, (cache + (kt, vt)) if keep else cache

    return attend


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """pallas_kernels.masked_softmax, op for op (exactly 0 where masked, all-zero rows where nothing
    is visible), without its jaxtyping annotation: the runtime shape check under pytest cannot
    broadcast jax.export's symbolic dims."""
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    return probs / jnp.where(denom > 0, denom, 1.0)


def _default_window(config) -> int | None:
    """The window when model.layer passes no per-layer LayerAttention (older callers)."""
    return getattr(config, "sliding_window", None)


def forward_logits(model: Model, input_ids: jax.Array) -> jax.Array:
    """The kind="forward" graph as a pure function of an `export_form` model: float32 logits
    [batch, seq, vocab] of full causal rows (jaxinfer.forward's result)."""
    ids = input_ids.astype(jnp.int32)
    b, t = ids.shape
    positions = jax.lax.broadcasted_iota(jnp.int32, (b, t), 1)
    qi = jax.lax.broadcasted_iota(jnp.int32, (t, t), 0)
    kj = jax.lax.broadcasted_iota(jnp.int32, (t, t), 1)
    attend = _attend((kj <= qi)[None], qi, kj, None, keep=False, default_window=_default_window(model.config))
    h, _ = decoder(model, ids, positions, attend, ())
    return lm_head(model, h)


def decode_step(model: Model, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                *past: jax.Array) -> tuple[jax.Array, ...]:
    """The kind="decode" graph as a pure function of an `export_form` model: (logits, present.0.key,
    present.0.value, ...); `past` is past_key_values.0.key, .0.value, ... (module docstring)."""
    ids = input_ids.astype(jnp.int32)
    t = ids.shape[1]
    total = attention_mask.shape[1]
    qi = jax.lax.broadcasted_iota(jnp.int32, (t, total), 0) + (total - t)  # the query's cache index
    kj = jax.lax.broadcasted_iota(jnp.int32, (t, total), 1)
    visible = (kj <= qi)[None] & (attention_mask[:, None, :] > 0)
    attend = _attend(visible, qi, kj, past, keep=True, default_window=_default_window(model.config))
    h, presents = decoder(model, ids, position_ids.astype(jnp.int32), attend, ())
    return (lm_head(model, h), *presents)


# ------------------------------------------------------------------------------ export
@contextlib.contextmanager
def _quiet(names=("jax2onnx", "onnx_ir")):
    """jax2onnx logs a warning per plugin whose optional framework (equinox, dm-pix) is absent and
    onnx_ir one per untyped shape constant; neither concerns this export."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _int64_inputs(proto, names: list[str]) -> None:
    """Each named int32 graph input becomes int64 with a Cast to int32 in front of its consumers
    (the converter traced int32: see the module docstring)."""
    # optional dependency: onnx (the "onnx" extra)
    from onnx import TensorProto, helper

    graph = proto.graph
    casts = []
    for inp in graph.input:
        if inp.name not in names or inp.type.tensor_type.elem_type != TensorProto.INT32:
            continue
        inner = f"{inp.name}_int32"
        for node in graph.node:
            for j, x in enumerate(node.input):
                if x == inp.name:
                    node.input[j] = inner
        casts.append(helper.make_node("Cast", [inp.name], [inner], to=TensorProto.INT32, name=f"{inp.name}_to_int32"))
        inp.type.tensor_type.elem_type = TensorProto.INT64
    for c in reversed(casts):
        graph.node.insert(0, c)


def _rename_dims(proto, names: dict[str, str]) -> None:
    graph = proto.graph
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def _param_bytes(model: Model) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))


def export_onnx(model: Model, path: str | Path, *, kind: str = "forward", opset: int = 21,
                check: bool = True) -> Path:
    """Write `model` as an ONNX file at `path` (kind "forward" or "decode": module docstring) and
    return the path. Weights are float32 initializers (quantized weights: their codes and scales,
    dequantized in the graph); a model over 1 GiB stores them in `path` + ".data" next to it.
    `check`: run onnx's checker on the result. Needs the "onnx" extra."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    try:
        # optional dependency: onnx and jax2onnx (the "onnx" extra); see the module docstring
        import onnx
        from jax2onnx import to_onnx
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e

    m = export_form(model)
    cfg = m.config
    n = cfg.num_layers
    if kind == "forward":
        (b, t) = jax.export.symbolic_shape(f"{BATCH}, {SEQ}")
        specs = [jax.ShapeDtypeStruct((b, t), jnp.int32)]
        in_names, out_names, int_inputs = ["input_ids"], ["logits"], ["input_ids"]

        def fn(input_ids):
            return forward_logits(m, input_ids)
    else:
        b, t, p = jax.export.symbolic_shape(f"{BATCH}, {SEQ}, {PAST}")
        kv = jax.ShapeDtypeStruct((b, cfg.num_kv_heads, p, cfg.head_dim), jnp.float32)
        specs = [jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, p + t), jnp.int32),
                 jax.ShapeDtypeStruct((b, t), jnp.int32)] + [kv] * (2 * n)
        int_inputs = ["input_ids", "attention_mask", "position_ids"]
        in_names, out_names = int_inputs + past_names(n), ["logits"] + present_names(n)

        def fn(input_ids, attention_mask, position_ids, *past):
            return decode_step(m, input_ids, attention_mask, position_ids, *past)

    with _quiet():
        proto = to_onnx(fn, specs, model_name=f"jaxinfer_{kind}", opset=opset, input_names=in_names,
                        output_names=out_names)
    _int64_inputs(proto, int_inputs)
    _rename_dims(proto, {f"{SEQ} + {PAST}": TOTAL, f"{PAST} + {SEQ}": TOTAL})
    quant = sorted({f"{w.w.kind}{w.w.bits}" for lp in m.params["layers"] for w in lp.values()
                    if isinstance(w, _ExportLinear) and isinstance(w.w, QuantizedWeight)})
    meta = {"jaxinfer.kind": kind, "jaxinfer.config": json.dumps(config_to_hf(cfg)),
            "jaxinfer.num_layers": str(n), "jaxinfer.kv_heads": str(cfg.num_kv_heads),
            "jaxinfer.head_dim": str(cfg.head_dim),
            "jaxinfer.weights": "float32" if not quant else f"dequantize-then-MatMul ({', '.join(quant)})"}
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = f"jaxinfer {kind} graph, converted by jax2onnx (see jaxinfer/onnx_export.py)"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _param_bytes(m) > 2**30:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        if check:
            onnx.checker.check_model(str(path))
    else:
        if check:
            onnx.checker.check_model(proto)
        onnx.save_model(proto, str(path))
    return path


# ------------------------------------------------------------------------------ ONNX Runtime
def ort_session(path: str | Path, threads: int | None = None, optimization: str = "all",
                optimized_model_path: str | Path | None = None):
    """An ONNX Runtime CPU session: `threads` intra-op threads (None: ORT's default), one inter-op
    thread, graph optimisation level `optimization` ("disable", "basic", "extended", "layout",
    "all"); `optimized_model_path` saves the optimised graph (to inspect ORT's rewrites)."""
    # optional dependency: onnxruntime (the "onnx" extra)
    import onnxruntime as ort

    levels = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[optimization],
                                          ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if threads is not None:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: ORT warns about jax2onnx's untyped shape values
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cache_shape(session) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a kind="decode" session, from its past inputs."""
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if not pasts:
        raise ValueError("not a kind='decode' graph: it has no past_key_values inputs")
    _, kvh, _, d = pasts[0].shape
    return len(pasts) // 2, int(kvh), int(d)


def ort_generate(session, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0) -> list[list[int]]:
    """Greedy generation through a kind="decode" session, the plain loop optimum runs: the prompts
    left-padded into one batch (attention_mask 0 on the padding, position_ids = running count of
    real tokens), one call with an empty past to prefill, then one call per new token with the
    presents fed back as the past. Every row makes exactly `max_new_tokens` tokens (EOS is not
    special). Returns each row's new tokens."""
    layers, kvh, d = _cache_shape(session)
    rows, width = len(prompts), max(map(len, prompts))
    ids = np.full((rows, width), pad_id, np.int64)
    mask = np.zeros((rows, width), np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    past = [np.zeros((rows, kvh, 0, d), np.float32)] * (2 * layers)
    names = past_names(layers)
    out = np.zeros((rows, max_new_tokens), np.int64)
    for step in range(max_new_tokens):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(names, past))}
        logits, *past = session.run(None, feed)
        ids = np.argmax(logits[:, -1], axis=-1).astype(np.int64)[:, None]
        out[:, step] = ids[:, 0]
        mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
    return out.tolist()


def ort_forward(session, input_ids) -> np.ndarray:
    """Logits of a kind="forward" session for int token ids [batch, seq]."""
    return session.run(["logits"], {"input_ids": np.asarray(input_ids, np.int64)})[0]


def op_counts(path_or_proto) -> dict[str, int]:
    """ONNX op type -> node count of a graph (a path or a ModelProto), most frequent first."""
    # optional dependency: onnx (the "onnx" extra)
    import onnx

    proto = onnx.load(str(path_or_proto), load_external_data=False) if isinstance(path_or_proto, (str, Path)) \
        else path_or_proto
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def onnx_available() -> str | None:
    """None when onnx, jax2onnx and onnxruntime import, else a one-line reason."""
    try:
        # optional dependency: the "onnx" extra
        import jax2onnx  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"{INSTALL_HINT} ({e})"
    return None


__all__ = ["KINDS", "export_onnx", "export_form", "forward_logits", "decode_step", "ort_session", "ort_generate",
           "ort_forward", "op_counts", "onnx_available", "past_names", "present_names"]

