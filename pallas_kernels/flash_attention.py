"""Prefill attention: a Pallas Mosaic GPU (Hopper, sm_90) flash-attention kernel,
`flash_attention`, and its plain-jnp reference, `flash_attention_reference` (the CPU path of the
runtime, and the kernel's oracle).

Layout is that of `jax.nn.dot_product_attention`: q `[batch, seq, q_heads, head_dim]`,
k/v `[batch, seq, kv_heads, head_dim]`, query position i and key position j are both the
token's index in `seq`.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from pallas_kernels._common import (
    HIGHEST,
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

Queries = Float[Array, "batch seq q_heads head_dim"]
KeysValues = Float[Array, "batch seq kv_heads head_dim"]
Lengths = Int[Array, "batch"]
Window = int | Int[Array, ""] | None  # static int, traced int32 scalar, or no window

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_SUPPORTED_HEAD_DIMS = (64, 128)


# ---------------------------------------------------------------------------------------------
# Tuning config.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Tile sizes of the Mosaic GPU flash-attention kernel (frozen, hashable: a jit static arg).

    block_q: query rows per CTA (one warpgroup; wgmma M, so a multiple of 64).
    block_kv: keys per pipeline step (wgmma N of Q K^T and K of P V: a multiple of 64, which is
      also the 128-byte swizzle width for 16-bit types).
    max_concurrent_steps: K/V SMEM ring slots (>= 1; 2 = double buffering).
    SMEM use is 2 * (block_q * head_dim + block_q * block_kv
                     + 2 * max_concurrent_steps * block_kv * head_dim) bytes (+ 4 * block_q with
    the LSE); it must fit in sm_90's 227 KiB.
    """

    block_q: int = 64
    block_kv: int = 64
    max_concurrent_steps: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 64:
                raise ValueError(f"TuningConfig.{name} must be a positive multiple of 64, got {value!r}")
        if not isinstance(self.max_concurrent_steps, int) or self.max_concurrent_steps < 1:
            raise ValueError(
                f"TuningConfig.max_concurrent_steps must be an int >= 1, got {self.max_concurrent_steps!r}")

    def smem_bytes(self, head_dim: int, *, with_lse: bool = False) -> int:
        elems = (self.block_q * head_dim + self.block_q * self.block_kv
                 + 2 * self.max_concurrent_steps * self.block_kv * head_dim)
        return 2 * elems + (4 * self.block_q if with_lse else 0)


DEFAULT_TUNING_CONFIG = TuningConfig()


# ---------------------------------------------------------------------------------------------
# Kernel: Mosaic GPU, Hopper (sm_90).
#
# Algorithm (FlashAttention-2/3 forward, one warpgroup per CTA):
#   grid = (q_heads, seq // block_q, batch). A CTA owns `block_q` query rows of one query head
#   and reads KV head `q_head // (q_heads // kv_heads)` straight from the unrepeated k/v (GQA).
#   Q is TMA-copied to SMEM once; K/V tiles stream through a ring of `max_concurrent_steps`
#   SMEM slots (TMA + one barrier per slot), prefetching step j + slots while step j computes.
#   Per KV tile: S = Q K^T (SMEM x SMEM wgmma, K^T via transpose_ref) into an f32 accumulator,
#   an online base-2 softmax on registers (running max m, running sum l, rescale alpha), P is
#   cast to the input dtype and staged through SMEM, and P V is a second SMEM x SMEM wgmma whose
#   f32 result is added to the rescaled output accumulator. Only O (and optionally the LSE) is
#   written back (TMA SMEM -> GMEM); the seq x seq matrix never exists.
# Block skipping: a CTA runs kv_steps = cdiv(min(length, q_end if causal), block_kv) tiles (0 if
#   all its query rows are padding). The first `full_steps` tiles need no mask at all (entirely
#   below the diagonal and inside the row's length); only the remaining <= 2 tiles pay for the
#   iota/compare/where mask.
# Sliding window W (a runtime scalar, so local and global layers share one program): tiles
#   entirely below every row's window (cols < q_start - W + 1) are skipped: the loop starts at
#   `first`; tiles [first, mid_lo) straddle the window's lower edge and are masked, tiles
#   [mid_lo, mid_hi) are whole for every row, [mid_hi, kv_steps) are the masked diagonal tail.
#   The K/V ring is indexed by the absolute step, so it simply starts at slot first % slots.
# Soft-cap (static): scores become cap * tanh(scale * q.k / cap) before the base-2 softmax.
# Padding: keys at j >= lengths[b] get score -inf (selected with `where`, so NaN garbage in
#   padded K never reaches the softmax); padded V rows are zeroed by the wrapper with `where`
#   (0 * NaN would otherwise leak through P V); query rows i >= lengths[b] are written as 0.
# ---------------------------------------------------------------------------------------------


def _flash_attention_kernel_call(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    window: jax.Array,
    *,
    causal: bool,
    windowed: bool,
    softcap: float | None,
    scale: float,
    config: TuningConfig,
    return_lse: bool,
    interpret: Any,
):
    """plgpu.kernel launch on seq-padded inputs (seq a multiple of block_q and block_kv).
    `window` [1] int32 is read only when `windowed`."""
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    dtype = q.dtype
    block_q, block_kv = config.block_q, config.block_kv
    slots = min(config.max_concurrent_steps, seq // block_kv)
    interpreting = interpret is not None
    qk_scale = scale * _LOG2E  # scores are kept in base 2: exp(x * scale) = exp2(x * qk_scale)

    def layout(x, lay):
        # Register layouts matter only to the real lowering; the 0.10.2 interpreter has no rule
        # for layout_cast (values are unchanged either way).
        return x if interpreting else plgpu.layout_cast(x, lay)

    def iota(shape, dim):
        return layout(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA)

    def scores_log2(s):  # raw q.k -> scaled (and soft-capped) scores in base 2
        if softcap is None:
            return s * qk_scale
        return tanh_via_exp2(s * (scale / softcap)) * (softcap * _LOG2E)

    def kernel(lengths_ref, window_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
        q_smem, k_smem, v_smem, p_smem, lse_smem, kt_smem, q_bar, k_bars, v_bars = scoped
        head = lax.axis_index("heads")
        q_block = lax.axis_index("q_blocks")
        b = lax.axis_index("batch")
        kv_head = lax.div(head, jnp.int32(group))
        length = jnp.clip(lengths_ref[b], 0, seq)
        q_start = q_block * block_q

        kv_end = jnp.minimum(length, q_start + block_q) if causal else length
        kv_steps = jnp.where(q_start < length, pl.cdiv(kv_end, jnp.int32(block_kv)), 0)
        # Tiles every row of this block sees whole: below the diagonal and inside the length.
        unmasked_end = jnp.minimum(length, q_start + 1) if causal else length
        full_steps = jnp.minimum(kv_steps, lax.div(unmasked_end, jnp.int32(block_kv)))
        if windowed:
            w = window_ref[0]
            # Row q_start sees cols >= q_start - w + 1; row q_start + block_q - 1 sees every col
            # >= q_start + block_q - w, so tiles from there on are whole on the window side.
            first = jnp.minimum(lax.div(jnp.maximum(q_start - w + 1, 0), jnp.int32(block_kv)), kv_steps)
            whole_from = pl.cdiv(jnp.maximum(q_start + block_q - w, 0), jnp.int32(block_kv))
            mid_lo = jnp.clip(whole_from, first, kv_steps)
            mid_hi = jnp.clip(full_steps, mid_lo, kv_steps)
        else:
            first, mid_lo, mid_hi = jnp.int32(0), jnp.int32(0), full_steps

        def kv_tile(ref, step):
            return ref.at[b, pl.ds(step * block_kv, block_kv), kv_head]

        def fetch_k(step, slot):
            plgpu.copy_gmem_to_smem(kv_tile(k_ref, step), k_smem.at[slot], k_bars.at[slot])

        def fetch_v(step, slot):
            plgpu.copy_gmem_to_smem(kv_tile(v_ref, step), v_smem.at[slot], v_bars.at[slot])

        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_start, block_q), head], q_smem, q_bar)
        for i in range(slots):
            @pl.when(first + i < kv_steps)
            def _prologue():
                fetch_k(first + i, lax.rem(first + i, jnp.int32(slots)))
                fetch_v(first + i, lax.rem(first + i, jnp.int32(slots)))
        plgpu.barrier_wait(q_bar)

        def step_body(step, carry, *, masked):
            acc, m_i, l_i = carry
            slot = lax.rem(step, jnp.int32(slots))
            plgpu.barrier_wait(k_bars.at[slot])

            if interpreting:
                # The 0.10.2 interpreter cannot take transpose_ref as a wgmma operand: stage K^T
                # through SMEM instead (interpret mode only; the GPU path is the line below).
                kt_smem[...] = k_smem.at[slot][...].T
                k_t = kt_smem
            else:
                k_t = plgpu.transpose_ref(k_smem.at[slot], (1, 0))

            def qk_scope(s_ref):
                plgpu.wgmma(s_ref, q_smem, k_t)
                return s_ref[...]
            s = pl.run_scoped(qk_scope, plgpu.ACC((block_q, block_kv), jnp.float32))

            @pl.when(step + slots < kv_steps)
            def _prefetch_k():  # the Q K^T wgmma has retired: this K slot is free
                fetch_k(step + slots, slot)

            s = scores_log2(s)
            if masked:
                rows = iota((block_q, block_kv), 0) + q_start
                cols = iota((block_q, block_kv), 1) + step * block_kv
                visible = cols < length
                if causal:
                    visible = visible & (cols <= rows)
                if windowed:
                    visible = visible & (rows - cols < w)
                s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            m_sub = m_new
            if masked:  # a row with nothing visible so far keeps m = -inf: avoid -inf - -inf
                m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp2(m_i - m_sub)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_sub, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            # P goes through SMEM so both wgmmas take SMEM operands (the 0.10.2 interpreter has
            # no register-A wgmma); commit_smem orders the register stores before the wgmma.
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()
            plgpu.barrier_wait(v_bars.at[slot])

            def pv_scope(o_ref):
                plgpu.wgmma(o_ref, p_smem, v_smem.at[slot])
                return o_ref[...]
            pv = pl.run_scoped(pv_scope, plgpu.ACC((block_q, head_dim), jnp.float32))

            @pl.when(step + slots < kv_steps)
            def _prefetch_v():  # the P V wgmma has retired: this V slot is free
                fetch_v(step + slots, slot)

            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
            return acc, m_new, l_i

        reduced = plgpu.Layout.WGMMA.reduce(1)
        carry = (
            layout(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA),
            layout(jnp.full((block_q,), -jnp.inf, jnp.float32), reduced),
            layout(jnp.zeros((block_q,), jnp.float32), reduced),
        )
        if windowed:  # the window's lower edge
            carry = lax.fori_loop(first, mid_lo, functools.partial(step_body, masked=True), carry)
        carry = lax.fori_loop(mid_lo, mid_hi, functools.partial(step_body, masked=False), carry)
        acc, m_i, l_i = lax.fori_loop(
            mid_hi, kv_steps, functools.partial(step_body, masked=True), carry)

        rows = iota((block_q, head_dim), 0) + q_start
        l_safe = jnp.where(l_i > 0, l_i, 1.0)
        out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        out = jnp.where(rows < length, out, 0.0)  # padded query rows: exactly 0 (even if NaN)
        q_smem[...] = out.astype(dtype)  # Q is no longer needed: reuse its SMEM for O
        if lse_smem is not None:
            lse_smem[...] = (m_i + jnp.log2(l_safe)) * _LN2
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(q_start, block_q), head])
        if lse_smem is not None:
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, head, pl.ds(q_start, block_q)])
        plgpu.wait_smem_to_gmem(0)

    def entry(lengths_ref, window_ref, q_ref, k_ref, v_ref, out_ref, lse_ref=None):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        scratch = [
            plgpu.SMEM((block_q, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((slots, block_kv, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((slots, block_kv, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((block_q, block_kv), dtype, transforms=transforms),
            plgpu.SMEM((block_q,), jnp.float32) if return_lse else None,
            plgpu.SMEM((head_dim, block_kv), dtype) if interpreting else None,
            plgpu.Barrier(),
            plgpu.Barrier(num_barriers=slots),
            plgpu.Barrier(num_barriers=slots),
        ]
        pl.run_scoped(
            lambda *refs: kernel(lengths_ref, window_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, refs), *scratch)

    out_type = [jax.ShapeDtypeStruct(q.shape, dtype)]
    if return_lse:  # seq minor-most, so an LSE row block is one contiguous 1-D TMA
        out_type.append(jax.ShapeDtypeStruct((batch, q_heads, seq), jnp.float32))
    kwargs = {} if interpret is None else {"interpret": interpret}
    outs = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(q_heads, seq // block_q, batch),
        grid_names=("heads", "q_blocks", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )(lengths, window, q, k, v)
    return (outs[0], outs[1]) if return_lse else outs[0]


# ---------------------------------------------------------------------------------------------
# Validated, jitted entry point.
# ---------------------------------------------------------------------------------------------


def _check_shapes(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    lengths_shape: tuple[int, ...] | None,
) -> None:
    """ValueErrors for malformed prefill-attention inputs (works without runtime type checks)."""
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            raise ValueError(f"{name} must be rank 4 [batch, seq, heads, head_dim], got shape {shape}")
    if k_shape != v_shape:
        raise ValueError(f"k and v must have the same shape, got {k_shape} and {v_shape}")
    if q_shape[:2] != k_shape[:2]:
        raise ValueError(f"q and k must agree on [batch, seq], got {q_shape[:2]} and {k_shape[:2]}")
    check_heads(q_shape[-2], k_shape[-2], q_shape[-1], k_shape[-1])
    if lengths_shape is not None and lengths_shape != q_shape[:1]:
        raise ValueError(f"lengths must have shape [batch] = {q_shape[:1]}, got {lengths_shape}")


def check_flash_attention_kernel_inputs(q, k, v, lengths=None, config: Any = None, return_lse: bool = False, *,
                                        sliding_window: Window = None, softcap: float | None = None) -> None:
    """ValueErrors for inputs the kernel cannot take (on top of the reference's shape checks).
    Works on arrays, tracers and ShapeDtypeStructs."""
    config = DEFAULT_TUNING_CONFIG if config is None else config
    _check_shapes(q.shape, k.shape, v.shape, None if lengths is None else lengths.shape)
    check_window(sliding_window)
    check_softcap(softcap)
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention supports bfloat16 and float16 inputs, got {q.dtype}")
    head_dim = q.shape[-1]
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention supports head_dim in {_SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if lengths is not None:
        require_int("lengths", lengths.dtype)
    if not isinstance(config, TuningConfig):
        raise ValueError(f"config must be a TuningConfig or None, got {type(config).__name__}")
    smem = config.smem_bytes(head_dim, with_lse=return_lse)
    if smem > SMEM_BYTES:
        raise ValueError(f"{config} needs {smem} bytes of SMEM at head_dim={head_dim}, "
                         f"more than sm_90's {SMEM_BYTES}")


_check_kernel_inputs = check_flash_attention_kernel_inputs  # the name the kernel tests use


@functools.partial(jax.jit, static_argnames=("causal", "softcap", "scale", "config", "return_lse", "interpret"))
def _flash_attention_jit(q, k, v, lengths, window, *, causal, softcap, scale, config, return_lse, interpret):
    batch, seq = q.shape[:2]
    windowed = window is not None
    window = jnp.ones((1,), jnp.int32) if window is None else jnp.reshape(window, (1,)).astype(jnp.int32)
    if lengths is None:
        lengths = jnp.full((batch,), seq, jnp.int32)
    else:
        lengths = jnp.clip(lengths.astype(jnp.int32), 0, seq)
        # Padded V rows meet P = 0 in the P V wgmma and 0 * NaN = NaN: select them away (K and
        # Q padding is masked inside the kernel with `where`). XLA fuses this into V's producer.
        in_row = jnp.arange(seq)[None, :] < lengths[:, None]
        v = jnp.where(in_row[:, :, None, None], v, jnp.zeros((), v.dtype))
    block = math.lcm(config.block_q, config.block_kv)
    padded = -(-seq // block) * block
    if padded != seq:  # short prompt buckets (16, 32): pad to a whole tile; the pad is masked
        pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    res = _flash_attention_kernel_call(
        q, k, v, lengths, window, causal=causal, windowed=windowed, softcap=softcap, scale=scale, config=config,
        return_lse=return_lse, interpret=interpret_params(interpret))
    if not return_lse:
        return res[:, :seq]
    out, lse = res
    in_row = jnp.arange(seq)[None, :] < lengths[:, None]
    return out[:, :seq], jnp.where(in_row[:, None, :], lse[:, :, :seq], -jnp.inf)


def flash_attention(
    q: Queries,
    k: KeysValues,
    v: KeysValues,
    *,
    lengths: Lengths | None = None,
    causal: bool = True,
    config: TuningConfig | None = None,
    interpret: Any = False,
    scale: float | None = None,
    return_lse: bool = False,
    sliding_window: Window = None,
    softcap: float | None = None,
) -> Queries | tuple[Queries, Float[Array, "batch q_heads seq"]]:
    """Causal/padded GQA prefill attention on Hopper (Mosaic GPU), same masks as the reference.

    q `[batch, seq, q_heads, head_dim]`, k/v `[batch, seq, kv_heads, head_dim]`, bf16 or f16,
    head_dim 64 or 128; f32 scores, softmax and accumulation; returns q's shape and dtype.
    Keys j >= lengths[b] are never attended, query rows i >= lengths[b] return 0 (NaN padding
    included); `lengths=None` means every row is full. Any seq works: it is padded up to a
    multiple of the tile size internally. With `return_lse`, also returns the natural-log
    log-sum-exp of the scaled scores, `[batch, q_heads, seq]` f32, -inf on padded rows.
    `interpret=True` (or an `InterpretGPUParams`) runs the GPU interpreter (CPU testing).
    `sliding_window` (an int or a traced int32 scalar: one compiled program for every window)
    and `softcap` (a static float) as in the reference; tiles below every row's window are
    skipped.
    """
    config = DEFAULT_TUNING_CONFIG if config is None else config
    check_flash_attention_kernel_inputs(q, k, v, lengths, config, return_lse, sliding_window=sliding_window,
                                        softcap=softcap)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    window = None if sliding_window is None else jnp.asarray(sliding_window, jnp.int32)
    return _flash_attention_jit(q, k, v, lengths, window, causal=bool(causal),
                                softcap=None if softcap is None else float(softcap), scale=scale,
                                config=config, return_lse=bool(return_lse), interpret=interpret)


# ---------------------------------------------------------------------------------------------
# Reference.
# ---------------------------------------------------------------------------------------------


def flash_attention_reference(
    q: Queries,
    k: KeysValues,
    v: KeysValues,
    *,
    lengths: Lengths | None = None,
    causal: bool = True,
    sliding_window: Window = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Queries:
    """Masked multi-head attention with GQA, padding, causal and sliding-window masks, and
    optional logit soft-capping.

    Key j is visible to query i iff
      * j < lengths[b]                       (keys past a row's length are padding),
      * j <= i            when `causal`,
      * i - j < W         when `sliding_window=W` (Mistral / HF convention: a query sees
                          itself and the W-1 previous tokens; with `causal=False` the window
                          only limits how far back a query looks, never forward).
    Query rows at i >= lengths[b] return exactly 0. `lengths=None` means every row is full.
    `sliding_window` may be a traced int32 scalar (`_common.NO_WINDOW`: none). With
    `softcap=c` the scaled scores s become c * tanh(s / c) before the softmax (Gemma 2).

    Query head h reads KV head h // (q_heads // kv_heads). Scores and softmax are float32
    (HIGHEST matmul precision, so GPU TF32 does not blur the oracle); the result has q's dtype.
    Padded positions may hold garbage, NaN included: they are zeroed with `jnp.where` before
    any arithmetic, and fully masked rows give 0 rather than NaN. Keys hidden only by the
    causal or window mask are real tokens and are assumed finite.
    """
    if lengths is not None:
        require_int("lengths", lengths.dtype)
    _check_shapes(q.shape, k.shape, v.shape, None if lengths is None else lengths.shape)
    check_window(sliding_window)
    check_softcap(softcap)
    if lengths is None:
        lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return _attention(q, k, v, lengths, causal, sliding_window,
                      q.shape[-1] ** -0.5 if scale is None else scale, softcap)


def _attention(
    q: Queries,
    k: KeysValues,
    v: KeysValues,
    lengths: Lengths,
    causal: bool,
    sliding_window: Window,
    scale: float,
    softcap: float | None = None,
) -> Queries:
    # Design: build one [batch, q_pos, k_pos] visibility mask, zero every padded q/k/v entry
    # so NaN garbage never meets a multiply (0 * NaN = NaN), and take a max-subtracted softmax
    # whose probabilities are selected with `where` (not multiplied by a mask) and whose
    # empty rows divide by 1. GQA groups query heads against their KV head by reshaping q,
    # so K/V are never repeated.
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    pos = jnp.arange(seq)
    in_row = pos[None, :] < lengths[:, None]  # [batch, seq]: real (non-padding) tokens
    mask = jnp.broadcast_to(in_row[:, None, :], (batch, seq, seq))
    if causal:
        mask = mask & (pos[:, None] >= pos[None, :])
    if sliding_window is not None:
        mask = mask & (pos[:, None] - pos[None, :] < sliding_window)

    keep = in_row[:, :, None, None]
    q32, k32, v32 = (jnp.where(keep, x.astype(jnp.float32), 0.0) for x in (q, k, v))
    qg = q32.reshape(batch, seq, kv_heads, q_heads // kv_heads, head_dim)
    scores = soft_cap(jnp.einsum("bqkgd,bskd->bkgqs", qg, k32, precision=HIGHEST) * scale, softcap)
    probs = masked_softmax(scores, mask[:, None, None])
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v32, precision=HIGHEST)
    out = out.reshape(batch, seq, q_heads, head_dim)
    return jnp.where(keep, out, 0.0).astype(q.dtype)
