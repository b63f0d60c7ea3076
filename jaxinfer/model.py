"""The decoder of every supported family (Llama, Mistral, Qwen2/3, Qwen3-MoE, Gemma 2/3, Phi-3,
Mixtral) as pure functions over a parameter PyTree.

Parameter layout (`Model.params`), layers stacked on a leading axis so one `lax.scan` body
serves every layer (compile time does not grow with depth). Linear weights are stored
[in, out] (transposed from HF's [out, in]) so a layer is `x @ w`:

    embed        [vocab, hidden]
    layers/
      attn_norm  [layers, hidden]
      wq         [layers, hidden, q_heads*head_dim]     bq [layers, q_heads*head_dim]   (qkv_bias)
      wk, wv     [layers, hidden, kv_heads*head_dim]    bk, bv [layers, kv_heads*head_dim]
      q_norm, k_norm [layers, head_dim]                 (qk_norm: Qwen3, Gemma 3)
      wo         [layers, q_heads*head_dim, hidden]     bo [layers, hidden]              (o_bias)
      attn_out_norm, mlp_out_norm [layers, hidden]      (sandwich_norms: Gemma 2/3)
      mlp_norm   [layers, hidden]
      w_gate, w_up [dense, hidden, ffn]                 b_gate, b_up [dense, ffn]       (mlp_bias)
      w_down     [dense, ffn, hidden]                   b_down [dense, hidden]           (mlp_bias)
      router     [moe, hidden, experts]                 (MoE layers, jaxinfer/moe.py)
      moe_gate, moe_up [moe, experts, hidden, moe_ffn]  moe_down [moe, experts, moe_ffn, hidden]
    final_norm   [hidden]
    lm_head      [hidden, vocab]                        (absent when tie_word_embeddings)

`dense` / `moe`: the dense-MLP parameters are stacked over the dense layers only, the expert
ones over the MoE layers only (all layers of a dense model; Qwen3-MoE's mlp_only_layers are
dense). One layer body (`layer`) serves every family, `forward` (no cache), the engine's
prefill and decode steps and GPTQ calibration; they differ only in the `attend` callback, which
does attention and any KV-cache bookkeeping.

Per-layer variation is data, never a second layer body:
- a layer's sliding window and RoPE table (Gemma's local/global layers, Gemma 3's two RoPE
  bases) are `ModelConfig.layer_window(i)` / `layer_rope(i)`: a Python value when the layer
  index is a Python int (the unstacked loop), an int32 array indexed by the traced layer index
  inside the scan (one compiled body for all layers);
- layers of different shapes (dense vs MoE MLP) are grouped: `layer_segments` cuts the stack
  into scans whose body runs a short repeating pattern of layers (one segment for uniform
  models and periodic patterns such as decoder_sparse_step = 2; one scan per run of equal
  layers otherwise, e.g. a dense first layer), so the model is never unrolled layer by layer.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jax.sharding import PartitionSpec as P

from jaxinfer.attention import NO_WINDOW, LayerAttention, prefill_attention
from jaxinfer.config import ModelConfig
from jaxinfer.moe import activation, moe_mlp
from jaxinfer.sharding import MODEL, local_config, param_specs, pool_spec, shard_params, tp_size

Params = dict[str, Any]
DENSE_MLP_KEYS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")  # stacked over the dense layers
MOE_KEYS = ("router", "moe_gate", "moe_up", "moe_down")  # stacked over the MoE layers


@flax.struct.dataclass
class Model:
    """A config (static: part of the jit cache key) and its parameters (a PyTree of arrays).

    `params["layers"]` is either one dict of arrays stacked on a leading layer axis (the stored
    form: `decoder` runs `lax.scan`s, so compile time does not grow with depth; the dense-MLP
    and expert parameters are stacked over their own layers, see the module docstring) or a
    tuple of per-layer dicts, each with its own layer's MLP parameters (`unstacked()`:
    `decoder` runs a Python loop; on XLA:CPU this is what lets
    every matmul read its weight in place: a scan, or a static slice of a stacked weight,
    copies it first, which costs as much as the matmul at decode sizes).

    `compute_dtype` (static): the dtype of activations and of the KV cache; None = the weights'.
    Matmuls take their inputs in the weight's dtype and accumulate in float32, so bfloat16
    weights with float32 compute run XLA:CPU's fastest dot (bf16 in, f32 out) while norms,
    residuals and attention stay in float32.
    """

    config: ModelConfig = flax.struct.field(pytree_node=False)
    params: Params
    compute_dtype: str | None = flax.struct.field(pytree_node=False, default=None)
    # Tensor parallelism (jaxinfer/sharding.py): the mesh the params are laid out on; None: one
    # device. With a mesh, `config` is the sharded one (KV heads replicated up to tp if fewer).
    mesh: Any = flax.struct.field(pytree_node=False, default=None)

    @property
    def tp(self) -> int:
        return tp_size(self.mesh)

    def on_mesh(self, mesh) -> "Model":
        """This one-device model laid out on `mesh` (sharding.shard_params: through the host,
        one tensor at a time; `load_model(path, mesh=mesh)` reads only each device's slices)."""
        if self.mesh is not None:
            raise ValueError("on_mesh: the model is already on a mesh; build it from the one-device model")
        config, params = shard_params(self.config, self.stacked().params, mesh)
        return self.replace(config=config, params=params, mesh=mesh)

    @property
    def weight_dtype(self):
        return self.params["embed"].dtype

    @property
    def dtype(self):
        """The compute dtype: activations and KV cache."""
        return jnp.dtype(self.compute_dtype) if self.compute_dtype is not None else self.weight_dtype

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def unstacked(self) -> "Model":
        """The same model with params["layers"] as a tuple of per-layer dicts (each its own
        buffers); see the class docstring. Idempotent."""
        layers = self.params["layers"]
        if isinstance(layers, tuple):
            return self
        if self.mesh is not None:  # splitting goes through the host: it would gather every weight
            raise ValueError("unstacked(): a sharded model keeps its stacked layers")
        return self.replace(params={**self.params, "layers": _split_layers(layers, self.config)})

    def stacked(self) -> "Model":
        """The inverse of `unstacked` (the stored form). Idempotent."""
        layers = self.params["layers"]
        if not isinstance(layers, tuple):
            return self
        keys = list(dict.fromkeys(key for lp in layers for key in lp))  # first-seen order
        return self.replace(params={**self.params, "layers": {
            key: jax.tree.map(lambda *a: jnp.stack(a), *[lp[key] for lp in layers if key in lp]) for key in keys}})


def _group(key: str) -> str:
    return "dense" if key in DENSE_MLP_KEYS else "moe" if key in MOE_KEYS else "all"


def _group_rank(config: ModelConfig, i: int) -> int:
    """Layer i's index within its group (the dense or the MoE layers)."""
    return sum(config.is_moe(j) == config.is_moe(i) for j in range(i))


def _split_layers(layers: Params, config: ModelConfig) -> tuple[Params, ...]:
    # Through the host (NumPy views; on CPU np.asarray of a device array is free): slicing on
    # the device would compile a program per weight shape.
    flat = {key: jax.tree.flatten(value) for key, value in layers.items()}
    host = {key: [np.asarray(a) for a in leaves] for key, (leaves, _) in flat.items()}
    out = []
    for i in range(config.num_layers):
        kind = "moe" if config.is_moe(i) else "dense"
        keys = [key for key in layers if _group(key) in ("all", kind)]
        index = {key: i if _group(key) == "all" else _group_rank(config, i) for key in keys}
        arrays = jax.device_put([[np.ascontiguousarray(h[index[key]]) for h in host[key]] for key in keys])
        out.append({key: jax.tree.unflatten(flat[key][1], a) for key, a in zip(keys, arrays)})
    return tuple(out)


def rms_norm(x: Float[Array, "*b hidden"], w: Float[Array, "hidden"], eps: float,
             plus_one: bool = False) -> Float[Array, "*b hidden"]:
    """As HF: normalise in float32; Llama casts back and then scales by w, Gemma scales by
    (1 + w) in float32 and then casts (the order matters in bf16)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * xf.astype(x.dtype)


def rope_tables(config: ModelConfig, positions: Int[Array, "*b"]) -> tuple[Array, Array]:
    """cos and sin [tables, *b, head_dim] for positions, in float32 as HF computes them: table 0
    from `config.rope`, table 1 from `config.rope_local` when the model has one (Gemma 3's
    local layers); `layer` picks its table by `config.layer_rope(i)`."""
    ropes = [config.rope] + ([config.rope_local] if config.rope_local is not None else [])
    inv_freq = jnp.asarray(np.stack([r.inv_freq(config.head_dim) for r in ropes]))  # [tables, head_dim // 2]
    inv_freq = inv_freq.reshape(len(ropes), *([1] * positions.ndim), -1)
    freqs = positions.astype(jnp.float32)[None, ..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Float[Array, "*b heads head_dim"], cos: Array, sin: Array) -> Float[Array, "*b heads head_dim"]:
    # HF's rotate_half convention (checkpoints store q/k rows permuted for it).
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos[..., None, :] + rotated.astype(jnp.float32) * sin[..., None, :]
    return out.astype(x.dtype)


def linear(x: Array, w: Any, b: Array | None = None) -> Array:
    # A quantized weight (any PyTree with a `matmul(x) -> float32` method, see jaxinfer.quant)
    # multiplies itself; a dense one takes x in its own dtype (never converting the weight) and
    # accumulates in float32.
    if hasattr(w, "matmul"):
        y = w.matmul(x)
    else:
        y = jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def _row_linear(x: Array, w: Any, b: Array | None, axis: str | None) -> Array:
    """A row-parallel linear: local partial product, all-reduced over `axis` (in the activation
    dtype, as vLLM does), then the bias once. Without an axis: `linear`."""
    if axis is None:
        return linear(x, w, b)
    y = jax.lax.psum(linear(x, w), axis)
    return y if b is None else (y.astype(jnp.float32) + b.astype(jnp.float32)).astype(y.dtype)


# attend(layer_index, q, k, v, cache, spec) -> (out, cache): attention for one layer (with its
# LayerAttention `spec`: window, soft-cap, scale) plus whatever the caller keeps across layers
# (the KV pool for the engine; nothing for the plain forward).
AttendFn = Callable[[Array, Array, Array, Array, Any, LayerAttention], tuple[Array, Any]]


def _per_layer(values: tuple, i: Int[Array, ""] | int, absent: int):
    """values[i] (None -> `absent` when traced): a Python value for a Python int index or when
    every layer agrees, else an int32 array indexed by the traced layer index."""
    if isinstance(i, int) or len(set(values)) == 1:
        return values[i if isinstance(i, int) else 0]
    return jnp.asarray([absent if v is None else v for v in values], jnp.int32)[i]


def layer_attention(config: ModelConfig, i: Int[Array, ""] | int) -> LayerAttention:
    """Layer i's attention settings: its sliding window (a traced int32 with NO_WINDOW for the
    global layers when local and global layers share one scan), the logit soft-cap and the
    score scale (None: head_dim ** -0.5)."""
    window = _per_layer(tuple(config.layer_window(j) for j in range(config.num_layers)), i, NO_WINDOW)
    scale = None if config.query_pre_attn_scalar is None else config.attn_scale
    return LayerAttention(window=window, softcap=config.attn_softcap, scale=scale)


def layer(
    config: ModelConfig,
    lp: Params,
    x: Float[Array, "batch seq hidden"],
    rope: tuple[Array, Array],
    attend: AttendFn,
    cache: Any,
    i: Int[Array, ""] | int,
    axis: str | None = None,
) -> tuple[Float[Array, "batch seq hidden"], Any, dict[str, Array]]:
    """One decoder layer (the only layer body: `decoder` scans it, GPTQ calibration calls it).
    `lp` is one layer's slice of params["layers"] (with its MLP: dense, or experts when it has a
    "router"); `i` its index, a Python int or a traced int32, from which the per-layer data
    (window, RoPE table) is read. Family switches are static config fields. Returns the new
    residual stream, the cache and the inputs of the layer's linear weights by the first weight
    that reads each (wq for q/k/v, wo, w_gate for gate/up, w_down; an MoE layer has no
    w_down tap), which GPTQ needs and everyone else drops.

    `axis`: inside shard_map over the tensor-parallel mesh axis (jaxinfer/sharding.py), its
    name: `config` and `lp` are then this device's share of the heads and of the MLP, and the
    two row-parallel outputs (attention's wo, the MLP's down projection) are all-reduced over
    it, their biases added once after the sum."""
    b, t = x.shape[:2]
    norm = functools.partial(rms_norm, eps=config.rms_norm_eps, plus_one=config.norm_plus_one)
    table = _per_layer(tuple(config.layer_rope(j) for j in range(config.num_layers)), i, 0)
    cos, sin = rope[0][table], rope[1][table]
    h = norm(x, lp["attn_norm"])
    q = linear(h, lp["wq"], lp.get("bq")).reshape(b, t, config.num_heads, config.head_dim)
    k = linear(h, lp["wk"], lp.get("bk")).reshape(b, t, config.num_kv_heads, config.head_dim)
    v = linear(h, lp["wv"], lp.get("bv")).reshape(b, t, config.num_kv_heads, config.head_dim)
    if config.qk_norm:  # Qwen3 / Gemma 3: per-head RMSNorm, before RoPE
        q, k = norm(q, lp["q_norm"]), norm(k, lp["k_norm"])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o, cache = attend(i, q, k, v, cache, layer_attention(config, i))
    o = o.reshape(b, t, config.q_size)
    a = _row_linear(o, lp["wo"], lp.get("bo"), axis)
    x = x + (norm(a, lp["attn_out_norm"]) if config.sandwich_norms else a)
    h2 = norm(x, lp["mlp_norm"])
    taps = {"wq": h, "wo": o, "w_gate": h2}
    if "router" in lp:
        m = moe_mlp(config, lp, h2)
        m = m if axis is None else jax.lax.psum(m, axis)
    else:
        act = activation(config, linear(h2, lp["w_gate"], lp.get("b_gate"))) * linear(h2, lp["w_up"], lp.get("b_up"))
        m = _row_linear(act, lp["w_down"], lp.get("b_down"), axis)
        taps["w_down"] = act
    x = x + (norm(m, lp["mlp_out_norm"]) if config.sandwich_norms else m)
    return x, cache, taps


Segment = tuple[int, tuple[bool, ...], int]  # (first layer, is-MoE pattern of the scan body, repeats)


def layer_segments(config: ModelConfig, max_period: int = 4) -> tuple[Segment, ...]:
    """How `decoder` scans a stacked model whose layers differ in shape (dense vs MoE MLP).

    One segment when the layer kinds repeat with a period <= max_period (all alike: period 1,
    the common case; decoder_sparse_step = 2: period 2); otherwise one segment per run of equal
    kinds (e.g. mlp_only_layers = [0]: a dense first layer, then one scan over the MoE layers).
    """
    kinds = tuple(config.is_moe(i) for i in range(config.num_layers))
    n = len(kinds)
    for p in range(1, max_period + 1):
        if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
            return ((0, kinds[:p], n // p),)
    runs, start = [], 0
    for i in range(1, n + 1):
        if i == n or kinds[i] != kinds[start]:
            runs.append((start, (kinds[start],), i - start))
            start = i
    return tuple(runs)


def _segment_params(config: ModelConfig, layers: Params, segment: Segment) -> tuple[Params, ...]:
    """Per position j of the segment's pattern, the stacked [repeats, ...] parameters of the
    layers at that position: strided slices of the all-layer stacks and of the position's group
    (the j-th layer of each repeat is layer start + j + p * step, and its rank in its group
    grows by the pattern's count of its kind per step). For a one-segment model these are the
    whole stacks."""
    start, pattern, repeats = segment
    p = len(pattern)
    out = []
    for j, moe in enumerate(pattern):
        rank, per_step = _group_rank(config, start + j), pattern.count(moe)
        kind = "moe" if moe else "dense"
        lp = {}
        for key, value in layers.items():
            group = _group(key)
            if group == "all":
                sl = slice(start + j, start + p * repeats, p)
            elif group == kind:
                sl = slice(rank, rank + per_step * repeats, per_step)
            else:
                continue
            lp[key] = jax.tree.map(lambda a, sl=sl: a[sl], value)
        out.append(lp)
    return tuple(out)


def decoder(
    model: Model,
    tokens: Int[Array, "batch seq"],
    positions: Int[Array, "batch seq"],
    attend: AttendFn,
    cache: Any,
) -> tuple[Float[Array, "batch seq hidden"], Any]:
    """Embeds tokens, runs every layer (lax.scans over stacked weights, see `layer_segments`; a
    Python loop over unstacked ones) and the final norm. `attend` gets the layer index: a
    traced int32 in the scan, a Python int in the loop.

    On a mesh (tensor parallel, jaxinfer/sharding.py) all of it runs under one `shard_map`:
    each device embeds with its vocabulary rows (masked, all-reduced), runs the layers on its
    own heads and MLP columns with the two all-reduces per layer, and `attend` reads and writes
    its own KV heads of the `cache` (every cache leaf is a KV-pool array, split by
    `sharding.pool_spec`). The output hidden state is replicated. Nothing is gathered: no
    weight and no page leaves its device."""
    tp = model.tp
    if tp == 1:
        return _decoder(model.config, model.params, model.dtype, tokens, positions, attend, cache, None)
    leaves, treedef = jax.tree.flatten(model.params)
    cache_leaves, cache_def = jax.tree.flatten(cache)
    cache_specs = [pool_spec(c) for c in cache_leaves]
    cfg = local_config(model.config, tp)

    def body(leaves, cache_leaves, tokens, positions):
        h, c = _decoder(cfg, jax.tree.unflatten(treedef, leaves), model.dtype, tokens, positions, attend,
                        jax.tree.unflatten(cache_def, cache_leaves), MODEL)
        return h, jax.tree.leaves(c)

    h, cache_leaves = jax.shard_map(
        body, mesh=model.mesh, in_specs=(param_specs(model.params, tp), cache_specs, P(), P()),
        out_specs=(P(), cache_specs), check_vma=False)(leaves, cache_leaves, tokens, positions)
    return h, jax.tree.unflatten(cache_def, cache_leaves)


def _embed(embed: Array, tokens: Array, axis: str | None) -> Array:
    """embed[tokens]; over a vocabulary-split table, each device looks up the ids in its rows
    (zeros elsewhere) and the all-reduce assembles the rows (exact: one non-zero term)."""
    if axis is None:
        return embed[tokens]
    rows = embed.shape[0]
    ids = tokens - jax.lax.axis_index(axis) * rows
    ok = (ids >= 0) & (ids < rows)
    return jax.lax.psum(jnp.where(ok[..., None], embed[jnp.clip(ids, 0, rows - 1)], 0), axis)


def _decoder(cfg: ModelConfig, p: Params, dtype, tokens, positions, attend: AttendFn, cache: Any,
             axis: str | None) -> tuple[Array, Any]:
    x = _embed(p["embed"], tokens, axis).astype(dtype)
    if cfg.embed_scale:  # Gemma: sqrt(hidden) rounded to the activation dtype, as transformers does
        x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)
    rope = rope_tables(cfg, positions)
    if isinstance(p["layers"], tuple):  # unstacked: the layer index is a Python int
        for i, lp in enumerate(p["layers"]):
            x, cache, _ = layer(cfg, lp, x, rope, attend, cache, i, axis)
    else:
        for segment in layer_segments(cfg):
            start, pattern, _ = segment

            def body(carry, lps, start=start, p=len(pattern)):
                x, cache, step = carry
                for j, lp in enumerate(lps):
                    x, cache, _ = layer(cfg, lp, x, rope, attend, cache, start + j + p * step, axis)
                return (x, cache, step + 1), None

            (x, cache, _), _ = jax.lax.scan(body, (x, cache, jnp.int32(0)), _segment_params(cfg, p["layers"], segment))
    return rms_norm(x, p["final_norm"], cfg.rms_norm_eps, cfg.norm_plus_one), cache


def lm_head(model: Model, h: Float[Array, "*b hidden"]) -> Float[Array, "*b vocab"]:
    """float32 logits; Gemma 2's final soft-cap, cap * tanh(logits / cap), included."""
    p, cfg = model.params, model.config
    tied = cfg.tie_word_embeddings
    w = p["embed"] if tied else p["lm_head"]

    def head(h, w):
        w = w.T if tied else w
        return jnp.einsum("...i,io->...o", h.astype(w.dtype), w, preferred_element_type=jnp.float32)

    if model.tp == 1:
        logits = head(h, w)
    else:  # vocabulary-split head: local logits, gathered once (sampling needs them whole)
        logits = jax.shard_map(
            lambda h, w: jax.lax.all_gather(head(h, w), MODEL, axis=h.ndim - 1, tiled=True), mesh=model.mesh,
            in_specs=(P(), P(MODEL, None) if tied else P(None, MODEL)), out_specs=P(), check_vma=False)(h, w)
        logits = logits[..., :cfg.vocab_size]  # the padding rows of a vocabulary tp does not divide
    if cfg.final_softcap is not None:
        logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
    return logits


def causal_attend(config: ModelConfig) -> AttendFn:
    """The cache-free attention of a full-sequence forward (every row full, causal)."""
    def attend(i, q, k, v, cache, spec):
        return prefill_attention(q, k, v, lengths=None, **spec.kwargs()), cache

    return attend


@jax.jit
def _forward(model: Model, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch seq vocab"]:
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _ = decoder(model, tokens, positions, causal_attend(model.config), None)
    return lm_head(model, h)


def forward(model: Model, tokens) -> Float[Array, "batch seq vocab"]:
    """Full-sequence causal forward without a cache: float32 logits [batch, seq, vocab].

    Concrete inputs are checked (rank 2, integer, ids inside the vocabulary: XLA would clamp a
    bad id silently); inside a caller's jit only the static checks apply.
    """
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= model.config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {model.config.vocab_size})")
    return _forward(model, jnp.asarray(tokens, jnp.int32))
