"""Tensor parallelism over a `jax.sharding.Mesh`: the layout of a sharded model and KV pool.

Mesh axes: `"model"` (tensor parallel, `tp` devices) and optionally `"data"` (`dp` independent
replicas, jaxinfer/replicas.py). Everything sharded is split over `"model"` only; a replica's
arrays are replicated over `"data"` (each replica holds its own copy).

Megatron layout (the parameter names of jaxinfer/model.py, linear weights stored [in, out]):

| parameter                                 | split over "model"       | why                             |
|-------------------------------------------|--------------------------|---------------------------------|
| wq, wk, wv (+ bq, bk, bv)                 | out (heads)              | each device owns whole heads    |
| w_gate, w_up (+ b), moe_gate, moe_up      | out (ffn)                | the gate/up product is local    |
| wo, w_down, moe_down                      | in (heads / ffn)         | partial sums: one all-reduce    |
| embed [vocab, hidden], lm_head            | vocab                    | see below                       |
| norms, bo, b_down, router, q/k norms      | replicated               | tiny; needed whole everywhere   |

So a layer has exactly two all-reduces (after wo, after w_down / the experts' down projection),
of one [tokens, hidden] activation each. The embedding and the LM head are split over the
vocabulary (as vLLM's VocabParallelEmbedding / ParallelLMHead): a tied checkpoint shares one
sharded array; the lookup is a masked local gather plus one all-reduce of [tokens, hidden]; the
head's logits come out split over the vocabulary and are all-gathered once ([tokens, vocab],
which sampling needs whole anyway). Splitting over hidden instead would make the tied head
row-parallel: an all-reduce of [tokens, vocab] per step, tp times the bytes. A vocabulary
that tp does not divide is padded with zero rows (their logits are cut off).

KV heads: each device attends over its own q heads and the KV heads they read. When tp does
not divide kv_heads but kv_heads divides tp, every KV head is stored tp / kv_heads times (as
vLLM does), so each device holds one; the model then *is* a model with tp KV heads
(`TPLayout.kv_replicas`, `sharded_config`): same function, and the pool is split like the
weights. The KV pool `[layers, pages, page_size, kv_heads, head_dim]` and int8 / fp8 scales are
split over kv_heads; page table, allocator and slot table are replicated (admit / evict are the
same pure functions; every device runs them on the same data).

Quantized weights (jaxinfer/quant/weight.py) split the same way: column-parallel splits codes,
scales and zeros over N; row-parallel splits codes over K and the group axis with them (groups
must not straddle devices: (K / tp) % group_size == 0), or keeps the scales whole when every
row may use any group (GPTQ act-order `g_idx`, split with the rows; per-channel scales).
LLM.int8 cannot be row-parallel (its activation quantization takes a max over all of K).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError

# A quantized weight (jaxinfer/quant/weight.py's QuantizedWeight) is recognised by its fields:
# importing jaxinfer.quant here would import the model, which imports this module.
QuantizedWeight = Any


def is_quantized(x) -> bool:
    return hasattr(x, "codes") and hasattr(x, "scales") and hasattr(x, "matmul")

MODEL, DATA = "model", "data"
COLUMN = frozenset({"wq", "wk", "wv", "w_gate", "w_up", "moe_gate", "moe_up"})
COLUMN_BIAS = frozenset({"bq", "bk", "bv", "b_gate", "b_up"})
ROW = frozenset({"wo", "w_down", "moe_down"})
KV_KEYS = frozenset({"wk", "wv", "bk", "bv"})


def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A mesh of dp x tp devices with axes ("data", "model") from the visible devices (all
    processes'). With several processes, each replica (a row) takes tp / processes devices
    from every process when that divides, so a replica's collectives span the hosts evenly and
    every process holds a part of every replica; otherwise rows follow the device order."""
    devices = list(jax.devices() if devices is None else devices)
    for name, v in (("tp", tp), ("dp", dp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"make_mesh: {name} must be a positive integer, got {v!r}")
    if tp * dp > len(devices):
        raise ValueError(f"make_mesh: tp * dp = {tp * dp} devices wanted, {len(devices)} visible "
                         "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))[: tp * dp]
    procs = sorted({d.process_index for d in devices})
    if len(procs) > 1 and tp % len(procs) == 0:
        per = {p: [d for d in devices if d.process_index == p] for p in procs}
        k = tp // len(procs)
        rows = [[d for p in procs for d in per[p][r * k:(r + 1) * k]] for r in range(dp)]
        grid = np.array(rows, dtype=object)
    else:
        grid = np.array(devices, dtype=object).reshape(dp, tp)
    return Mesh(grid, (DATA, MODEL))


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape.get(MODEL, 1))


def dp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape.get(DATA, 1))


def check_mesh(mesh) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (jaxinfer.make_mesh(tp=..., dp=...)), got "
                        f"{type(mesh).__name__}")
    extra = set(mesh.axis_names) - {MODEL, DATA}
    if extra or MODEL not in mesh.axis_names:
        raise ValueError(f"mesh axes must be 'model' and optionally 'data', got {mesh.axis_names}")


@dataclasses.dataclass(frozen=True)
class TPLayout:
    """How a config maps onto tp devices (see the module docstring)."""

    tp: int
    kv_replicas: int  # each KV head stored this many times (1: split, no copies)
    vocab_padded: int  # rows of the embedding / columns of the LM head, a multiple of tp

    @classmethod
    def plan(cls, config: ModelConfig, tp: int) -> "TPLayout":
        """The layout for `config` (the checkpoint's own, unreplicated) on tp devices; raises a
        ConfigError naming the dimension tp does not divide."""
        problems = []
        if config.num_heads % tp:
            problems.append(f"num_attention_heads = {config.num_heads} is not a multiple of tp = {tp}")
        kv = config.num_kv_heads
        if kv % tp and tp % kv:
            problems.append(f"num_key_value_heads = {kv} neither divides nor is divided by tp = {tp}")
        if config.intermediate_size % tp:
            problems.append(f"intermediate_size = {config.intermediate_size} is not a multiple of tp = {tp}")
        if config.num_experts and config.moe_intermediate_size % tp:
            problems.append(f"moe_intermediate_size = {config.moe_intermediate_size} is not a multiple of tp = {tp}")
        if problems:
            raise ConfigError(f"cannot shard {config.model_type} over tp = {tp}: " + "; ".join(problems))
        return cls(tp=tp, kv_replicas=1 if kv % tp == 0 else tp // kv, vocab_padded=-(-config.vocab_size // tp) * tp)

    def sharded_config(self, config: ModelConfig) -> ModelConfig:
        """The config of the model the devices run: KV heads replicated to tp when fewer."""
        return dataclasses.replace(config, num_kv_heads=config.num_kv_heads * self.kv_replicas)


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """What one device's layer body sees inside shard_map: its share of the heads and of the
    MLP width (`config` is the sharded one, KV heads already replicated)."""
    if tp == 1:
        return config
    return dataclasses.replace(
        config, num_heads=config.num_heads // tp, num_kv_heads=config.num_kv_heads // tp,
        intermediate_size=config.intermediate_size // tp,
        moe_intermediate_size=config.moe_intermediate_size // tp if config.num_experts else 0,
        quant=None)  # the group checks were made on the whole widths; weights carry their own format


def dense_spec(key: str | None, ndim: int) -> P:
    """The spec of a dense parameter leaf by its key (leading stacked dims are never split)."""
    if key == "embed":
        tail = (MODEL, None)
    elif key == "lm_head":
        tail = (None, MODEL)
    elif key in COLUMN:
        tail = (None, MODEL)
    elif key in COLUMN_BIAS:
        tail = (MODEL,)
    elif key in ROW:
        tail = (MODEL, None)
    else:
        return P()
    return P(*([None] * (ndim - len(tail))), *tail)


def _quant_spec(key: str, w: QuantizedWeight, field: str, ndim: int, tp: int) -> P:
    lead = [None] * (ndim - 2)
    if key in COLUMN:
        if field in ("codes", "scales", "zeros"):
            return P(*lead, None, MODEL)
        return P()
    if key not in ROW:
        return P()
    if w.kind == "llm_int8" and w.threshold > 0:
        raise ConfigError(f"{key}: LLM.int8 weights cannot be split over their input rows (tp = {tp}): the "
                          "activation quantization takes a max over every input column; use tp = 1")
    k = w.in_features
    if w.codes.shape[-2] % tp:
        raise ConfigError(f"{key}: {w.codes.shape[-2]} packed input rows do not split over tp = {tp}")
    if field == "codes":
        return P(*lead, MODEL, None)
    if field == "g_idx":
        return P(*([None] * (ndim - 1)), MODEL)
    if field in ("scales", "zeros"):
        groups = w.scales.shape[-2]
        if w.g_idx is not None or groups == 1:
            return P()  # every row may read any group (act-order) / one scale per column
        if (k // tp) % w.group_size:
            raise ConfigError(f"{key}: quantization groups of {w.group_size} input rows would straddle devices "
                              f"(K = {k} over tp = {tp}: {k // tp} rows each)")
        return P(*lead, MODEL, None)
    return P()


def _key_of(path) -> str | None:
    """The parameter name a leaf belongs to: the last dict key on its path."""
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return keys[-1] if keys else None


def param_specs(params: Any, tp: int) -> list[P]:
    """One PartitionSpec per leaf of `params` (in `jax.tree.leaves` order)."""
    specs = []

    def visit(path, x):
        key = _key_of(path)
        if is_quantized(x):
            for name in ("codes", "scales", "zeros", "g_idx", "table"):
                a = getattr(x, name)
                if a is not None:
                    specs.append(_quant_spec(key, x, name, a.ndim, tp))
        else:
            specs.append(dense_spec(key, x.ndim))

    jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: is_quantized(x))
    if len(specs) != len(jax.tree.leaves(params)):
        raise AssertionError("param_specs: QuantizedWeight fields out of step with its PyTree leaves")
    return specs


def pool_spec(x) -> P:
    """The spec of a KV-pool leaf: pages [layers, pages, page_size, kv_heads, head_dim], int8
    scales [layers, pages, kv_heads, page_size], int8 K smoothing [layers, kv_heads, head_dim],
    fp8 scales [layers, kv_heads] (split over kv_heads); a [1] placeholder is replicated."""
    axis = {5: 3, 4: 2, 3: 1, 2: 1}.get(x.ndim)
    if axis is None:
        return P()
    return P(*([None] * axis), MODEL, *([None] * (x.ndim - axis - 1)))


def place_params(params: Any, mesh: Mesh) -> Any:
    """`params` (host or device arrays) placed on `mesh` by `param_specs`."""
    leaves, treedef = jax.tree.flatten(params)
    specs = param_specs(params, tp_size(mesh))
    return jax.tree.unflatten(treedef, [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(leaves, specs)])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _repeat_heads(x: np.ndarray, heads: int, r: int) -> np.ndarray:
    """Columns (last axis) [heads * d] -> [heads * r * d], each head's block repeated r times."""
    lead, n = x.shape[:-1], x.shape[-1]
    return np.repeat(x.reshape(*lead, heads, n // heads), r, axis=-2).reshape(*lead, n * r)


def _pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np.pad(x, pad)


def shard_params(config: ModelConfig, params: Any, mesh: Mesh) -> tuple[ModelConfig, Any]:
    """A one-device model's (config, params) laid out for `mesh`: KV heads replicated where
    needed, the vocabulary padded, every leaf placed by `param_specs`. Goes through the host
    (one whole copy of each tensor at a time); `load_model(..., mesh=)` reads each device's
    slices straight from the checkpoint instead."""
    tp = tp_size(mesh)
    layout = TPLayout.plan(config, tp)
    kv, r, vp = config.num_kv_heads, layout.kv_replicas, layout.vocab_padded

    def fix(path, x):
        key = _key_of(path)
        if is_quantized(x):
            if r > 1 and key in KV_KEYS:
                x = x.replace(**{f: jax.device_put(_repeat_heads(np.asarray(getattr(x, f)), kv, r))
                                 for f in ("codes", "scales", "zeros") if getattr(x, f) is not None})
            return x
        if r > 1 and key in KV_KEYS:
            x = _repeat_heads(np.asarray(x), kv, r)
        if key == "embed" and x.shape[0] != vp:
            x = _pad_axis(np.asarray(x), 0, vp)
        if key == "lm_head" and x.shape[-1] != vp:
            x = _pad_axis(np.asarray(x), x.ndim - 1, vp)
        return x

    params = jax.tree_util.tree_map_with_path(fix, params, is_leaf=lambda x: is_quantized(x))
    return layout.sharded_config(config), place_params(params, mesh)
