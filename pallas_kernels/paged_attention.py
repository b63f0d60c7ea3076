"""Decode attention over a paged KV pool: a Pallas Mosaic GPU (Hopper, sm_90) kernel,
`paged_attention`, and its plain-jnp reference, `paged_attention_reference` (the CPU path, and
the kernel's oracle)."""

import dataclasses
import math
from typing import Any

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Shaped

from pallas_kernels import kv_quant
from pallas_kernels._common import (
    HIGHEST,
    NUM_SMS,
    SMEM_BYTES,
    SUPPORTED_DTYPES,
    check_heads,
    check_softcap,
    check_window,
    interpret_params,
    masked_softmax,
    require_int,
    soft_cap,
    tanh_via_exp2,
)

DecodeQueries = Float[Array, "slots q_heads head_dim"]
LayerPages = Shaped[Array, "pages page_size kv_heads head_dim"]  # float, or int8 / fp8 with scales
PageScales = Float[Array, "*scale_shape"]  # int8: [pages, kv_heads, page_size]; fp8: [kv_heads] (pallas_kernels.kv_quant)
PageTable = Int[Array, "slots pages_per_seq"]
SlotInts = Int[Array, "slots"]
Window = int | Int[Array, ""] | None  # static int, traced int32 scalar, or no window

_WGMMA_M = 64  # wgmma tile height: the group's q heads are padded up to this many rows
_SUPPORTED_HEAD_DIMS = (64, 128)
_SUPPORTED_PAGE_SIZES = (16, 32, 64)
_LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------
# Tuning config.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Static knobs of the Mosaic GPU decode kernel (a jit static argument: hashable).

    block_kv:    tokens per inner step (one S = Q K^T and one P V wgmma each); a multiple of
                 64 (wgmma/swizzle granularity) and of the page size (whole pages per step).
    num_splits:  CTAs sharing one (slot, kv head) along the pages; partial results are
                 combined with their log-sum-exp. None: a heuristic that fills ~132 SMs.
    num_buffers: SMEM K/V buffers per CTA; the kernel prefetches num_buffers - 1 blocks
                 ahead of the one it computes on (1: no overlap of copy and compute).
    """

    block_kv: int = 64
    num_splits: int | None = None
    num_buffers: int = 2

    def __post_init__(self):
        if self.block_kv <= 0 or self.block_kv % 64:
            raise ValueError(f"TuningConfig.block_kv must be a positive multiple of 64, got {self.block_kv}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"TuningConfig.num_splits must be None or >= 1, got {self.num_splits}")
        if self.num_buffers < 1:
            raise ValueError(f"TuningConfig.num_buffers must be >= 1, got {self.num_buffers}")


def _default_num_splits(slots: int, kv_heads: int, max_blocks: int) -> int:
    """Enough splits to give every SM a CTA, but at least two blocks per split."""
    want = max(1, -(-NUM_SMS // max(1, slots * kv_heads)))
    return max(1, min(want, max_blocks // 2))


def _smem_bytes(config: TuningConfig, head_dim: int, itemsize: int, page_size: int, page_itemsize: int = 0) -> int:
    """Shared memory of one CTA (the scratch_types of _paged_decode_kernel_call), roughly.
    `page_itemsize` > 0: 8-bit pages, copied into raw buffers (plus int8's bf16 scale rows)."""
    rows, kv = _WGMMA_M, config.block_kv
    tiles = (rows * head_dim + 2 * config.num_buffers * kv * head_dim + rows * kv) * itemsize
    if page_itemsize:
        tiles += 2 * config.num_buffers * kv * (head_dim * page_itemsize + 4)
    barriers = 8 * (1 + 2 * config.num_buffers * (kv // page_size))
    return tiles + 4 * (rows * head_dim + rows) + barriers + 4096  # + alignment slack (measured: ~2 KiB under at 260 KiB)


# ---------------------------------------------------------------------------------------------
# Kernel: Mosaic GPU, Hopper (sm_90): TMA page copies, wgmma on SMEM operands.
#
# Grid: (kv_heads, num_splits, slots). One CTA (one warpgroup) owns one KV head of one slot and
# one contiguous range of that slot's KV blocks (a block is `block_kv` tokens = block_kv /
# page_size pages). Its q rows are the group's q heads, zero-padded to the wgmma M of 64 by
# the wrapper. Per block:
#   TMA each page's [page_size, head_dim] K/V tile into SMEM (prefetching num_buffers - 1
#   blocks ahead), S = Q @ K^T (wgmma, K transposed in SMEM), mask t >= length to -inf,
#   online softmax in base 2, P staged through SMEM in q's dtype, O_blk = P @ V (wgmma), O =
#   O * alpha + O_blk. V rows past the length are zeroed in SMEM first (only in the partial
#   last block), so NaN garbage past a slot's length can never reach the output.
# Each CTA writes its normalised partial output (the group's rows only) and its base-2
# log-sum-exp; a small jnp epilogue combines the splits.
# Sliding window: the wrapper turns it into each slot's first visible position
# `start = max(0, length - W)`; the CTAs split the blocks [start // block_kv, cdiv(length,
# block_kv)) instead of [0, ...), so blocks below the window are never read, and the mask is
# start <= t < length (V rows outside it are zeroed in the two edge blocks). Soft-cap (static):
# scores become cap * tanh(scale * q.k / cap) before the base-2 softmax.
# ---------------------------------------------------------------------------------------------


def _row_iota(shape, dim, interpret: bool):
    """int32 iota in the wgmma accumulator layout (the interpreter has no layouts)."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _column_row(ref, shape, interpret: bool):
    """A [block_kv] SMEM vector broadcast over the rows of a [rows, block_kv] accumulator (the
    column vector of the WGMMA layout; the interpreter has no layouts)."""
    x = ref[...] if interpret else plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))
    return lax.broadcast_in_dim(x, shape, [1])


def _with_layout(x, layout, interpret: bool):
    return x if interpret else plgpu.layout_cast(x, layout)


def _paged_decode_kernel_call(
    q_pad, k_pages, v_pages, table, lengths, starts, k_scales=None, v_scales=None, *,
    group: int, block_kv: int, num_splits: int, num_buffers: int, scale: float, softcap: float | None, interpret,
):
    """Runs the kernel. q_pad [slots, kv_heads, 64, head_dim]; table already clamped and
    padded to whole blocks; lengths already clipped to the table; starts [slots] the first
    visible position of each slot (0 without a window). Returns the partial outputs
    f32 [slots, kv_heads, num_splits, group, head_dim] and base-2 log-sum-exps f32
    [slots, kv_heads, num_splits, 64] (rows >= group are padding).

    8-bit pages (int8 with per-token scales, here already gathered per slot by the wrapper as
    float32 [slots, kv_heads, tokens]; fp8 with per-head scales [kv_heads]): the TMA copies the
    raw tile (and int8's block of scales: one 4 * block_kv-byte copy, where a page's 2 *
    page_size bytes would be below what Mosaic GPU copies) into SMEM, the kernel widens it to
    q's dtype in SMEM (exact: int8 and e4m3 values are bf16/fp16 values; e4m3 -> bf16 goes
    through f32, the only conversion sm_90's ptxas has) for the wgmma, and applies the scales
    in float32 registers where they are exact: K's to the scores' columns, V's to P's columns
    before P is rounded (O = sum_t p_t s_t v_t)."""
    slots, kv_heads, rows, head_dim = q_pad.shape
    _, page_size, _, _ = k_pages.shape
    dtype = q_pad.dtype
    quant = jnp.dtype(k_pages.dtype) if kv_quant.is_quantized(k_pages.dtype) else None
    per_token = quant == kv_quant.INT8

    def widen(x):  # an 8-bit tile to q's dtype (e4m3 -> bf16 only through f32 on sm_90)
        if quant == kv_quant.FP8 and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
            x = x.astype(jnp.float32)
        return x.astype(dtype)
    pages_per_block = block_kv // page_size
    is_interp = interpret is not None
    scale_log2 = scale * _LOG2E

    def scores_log2(s):  # raw q.k -> scaled (and soft-capped) scores in base 2
        if softcap is None:
            return s * scale_log2
        return tanh_via_exp2(s * (scale / softcap)) * (softcap * _LOG2E)

    def body(table_ref, len_ref, start_ref, q_ref, k_ref, v_ref, *refs):
        if quant is None:
            o_ref, lse_ref, q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_bar, k_bars, v_bars = refs
        else:
            (ks_ref, vs_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_bar, k_bars,
             v_bars, k_raw, v_raw, *scale_scratch) = refs
            if per_token:
                ks_smem, vs_smem, ks_bars, vs_bars = scale_scratch
        kvh = lax.axis_index("kv_head")
        split = lax.axis_index("split")
        slot = lax.axis_index("slot")
        length = len_ref[slot]
        lo = start_ref[slot]  # first visible position (the window's lower edge)
        num_blocks = lax.div(length + (block_kv - 1), jnp.int32(block_kv))
        first_block = jnp.minimum(lax.div(lo, jnp.int32(block_kv)), num_blocks)
        per_split = lax.div(num_blocks - first_block + (num_splits - 1), jnp.int32(num_splits))
        start = jnp.minimum(first_block + split * per_split, num_blocks)
        end = jnp.minimum(start + per_split, num_blocks)

        def issue(blk, buf):
            for j in range(pages_per_block):
                page = table_ref[slot, blk * pages_per_block + j]
                rows_j = pl.ds(j * page_size, page_size)
                bar = buf * pages_per_block + j
                k_dst, v_dst = (k_smem, v_smem) if quant is None else (k_raw, v_raw)
                plgpu.copy_gmem_to_smem(k_ref.at[page, :, kvh], k_dst.at[buf, rows_j], k_bars.at[bar])
                plgpu.copy_gmem_to_smem(v_ref.at[page, :, kvh], v_dst.at[buf, rows_j], v_bars.at[bar])
            if per_token:
                cols_b = pl.ds(blk * block_kv, block_kv)
                plgpu.copy_gmem_to_smem(ks_ref.at[slot, kvh, cols_b], ks_smem.at[buf], ks_bars.at[buf])
                plgpu.copy_gmem_to_smem(vs_ref.at[slot, kvh, cols_b], vs_smem.at[buf], vs_bars.at[buf])

        @pl.when(start < end)
        def _prologue():
            plgpu.copy_gmem_to_smem(q_ref.at[slot, kvh], q_smem, q_bar)
            for b in range(num_buffers - 1):
                @pl.when(start + b < end)
                def _():
                    issue(start + b, jnp.int32(b))
            plgpu.barrier_wait(q_bar)

        def step(i, carry):
            acc, m_i, l_i = carry
            buf = lax.rem(i - start, jnp.int32(num_buffers))
            ahead = i + (num_buffers - 1)

            @pl.when(ahead < end)
            def _prefetch():
                issue(ahead, lax.rem(ahead - start, jnp.int32(num_buffers)))

            for j in range(pages_per_block):
                plgpu.barrier_wait(k_bars.at[buf * pages_per_block + j])
            if per_token:
                plgpu.barrier_wait(ks_bars.at[buf])
            if quant is not None:  # widen the 8-bit tile for the wgmma (exact)
                k_smem[buf] = widen(k_raw[buf])
                plgpu.commit_smem()

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[buf], (1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((rows, block_kv), jnp.float32))
            cols = _row_iota((rows, block_kv), 1, is_interp) + i * block_kv
            visible = (cols < length) & (cols >= lo)
            if per_token:  # K's per-token scales on the score columns
                s = s * _column_row(ks_smem.at[buf], s.shape, is_interp)
            elif quant is not None:
                s = s * ks_ref[kvh]
            s = jnp.where(visible, scores_log2(s), -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)

            for j in range(pages_per_block):
                plgpu.barrier_wait(v_bars.at[buf * pages_per_block + j])
            if per_token:
                plgpu.barrier_wait(vs_bars.at[buf])
            if per_token:  # V's per-token scales on P's columns (masked: unowned scales may be NaN)
                vs = _column_row(vs_smem.at[buf], p.shape, is_interp)
                p = p * jnp.where(visible, vs, 0.0)
            elif quant is not None:
                p = p * vs_ref[kvh]
            p_smem[...] = p.astype(dtype)
            if quant is not None:
                v_smem[buf] = widen(v_raw[buf])

            @pl.when(((i + 1) * block_kv > length) | (i * block_kv < lo))
            def _zero_v_edges():  # NaN-safe: p is 0 there, but 0 * NaN is not
                v = v_smem[buf]
                r = _row_iota((block_kv, head_dim), 0, is_interp) + i * block_kv
                v_smem[buf] = jnp.where((r < length) & (r >= lo), v, jnp.zeros_like(v))

            plgpu.commit_smem()

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_smem.at[buf])
                return acc_ref[...]

            o_blk = pl.run_scoped(pv, plgpu.ACC((rows, head_dim), jnp.float32))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o_blk
            return acc, m_new, l_i

        acc0 = _with_layout(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA, is_interp)
        m0 = _with_layout(jnp.full((rows,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1), is_interp)
        l0 = _with_layout(jnp.zeros((rows,), jnp.float32), plgpu.Layout.WGMMA.reduce(1), is_interp)
        acc, m_i, l_i = lax.fori_loop(start, end, step, (acc0, m0, l0))

        has = l_i > 0  # false only for CTAs without work: output 0, lse -inf
        inv_l = jnp.where(has, 1.0 / jnp.where(has, l_i, 1.0), 0.0)
        o_smem[...] = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
        lse_smem[...] = jnp.where(has, m_i + jnp.log2(jnp.where(has, l_i, 1.0)), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, group)], o_ref.at[slot, kvh, split])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[slot, kvh, split])
        plgpu.wait_smem_to_gmem(0)

    swizzled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    kv_tile = (num_buffers, block_kv, head_dim)
    extra_scratch, extra_in = (), ()
    if quant is not None:
        swz = min(128, head_dim)  # 8-bit rows of head_dim bytes: swizzled like the 16-bit tiles' loads want
        raw = dict(transforms=(plgpu.TilingTransform((8, swz)), plgpu.SwizzleTransform(swz)))
        extra_scratch = (plgpu.SMEM(kv_tile, quant, **raw), plgpu.SMEM(kv_tile, quant, **raw))
        if per_token:
            extra_scratch += (plgpu.SMEM((num_buffers, block_kv), jnp.float32),
                              plgpu.SMEM((num_buffers, block_kv), jnp.float32),
                              plgpu.Barrier(num_barriers=num_buffers), plgpu.Barrier(num_barriers=num_buffers))
        extra_in = (k_scales, v_scales)
    call = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((slots, kv_heads, num_splits, group, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((slots, kv_heads, num_splits, rows), jnp.float32),
        ),
        scratch_types=(
            plgpu.SMEM((rows, head_dim), dtype, **swizzled),
            plgpu.SMEM(kv_tile, dtype, **swizzled),
            plgpu.SMEM(kv_tile, dtype, **swizzled),
            plgpu.SMEM((rows, block_kv), dtype, **swizzled),
            plgpu.SMEM((rows, head_dim), jnp.float32),
            plgpu.SMEM((rows,), jnp.float32),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=num_buffers * pages_per_block),
            plgpu.Barrier(num_barriers=num_buffers * pages_per_block),
        ) + extra_scratch,
        grid=(kv_heads, num_splits, slots),
        grid_names=("kv_head", "split", "slot"),
        interpret=interpret,
    )
    return call(table, lengths, starts, q_pad, k_pages, v_pages, *extra_in)


def _combine_splits(o_part, lse_part, group: int):
    """[slots, kv_heads, splits, group, d] partials + base-2 lse -> [slots, kv_heads, group, d]."""
    if o_part.shape[2] == 1:
        return o_part[:, :, 0]
    lse = lse_part[..., :group]  # [slots, kv_heads, splits, group]
    top = lse.max(axis=2, keepdims=True)
    w = jnp.exp2(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # empty splits: exp2(-inf) = 0
    den = w.sum(axis=2)
    num = (w[..., None] * o_part).sum(axis=2)
    return num / jnp.where(den > 0, den, 1.0)[..., None]


# ---------------------------------------------------------------------------------------------
# Validated, jitted entry point.
# ---------------------------------------------------------------------------------------------


def _check_shapes(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    table_shape: tuple[int, ...],
    lengths_shape: tuple[int, ...],
) -> None:
    """ValueErrors for malformed paged-attention inputs (works without runtime type checks)."""
    if len(q_shape) != 3:
        raise ValueError(f"q must be rank 3 [slots, q_heads, head_dim], got shape {q_shape}")
    for name, shape in (("k_pages", k_shape), ("v_pages", v_shape)):
        if len(shape) != 4:
            raise ValueError(
                f"{name} must be rank 4 [pages, page_size, kv_heads, head_dim], got shape {shape}")
    if k_shape != v_shape:
        raise ValueError(f"k_pages and v_pages must have the same shape, got {k_shape} and {v_shape}")
    check_heads(q_shape[1], k_shape[2], q_shape[2], k_shape[3])
    if len(table_shape) != 2 or table_shape[0] != q_shape[0]:
        raise ValueError(
            f"page_table must have shape [slots={q_shape[0]}, pages_per_seq], got {table_shape}")
    if lengths_shape != q_shape[:1]:
        raise ValueError(f"lengths must have shape [slots] = {q_shape[:1]}, got {lengths_shape}")


def check_scales(k_pages, v_pages, k_scales, v_scales) -> None:
    """ValueErrors for 8-bit pages without the right scales (or float pages with scales)."""
    if jnp.dtype(k_pages.dtype) != jnp.dtype(v_pages.dtype):
        raise ValueError(f"k_pages and v_pages must have one dtype, got {k_pages.dtype} and {v_pages.dtype}")
    quant = jnp.dtype(k_pages.dtype)
    if not kv_quant.is_quantized(quant):
        if k_scales is not None or v_scales is not None:
            raise ValueError(f"k_scales / v_scales are for int8 / float8_e4m3fn pages, not {quant}")
        return
    pages, page_size, kv_heads, _ = k_pages.shape
    want = (pages, kv_heads, page_size) if quant == kv_quant.INT8 else (kv_heads,)
    for name, x in (("k_scales", k_scales), ("v_scales", v_scales)):
        if x is None or tuple(x.shape) != want or not jnp.issubdtype(x.dtype, jnp.floating):
            got = None if x is None else f"{jnp.dtype(x.dtype)}{list(x.shape)}"
            raise ValueError(f"{quant} pages need float {name} of shape {list(want)}, got {got}")


def check_paged_attention_kernel_inputs(q, k_pages, v_pages, page_table, lengths, *,
                                        sliding_window=None, softcap=None, config=None,
                                        k_scales=None, v_scales=None) -> TuningConfig:
    """Raises ValueError for inputs the kernel does not support; returns the effective
    TuningConfig. Works on arrays, tracers and ShapeDtypeStructs."""
    check_window(sliding_window)
    check_softcap(softcap)
    require_int("page_table", page_table.dtype)
    require_int("lengths", lengths.dtype)
    _check_shapes(q.shape, k_pages.shape, v_pages.shape, page_table.shape, lengths.shape)
    check_scales(k_pages, v_pages, k_scales, v_scales)
    quantized = kv_quant.is_quantized(k_pages.dtype)
    dts = {jnp.dtype(x.dtype) for x in ((q,) if quantized else (q, k_pages, v_pages))}
    if len(dts) != 1 or next(iter(dts)) not in SUPPORTED_DTYPES:
        raise ValueError(
            "paged_attention kernel needs q, k_pages and v_pages all bfloat16 or all float16 (or a bfloat16 / "
            f"float16 q over int8 / float8_e4m3fn pages), got "
            f"{jnp.dtype(q.dtype)}, {jnp.dtype(k_pages.dtype)}, {jnp.dtype(v_pages.dtype)}")
    head_dim = q.shape[-1]
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"paged_attention kernel supports head_dim in {_SUPPORTED_HEAD_DIMS}, got {head_dim}")
    page_size = k_pages.shape[1]
    if page_size not in _SUPPORTED_PAGE_SIZES:
        raise ValueError(f"paged_attention kernel supports page_size in {_SUPPORTED_PAGE_SIZES}, got {page_size}")
    group = q.shape[1] // k_pages.shape[2]
    if group > _WGMMA_M:
        raise ValueError(f"paged_attention kernel supports q_heads // kv_heads <= {_WGMMA_M}, got {group}")
    config = TuningConfig() if config is None else config
    if not isinstance(config, TuningConfig):
        raise ValueError(f"config must be a TuningConfig or None, got {type(config).__name__}")
    if config.block_kv % page_size:
        raise ValueError(f"TuningConfig.block_kv ({config.block_kv}) must be a multiple of page_size ({page_size})")
    if q.shape[0] == 0:
        raise ValueError("paged_attention kernel needs at least one slot")
    smem = _smem_bytes(config, head_dim, jnp.dtype(q.dtype).itemsize, page_size, 1 if quantized else 0)
    if smem > SMEM_BYTES:
        raise ValueError(
            f"TuningConfig {config} needs {smem} bytes of shared memory at head_dim {head_dim}, "
            f"over the sm_90 limit of {SMEM_BYTES}: lower block_kv or num_buffers")
    return config


def _paged_attention_kernel(q, k_pages, v_pages, page_table, lengths, window, k_scales, v_scales, *, scale, softcap,
                            config, interpret):
    slots, q_heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    group = q_heads // kv_heads
    block_kv = config.block_kv
    pages_per_block = block_kv // page_size
    pages_per_seq = page_table.shape[1]
    num_blocks = -(-pages_per_seq // pages_per_block)
    num_splits = config.num_splits or _default_num_splits(slots, kv_heads, num_blocks)

    q_pad = q.reshape(slots, kv_heads, group, head_dim)
    q_pad = jnp.pad(q_pad, ((0, 0), (0, 0), (0, _WGMMA_M - group), (0, 0)))
    table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
    table = jnp.pad(table, ((0, 0), (0, num_blocks * pages_per_block - pages_per_seq)))
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, pages_per_seq * page_size)
    # The query sits at length - 1 and sees the W - 1 positions before it.
    starts = jnp.zeros_like(lengths) if window is None else jnp.maximum(lengths - window.astype(jnp.int32), 0)
    if k_scales is not None and k_scales.ndim == 1:  # fp8: per-head float32 scalars
        k_scales, v_scales = k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)
    elif k_scales is not None:  # int8: each slot's per-token scales, [slots, kv_heads, tokens] f32
        def per_slot(sc):  # [pages, kv_heads, page_size] -> the table's tokens (a 1/head_dim-size gather)
            g = jnp.take(sc, table, axis=0)  # [slots, blocks * pages_per_block, kv_heads, page_size]
            return g.transpose(0, 2, 1, 3).reshape(slots, kv_heads, -1).astype(jnp.float32)
        k_scales, v_scales = per_slot(k_scales), per_slot(v_scales)
    o_part, lse_part = _paged_decode_kernel_call(
        q_pad, k_pages, v_pages, table, lengths, starts, k_scales, v_scales,
        group=group, block_kv=block_kv, num_splits=num_splits,
        num_buffers=config.num_buffers, scale=scale, softcap=softcap, interpret=interpret)
    out = _combine_splits(o_part, lse_part, group)
    return out.reshape(slots, q_heads, head_dim).astype(q.dtype)


_paged_attention_kernel_jit = jax.jit(
    _paged_attention_kernel, static_argnames=("scale", "softcap", "config", "interpret"))


def paged_attention(
    q: DecodeQueries,
    k_pages: LayerPages,
    v_pages: LayerPages,
    page_table: PageTable,
    lengths: SlotInts,
    *,
    sliding_window: Window = None,
    scale: float | None = None,
    softcap: float | None = None,
    config: TuningConfig | None = None,
    interpret: Any = False,  # bool, or an InterpretGPUParams (e.g. detect_races=True)
    k_scales: PageScales | None = None,
    v_scales: PageScales | None = None,
) -> DecodeQueries:
    """Mosaic GPU (sm_90) paged decode attention; same semantics as paged_attention_reference.

    Same layout and masking rules as `paged_attention_reference` (q [slots, q_heads, head_dim],
    k/v pages [pages, page_size, kv_heads, head_dim], int page_table [slots, pages_per_seq],
    int lengths [slots] including the query token; length 0 -> 0). bf16/fp16 inputs, f32
    scores/softmax/accumulation, q's dtype out. head_dim 64/128, page_size 16/32/64,
    q_heads // kv_heads <= 64. `sliding_window` (an int or a traced int32 scalar) skips the
    blocks below the window; `softcap` (static) caps the scores. `interpret=True`
    runs the GPU interpreter on CPU (tests; on JAX 0.10.2 it needs the wgmma-transpose patch
    in tests/pallas_kernels/interpreter_patch.py). Jitted inside; callable under jit.
    8-bit pages: int8 or float8_e4m3fn k/v pages with `k_scales` / `v_scales`
    (pallas_kernels.kv_quant's layouts), dequantized inside the kernel after the copy; q stays
    bf16/fp16. Equals the reference on the dequantized pages to the bf16 tolerances.
    """
    config = check_paged_attention_kernel_inputs(
        q, k_pages, v_pages, page_table, lengths, sliding_window=sliding_window, softcap=softcap, config=config,
        k_scales=k_scales, v_scales=v_scales)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    window = None if sliding_window is None else jnp.asarray(sliding_window, jnp.int32)
    return _paged_attention_kernel_jit(q, k_pages, v_pages, page_table, lengths, window, k_scales, v_scales,
                                       scale=scale, softcap=None if softcap is None else float(softcap),
                                       config=config, interpret=interpret_params(interpret))


# ---------------------------------------------------------------------------------------------
# Reference.
# ---------------------------------------------------------------------------------------------


def paged_attention_reference(
    q: DecodeQueries,
    k_pages: LayerPages,
    v_pages: LayerPages,
    page_table: PageTable,
    lengths: SlotInts,
    *,
    sliding_window: Window = None,
    scale: float | None = None,
    softcap: float | None = None,
    k_scales: PageScales | None = None,
    v_scales: PageScales | None = None,
) -> DecodeQueries:
    """Attention of one query token per slot against that slot's paged keys/values.

    Layout:
      q           [slots, q_heads, head_dim]                 the current token of each slot.
      k_pages,
      v_pages     [pages, page_size, kv_heads, head_dim]     one layer of the KV pool; page 0
                                                             is conventionally a "null" page.
      page_table  int [slots, pages_per_seq]                 entry p is the page holding the
                                                             slot's tokens p*page_size ..
                                                             (p+1)*page_size - 1.
      lengths     int [slots]                                valid tokens per slot, INCLUDING
                                                             the current one (its K/V already
                                                             written); the query sits at
                                                             position lengths - 1.
    Token t of a slot is visible iff t < lengths[s] and, with `sliding_window=W`,
    (lengths[s] - 1) - t < W (the query sees itself and the W-1 previous tokens; W may be a
    traced int32 scalar). With `softcap=c` the scaled scores s become c * tanh(s / c). Slots with
    length 0 return 0. Table entries past a slot's length may point anywhere (out-of-range ids
    are clamped), and invisible positions may hold NaN: they are zeroed with `jnp.where`
    before any arithmetic. lengths must not exceed pages_per_seq * page_size.

    Query head h reads KV head h // (q_heads // kv_heads). Scores and softmax are float32 at
    HIGHEST matmul precision; the result has q's dtype. int8 / float8_e4m3fn pages come with
    `k_scales` / `v_scales` (pallas_kernels.kv_quant) and are dequantized to float32 in jnp.
    """
    require_int("page_table", page_table.dtype)
    require_int("lengths", lengths.dtype)
    _check_shapes(q.shape, k_pages.shape, v_pages.shape, page_table.shape, lengths.shape)
    check_scales(k_pages, v_pages, k_scales, v_scales)
    check_window(sliding_window)
    check_softcap(softcap)
    return _paged_attention(q, k_pages, v_pages, page_table, lengths, sliding_window,
                            q.shape[-1] ** -0.5 if scale is None else scale, softcap, k_scales, v_scales)


def _paged_attention(
    q: DecodeQueries,
    k_pages: LayerPages,
    v_pages: LayerPages,
    page_table: PageTable,
    lengths: SlotInts,
    sliding_window: Window,
    scale: float,
    softcap: float | None = None,
    k_scales: PageScales | None = None,
    v_scales: PageScales | None = None,
) -> DecodeQueries:
    # Design: gather every table entry's page into a dense [slots, tokens, kv_heads, head_dim]
    # view (simple, O(pages_per_seq * page_size) per slot, fine for an oracle), then mask by
    # token position. With a single query per slot the mask is per (slot, token), so zeroing
    # masked K/V rows makes NaN-poisoned pages harmless everywhere, not just in the softmax.
    slots, q_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    tokens = page_table.shape[1] * page_size
    pos = jnp.arange(tokens)
    visible = pos[None, :] < lengths[:, None]  # [slots, tokens]
    if sliding_window is not None:
        visible = visible & ((lengths[:, None] - 1) - pos[None, :] < sliding_window)

    def gather(x, sc):  # float32 [slots, tokens, kv_heads, head_dim], dequantized
        x = jnp.take(x, page_table, axis=0, mode="clip")
        if jnp.dtype(x.dtype) == kv_quant.INT8:  # the pages' own per-token scales
            sc = jnp.take(sc, page_table, axis=0, mode="clip")
        return kv_quant.dequantize(x, sc).reshape(slots, tokens, kv_heads, head_dim)

    keep = visible[:, :, None, None]
    k32, v32 = (jnp.where(keep, gather(x, sc), 0.0) for x, sc in ((k_pages, k_scales), (v_pages, v_scales)))
    qg = q.astype(jnp.float32).reshape(slots, kv_heads, q_heads // kv_heads, head_dim)
    scores = soft_cap(jnp.einsum("nkgd,ntkd->nkgt", qg, k32, precision=HIGHEST) * scale, softcap)
    probs = masked_softmax(scores, visible[:, None, None, :])
    out = jnp.einsum("nkgt,ntkd->nkgd", probs, v32, precision=HIGHEST)
    return out.reshape(slots, q_heads, head_dim).astype(q.dtype)
