"""One attention interface for the runtime; the implementations live in `pallas_kernels/`.

`backend` is a static string (EngineConfig.attention_backend):
- "auto": the Pallas Mosaic GPU kernels on a Hopper GPU (sm_90) when the inputs are ones they
  support (bf16/fp16, head_dim <= 128, ...; sliding windows and soft-capping included), else "xla".
- "xla": jnp written for XLA (the CPU path): decode attends over a dense per-burst view of the
  live positions (below), the paged pool is read with the layer index folded into the gather.
- "reference": the plain-jnp references of `pallas_kernels` (the oracles for the kernels and
  for "xla"; they gather every slot's whole page table).
- "pallas": the kernels, compiled for the GPU; unsupported inputs raise instead of falling back.
- "interpret": the kernels in Mosaic GPU interpret mode (CPU testing); unsupported inputs raise.

The KV pool is always passed whole, `[layers, pages, page_size, kv_heads, head_dim]`, with the
layer index: slicing one layer out of it (or out of anything big) makes XLA copy it first.

Quantized KV (EngineConfig.kv_dtype "int8" / "fp8_e4m3"; formats in pallas_kernels/kv_quant.py):
the pool holds int8 / float8_e4m3fn pages and `k_scales` / `v_scales` next to them (int8:
`[layers, pages, kv_heads, page_size]` bf16, one per token and KV head; fp8: `[layers,
kv_heads]` float32). `write_kv` quantizes as it writes and returns the value every reader will
dequantize, which the writer's own attention (fresh prefill, decode views) then uses, so a
position reads the same whether it was just written, cached, or gathered into a view. Every
reader here dequantizes in jnp; the paged kernel dequantizes after its copy. Float pools take
no scales (`k_scales` etc. are then ignored) and run exactly the code they always did.

Int8 K is smoothed per channel (`smooth_qk`): keys have outlier channels (a few channels of a
head several times the rest), and one int8 scale per token is set by the largest, so the small
channels keep only a few levels. An int8 pool stores `k / c` and attends with `q * c` (c per
layer, KV head and channel, `EngineState.k_channel`, calibrated by jaxinfer/kv_smoothing.py):
`(q * c) . (k / c) = q . k`, so every reader and kernel is unchanged and only the rounding moves.

Per-layer settings (`LayerAttention`: sliding window, logit soft-cap, score scale) come from
the model's layer (jaxinfer/model.py). The window is a Python int or None in the unstacked
Python layer loop, and a traced int32 scalar inside the layer `lax.scan` when layers differ
(Gemma's local and global layers; `NO_WINDOW` for a global one): every path here takes both.

Decode views (the "xla" decode path). One decode step reads every live K/V position of every
slot; gathering them from scattered pages into the layout a batched dot wants costs several
times the dot itself on XLA:CPU (a strided transposing copy). `decode_view` does that gather
once per decode burst, for `span` positions (a bucket over the live lengths, so the work
follows the real context, not max_seq_len): per layer K^T `[slots, kv_heads, head_dim, span]`
and V `[slots, kv_heads, span, head_dim]` in float32, the canonical operands of the two batched
dots. Each step writes its new token into the view in place (`view_write`) as well as into
the pool, and `view_attention` attends over it. Positions >= length are masked with `where`, so
whatever the view holds there (other pages' data, NaN) cannot leak.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped

from pallas_kernels import NO_WINDOW, is_sm90, kv_quant, masked_softmax, soft_cap
from pallas_kernels import flash_attention as fa
from pallas_kernels import paged_attention as pa

BACKENDS = ("auto", "xla", "reference", "pallas", "interpret")
KERNEL_HEAD_DIMS = (64, 128)
Window = int | Int[Array, ""] | None  # a static window, a traced one (NO_WINDOW: none), or none

__all__ = ["BACKENDS", "NO_WINDOW", "LayerAttention", "chunk_attention", "chunk_attention_reference",
           "decode_attention", "decode_view", "prefill_attention", "smooth_qk", "uses_views", "view_attention", "view_write",
           "write_kv", "write_layer_kv"]

KVPool = Shaped[Array, "layers pages page_size kv_heads head_dim"]  # float, int8 or float8_e4m3fn
KVScales = Float[Array, "..."]  # int8: [layers, pages, kv_heads, page_size]; fp8: [layers, kv_heads]; float: unused
KChannel = Float[Array, "..."]  # int8: [layers, kv_heads, head_dim] (kv_smoothing.py); other pools: unused


def _layer_scales(pool, scales, layer):
    """The scales of `layer` of a quantized pool (None for a float pool)."""
    return scales[layer] if kv_quant.is_quantized(pool.dtype) else None


def _gather_pages(pool, scales, layer, table):
    """float32 `pool[layer, table]` ([*table, page_size, kv_heads, head_dim]), dequantized; the
    layer index folded into the gather (no copy of the layer's pool)."""
    x = pool[layer, table]
    if jnp.dtype(pool.dtype) == kv_quant.INT8:
        return kv_quant.dequantize(x, scales[layer, table])
    return kv_quant.dequantize(x, _layer_scales(pool, scales, layer))


def smooth_qk(q: Float[Array, "*b q_heads head_dim"], k: Float[Array, "*b kv_heads head_dim"], pool: KVPool,
              k_channel: KChannel, layer) -> tuple[Array, Array]:
    """(q * c, k / c) for an int8 pool (c = k_channel[layer], each KV head's c repeated over its
    query heads), (q, k) for any other: call before `write_kv` and the attention of a layer."""
    if jnp.dtype(pool.dtype) != kv_quant.INT8:
        return q, k
    c = k_channel[layer].astype(jnp.float32)
    cq = jnp.repeat(c, q.shape[-2] // c.shape[0], axis=0)
    return (q.astype(jnp.float32) * cq).astype(q.dtype), (k.astype(jnp.float32) / c).astype(k.dtype)


def write_layer_kv(cache: tuple, layer, page, off, q, k, v) -> tuple[Array, Array, Array, tuple]:
    """Write a layer's new K and V into the pool `cache` = (k_pages, v_pages, k_scales, v_scales,
    k_channel): K smoothed (int8, `smooth_qk`), both quantized (8-bit, `write_kv`). Returns
    (q, k, v, cache) with q, k, v what the layer's attention must use (the smoothed query; the
    values a later read of the pages will see). Every writer of the pool goes through here."""
    kp, vp, ks, vs, kc = cache
    q, k = smooth_qk(q, k, kp, kc, layer)
    kp, ks, k = write_kv(kp, ks, layer, page, off, k)
    vp, vs, v = write_kv(vp, vs, layer, page, off, v)
    return q, k, v, (kp, vp, ks, vs, kc)


def write_kv(pool: KVPool, scales: KVScales, layer, page, off, x: Float[Array, "*b kv_heads head_dim"]):
    """Write K or V `x` at (layer, page[...], off[...]), quantizing into 8-bit pools. Returns
    (pool, scales, x_read): x_read is what readers will see at those positions (x itself for
    float pools, the dequantized value for 8-bit ones)."""
    if not kv_quant.is_quantized(pool.dtype):
        return pool.at[layer, page, off].set(x.astype(pool.dtype)), scales, x
    per_head = scales[layer] if jnp.dtype(pool.dtype) == kv_quant.FP8 else None  # fp8: [kv_heads]
    q, sc, x_read = kv_quant.quantize(x, pool.dtype, per_head)
    pool = pool.at[layer, page, off].set(q)
    if sc is not None:  # int8: the per-token scales, [layers, pages, kv_heads, page_size]
        scales = scales.at[layer, page, :, off].set(sc)
    return pool, scales, x_read.astype(x.dtype)


class LayerAttention(NamedTuple):
    """One layer's attention settings (model.layer computes them from the layer index)."""

    window: Window = None  # a query sees itself and the window - 1 keys before it
    softcap: float | None = None  # scores s -> softcap * tanh(s / softcap) (Gemma 2)
    scale: float | None = None  # score scale; None: head_dim ** -0.5

    def kwargs(self) -> dict:
        return dict(sliding_window=self.window, softcap=self.softcap, scale=self.scale)


def _kernel_head_dim(head_dim: int) -> int:
    """Smaller head dims (e.g. stories260K's 8) are zero-padded up to one the kernels take:
    zero columns add nothing to q.k, and V's zero columns are sliced off the output. It costs a
    padded copy of the inputs (the whole layer pool in decode), fine for the small models that
    have such heads."""
    return next((d for d in KERNEL_HEAD_DIMS if d >= head_dim), head_dim)


def _pad(x, head_dim: int):
    return x if x.shape[-1] == head_dim else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, head_dim - x.shape[-1])])


def _spec(x, head_dim: int):
    return jax.ShapeDtypeStruct(x.shape[:-1] + (head_dim,), x.dtype)


def _use_kernel(backend: str, check) -> bool:
    """Whether to call the kernel; `check()` raises for inputs it does not support."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend in ("reference", "xla"):
        return False
    if backend == "auto":
        if not is_sm90():
            return False
        try:
            check()
        except (ValueError, NotImplementedError):
            return False
        return True
    check()  # "pallas" / "interpret": the caller asked for the kernel, so say why it can't run
    return True


def uses_views(backend: str) -> bool:
    """Whether decode on this backend attends over `decode_view`s (the "xla" path)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    return backend == "xla" or (backend == "auto" and not is_sm90())


def prefill_attention(
    q: Float[Array, "batch seq q_heads head_dim"],
    k: Float[Array, "batch seq kv_heads head_dim"],
    v: Float[Array, "batch seq kv_heads head_dim"],
    *,
    lengths: Int[Array, "batch"] | None,
    sliding_window: Window = None,
    softcap: float | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Float[Array, "batch seq q_heads head_dim"]:
    """Causal self-attention over each row's first `lengths` tokens; padded rows give zeros."""
    hd, d = q.shape[-1], _kernel_head_dim(q.shape[-1])
    scale = hd**-0.5 if scale is None else scale

    def check():
        fa.check_flash_attention_kernel_inputs(_spec(q, d), _spec(k, d), _spec(v, d), lengths,
                                               sliding_window=sliding_window, softcap=softcap)

    if _use_kernel(backend, check):
        out = fa.flash_attention(_pad(q, d), _pad(k, d), _pad(v, d), lengths=lengths, causal=True,
                                 scale=scale, sliding_window=sliding_window, softcap=softcap,
                                 interpret=backend == "interpret")
        return out[..., :hd]
    return fa.flash_attention_reference(q, k, v, lengths=lengths, causal=True, sliding_window=sliding_window,
                                        softcap=softcap, scale=scale)


def decode_attention(
    q: Float[Array, "slots q_heads head_dim"],
    k_pool: KVPool,
    v_pool: KVPool,
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "slots pages_per_seq"],
    lengths: Int[Array, "slots"],
    *,
    sliding_window: Window = None,
    softcap: float | None = None,
    scale: float | None = None,
    backend: str = "auto",
    k_scales: KVScales | None = None,
    v_scales: KVScales | None = None,
) -> Float[Array, "slots q_heads head_dim"]:
    """One query per slot against that slot's pages of `layer`; `lengths` counts the query's own
    token. Every table entry is read: pass page_table[:, :P] to bound the work by P pages.
    8-bit pools need their `k_scales` / `v_scales` (the whole arrays, like the pools)."""
    hd, d = q.shape[-1], _kernel_head_dim(q.shape[-1])
    scale = hd**-0.5 if scale is None else scale
    spec = jax.ShapeDtypeStruct(k_pool.shape[1:-1] + (d,), k_pool.dtype)
    ks, vs = _layer_scales(k_pool, k_scales, layer), _layer_scales(v_pool, v_scales, layer)
    kq = dict(k_scales=ks, v_scales=vs)

    def check():
        sspec = None if ks is None else jax.ShapeDtypeStruct(ks.shape, ks.dtype)
        pa.check_paged_attention_kernel_inputs(_spec(q, d), spec, spec, page_table, lengths,
                                               sliding_window=sliding_window, softcap=softcap,
                                               k_scales=sspec, v_scales=sspec)

    if _use_kernel(backend, check):
        out = pa.paged_attention(_pad(q, d), _pad(k_pool[layer], d), _pad(v_pool[layer], d), page_table, lengths,
                                 sliding_window=sliding_window, softcap=softcap, scale=scale,
                                 interpret=backend == "interpret", **kq)
        return out[..., :hd]
    if backend == "reference":
        return pa.paged_attention_reference(q, k_pool[layer], v_pool[layer], page_table, lengths,
                                            sliding_window=sliding_window, softcap=softcap, scale=scale, **kq)
    return view_attention(q, _gather_view(k_pool, v_pool, layer, page_table, lengths, k_scales, v_scales), lengths,
                          sliding_window=sliding_window, softcap=softcap, scale=scale)


# ----------------------------------------------------------------------------- decode views
# Two layouts, chosen by the head shape (static): "folded" [slots, span, kv_heads * head_dim] is
# the pages' own layout (building the view is a plain copy of whole pages, appending a token a
# contiguous row) and attends with one GEMM per slot against a block-diagonal query, which spends
# kv_heads times the minimal FLOPs but beats per-head batched dots when the heads are small;
# "per-head" [slots, kv_heads, span, head_dim] costs a transposing gather per burst and a GEMM
# per (slot, KV head). Measured on a 2-core Sapphire Rapids (8-layer chain, 16 slots, span 128):
# head_dim 8 (stories260K) 0.09 vs 0.16 ms per layer; with 4 KV heads of 64, 0.29 vs 0.34 at 16
# slots and span 128 but 2.7 vs 2.4 at 32 slots and span 256, so wide heads stay per-head.
FOLD_MAX_WIDTH = 128  # kv_heads * head_dim up to which the folded layout is used

DecodeView = tuple[Float[Array, "..."], Float[Array, "..."]]


def _folded(kv_heads: int, head_dim: int) -> bool:
    return kv_heads * head_dim <= FOLD_MAX_WIDTH


def _gather_view(k_pool, v_pool, layer, page_table, lengths, k_scales=None, v_scales=None) -> DecodeView:
    """K and V of `layer` for every position of the table's pages, float32, zero at positions >=
    lengths (so later steps never meet garbage, NaN included, and need no V mask); in the
    layout `_folded` picks (see above)."""
    s, p = page_table.shape
    _, _, ps, kvh, d = k_pool.shape
    valid = (jnp.arange(p * ps) < lengths[:, None]).reshape(s, p, ps, 1, 1)
    # One gather each, the layer index folded in (no copy of the layer's pool); dequantized.
    k = jnp.where(valid, _gather_pages(k_pool, k_scales, layer, page_table), 0.0)  # [s, p, ps, kvh, d]
    v = jnp.where(valid, _gather_pages(v_pool, v_scales, layer, page_table), 0.0)
    if _folded(kvh, d):
        return k.reshape(s, p * ps, kvh * d), v.reshape(s, p * ps, kvh * d)
    # Whole head_dim rows move (a K^T layout would make this a strided element-wise transpose,
    # several times slower than the dot it saves).
    return tuple(x.transpose(0, 3, 1, 2, 4).reshape(s, kvh, p * ps, d) for x in (k, v))


def decode_view(
    k_pool: KVPool,
    v_pool: KVPool,
    page_table: Int[Array, "slots pages_per_seq"],
    lengths: Int[Array, "slots"],
    span: int,
    k_scales: KVScales | None = None,
    v_scales: KVScales | None = None,
) -> tuple[DecodeView, ...]:
    """Per layer, the dense K / V view of each slot's first `span` positions (a multiple of the
    page size; positions >= lengths are zero; 8-bit pools dequantized); see the module docstring."""
    pages = page_table[:, : span // k_pool.shape[2]]
    return tuple(_gather_view(k_pool, v_pool, i, pages, lengths, k_scales, v_scales) for i in range(k_pool.shape[0]))


def view_write(view: DecodeView, k: Float[Array, "slots kv_heads head_dim"], v: Float[Array, "slots kv_heads head_dim"],
               pos: Int[Array, "slots"]) -> DecodeView:
    """Write each slot's new K/V at its own position (in place under jit); a position outside the
    view (an idle slot) is dropped."""
    kk, vv = view
    rows = jnp.arange(kk.shape[0])
    if kk.ndim == 3:  # folded
        s = k.shape[0]
        return (kk.at[rows, pos].set(k.reshape(s, -1).astype(kk.dtype), mode="drop"),
                vv.at[rows, pos].set(v.reshape(s, -1).astype(vv.dtype), mode="drop"))
    kk = kk.at[rows, :, pos, :].set(k.astype(kk.dtype), mode="drop")
    vv = vv.at[rows, :, pos, :].set(v.astype(vv.dtype), mode="drop")
    return kk, vv


def view_attention(q: Float[Array, "slots q_heads head_dim"], view: DecodeView, lengths: Int[Array, "slots"], *,
                   sliding_window: Window = None, softcap: float | None = None,
                   scale: float | None = None) -> Float[Array, "slots q_heads head_dim"]:
    """Decode attention over a dense view: positions < lengths (and inside the window) count;
    scores are scaled by `scale` (None: head_dim ** -0.5) and soft-capped by `softcap`.

    Scores are computed as K @ q^T (positions as the GEMM's rows): with 1-8 query heads per KV
    head that tall GEMM runs ~2x faster on XLA:CPU than q @ K^T against the same layout. The
    folded layout multiplies by a block-diagonal query (query head h only sees its KV head's
    columns) and keeps the diagonal blocks of the output."""
    k, v = view
    s, hq, d = q.shape
    scale = d**-0.5 if scale is None else scale
    span = k.shape[-2] if k.ndim == 4 else k.shape[1]
    pos = jnp.arange(span)[None, :]
    visible = pos < lengths[:, None]
    if sliding_window is not None:
        visible &= (lengths[:, None] - 1) - pos < sliding_window
    q32 = q.astype(jnp.float32)
    if k.ndim == 3:  # folded: [slots, span, kv_heads * head_dim]
        kvh = k.shape[-1] // d
        own = (jnp.arange(hq)[:, None] // (hq // kvh)) == jnp.arange(kvh)[None, :]  # [q_heads, kv_heads]
        qbd = jnp.where(own[None, :, :, None], q32[:, :, None, :], 0.0).reshape(s, hq, kvh * d)
        scores = soft_cap(jnp.einsum("stc,shc->sth", k, qbd) * scale, softcap)  # [slots, span, q_heads]
        probs = masked_softmax(jnp.moveaxis(scores, 1, 2), visible[:, None, :])  # [slots, q_heads, span]
        out = jnp.einsum("sht,stc->shc", probs, v).reshape(s, hq, kvh, d)  # v finite: zero past every length
        return jnp.sum(jnp.where(own[None, :, :, None], out, 0.0), axis=2).astype(q.dtype)
    kvh = k.shape[1]
    qg = q32.reshape(s, kvh, hq // kvh, d)
    scores = soft_cap(jnp.einsum("sktd,skgd->sktg", k, qg) * scale, softcap)  # [slots, kv_heads, span, group]
    probs = masked_softmax(jnp.moveaxis(scores, 2, 3), visible[:, None, None, :])
    out = jnp.einsum("skgt,sktd->skgd", probs, v)  # v is finite everywhere: zero past every length
    return out.reshape(s, hq, d).astype(q.dtype)


def chunk_attention_reference(
    q: Float[Array, "batch seq q_heads head_dim"],
    k_pool: KVPool,
    v_pool: KVPool,
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "batch pages_per_seq"],
    start: Int[Array, "batch"],
    *,
    sliding_window: Window = None,
    softcap: float | None = None,
    scale: float | None = None,
    k_scales: KVScales | None = None,
    v_scales: KVScales | None = None,
) -> Float[Array, "batch seq q_heads head_dim"]:
    """A prefill chunk against the paged pool: query i of row b sits at position start[b] + i and
    attends causally to every position <= its own in the row's pages (the cached prefix plus
    the chunk, whose K/V were written first). Float32 softmax; masked with `where`, so whatever
    lies in pages beyond the query's position (stale data, NaN) cannot leak. Rows past a chunk's
    valid length produce values the caller ignores.

    Gathers the row's whole page table (max_seq_len positions): the plain-jnp path for prefix-cache
    continuations and chunked prefill on every backend (there is no paged-prefill kernel yet).
    """
    b, t, hq, d = q.shape
    kvh = k_pool.shape[3]
    g = hq // kvh
    if kv_quant.is_quantized(k_pool.dtype):  # dequantized to float32 (the float path below is unchanged)
        k = _gather_pages(k_pool, k_scales, layer, page_table).reshape(b, -1, kvh, d)
        v = _gather_pages(v_pool, v_scales, layer, page_table).reshape(b, -1, kvh, d)
    else:
        k = k_pool[layer, page_table].reshape(b, -1, kvh, d)  # [b, S, kvh, d]; the layer folded into the gather
        v = v_pool[layer, page_table].reshape(b, -1, kvh, d)
    qpos = start[:, None] + jnp.arange(t)[None, :]  # [b, t]
    kpos = jnp.arange(k.shape[1])
    allowed = kpos[None, None, :] <= qpos[:, :, None]  # [b, t, S]
    if sliding_window is not None:
        allowed &= qpos[:, :, None] - kpos[None, None, :] < sliding_window
    qg = q.reshape(b, t, kvh, g, d).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # as the other references: no TF32 on GPU
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32), precision=hi) * (d**-0.5 if scale is None else scale)
    s = soft_cap(s, softcap)
    s = jnp.where(allowed[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(allowed[:, None, None], p, 0.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p, jnp.where(jnp.isfinite(v), v, 0).astype(jnp.float32), precision=hi)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def chunk_attention(
    q: Float[Array, "batch seq q_heads head_dim"],
    k: Float[Array, "batch seq kv_heads head_dim"],
    v: Float[Array, "batch seq kv_heads head_dim"],
    k_pool: KVPool,
    v_pool: KVPool,
    layer: Int[Array, ""] | int,
    page_table: Int[Array, "batch pages_per_seq"],
    start: Int[Array, "batch"],
    n: Int[Array, "batch"],
    *,
    sliding_window: Window = None,
    softcap: float | None = None,
    scale: float | None = None,
    backend: str = "auto",
    k_scales: KVScales | None = None,
    v_scales: KVScales | None = None,
) -> Float[Array, "batch seq q_heads head_dim"]:
    """Attention for a prefill chunk at positions [start, start + n) of each row, whose K/V are
    `k`, `v` (already written to the pages too; for 8-bit pools, the dequantized values
    `write_kv` returned). When every row starts at 0 (no cached prefix,
    first chunk) this is plain causal prefill over the chunk and runs `prefill_attention` (the
    flash kernel where it applies); otherwise the paged reference above."""
    opts = dict(sliding_window=sliding_window, softcap=softcap, scale=scale)

    def fresh(_):
        return prefill_attention(q, k, v, lengths=n, backend=backend, **opts)

    def paged(_):
        quant = dict(k_scales=k_scales, v_scales=v_scales) if kv_quant.is_quantized(k_pool.dtype) else {}
        return chunk_attention_reference(q, k_pool, v_pool, layer, page_table, start, **opts, **quant)

    return jax.lax.cond(jnp.all(start == 0), fresh, paged, None)
