"""Weight-only quantized matmul: bf16/fp16 activations x int8/int4 weights (group-wise scales,
optional zero points). A Pallas Mosaic GPU (Hopper, sm_90) kernel, `quant_matmul`, that
dequantizes inside the kernel, and its plain-jnp reference, `quant_matmul_reference` (the CPU
path, and the kernel's oracle), built on `dequantize`.

Weight layout: the logical weight is W [K, N]; `codes` uint8 is [K/2, N] for bits=4 (code (k, n)
in the low nibble of codes[k // 2, n] for even k, the high nibble for odd k) and [K, N] for
bits=8; `scales` float [K/g, N]; `zeros` uint8 [K/g, N] or None (zero);
W[k, n] = scales[k//g, n] * (code - zero). Per-channel quantization is one group: group_size == K.
"""

import dataclasses
from typing import Any

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import HIGHEST, NUM_SMS, SMEM_BYTES, SUPPORTED_DTYPES, interpret_params

_SUPPORTED_BITS = (4, 8)


# ---------------------------------------------------------------------------------------------
# Tuning config.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Static knobs of the Mosaic GPU kernel (a jit static argument: hashable).

    tile_n:      output features per CTA (the wgmma M): 64 or 128.
    tile_m:      tokens per CTA (the wgmma N) when M is larger than it; a multiple of 64, at
                 most 256. Smaller M is padded only to a multiple of 8 and done in one tile.
    tile_k:      K rows per step, 32, 64 or 128; the effective step is min(tile_k, group_size)
                 (a step must not straddle a quantization group).
    num_buffers: SMEM buffers per operand; the kernel prefetches num_buffers - 1 steps ahead.
    split_k:     CTAs sharing one output tile along K (partials summed afterwards). None: a
                 heuristic that aims to give each of ~132 SMs a CTA.
    """

    tile_n: int = 64
    tile_m: int = 128
    tile_k: int = 64
    num_buffers: int = 3
    split_k: int | None = None

    def __post_init__(self):
        if self.tile_n not in (64, 128):
            raise ValueError(f"TuningConfig.tile_n must be 64 or 128, got {self.tile_n}")
        if self.tile_m <= 0 or self.tile_m % 64 or self.tile_m > 256:
            raise ValueError(f"TuningConfig.tile_m must be 64, 128, 192 or 256, got {self.tile_m}")
        if self.tile_k not in (32, 64, 128):
            raise ValueError(f"TuningConfig.tile_k must be 32, 64 or 128, got {self.tile_k}")
        if self.num_buffers < 1:
            raise ValueError(f"TuningConfig.num_buffers must be >= 1, got {self.num_buffers}")
        if self.split_k is not None and self.split_k < 1:
            raise ValueError(f"TuningConfig.split_k must be None or >= 1, got {self.split_k}")


def _block_m(m: int, tile_m: int) -> tuple[int, int]:
    """(block_m, m_pad): small M in one tile padded to a multiple of 8, else tiles of tile_m."""
    if m <= tile_m:
        b = max(8, -(-m // 8) * 8)
        return b, b
    return tile_m, -(-m // tile_m) * tile_m


def _default_split_k(tiles: int, k_steps: int) -> int:
    """The smallest divisor of k_steps that gives ~every SM a CTA, keeping >= 4 steps each."""
    want = -(-NUM_SMS // max(1, tiles))
    best = 1
    for s in range(1, k_steps + 1):
        if k_steps % s or k_steps // s < 4:
            continue
        best = s
        if s >= want:
            break
    return best


def _smem_bytes(block_m: int, tile_k: int, tile_n: int, nb: int, bits: int, itemsize: int) -> int:
    tkc = tile_k // 2 if bits == 4 else tile_k
    return (nb * (block_m * tile_k * itemsize + tkc * tile_n) + tile_k * tile_n * itemsize
            + 4 * tile_n * block_m + 16 * nb + 2048)


# ---------------------------------------------------------------------------------------------
# Kernel: Mosaic GPU, Hopper (sm_90).
#
# The kernel computes the transposed product out^T [N, M] = W^T [N, K] @ x^T [K, M], so that the
# weight's N fills the 64-row wgmma M dimension and the (small, decode) token count M only
# needs padding to a multiple of 8 (the wgmma N granularity), not to 64.
#
# Grid: (N / tile_n, M_pad / block_m, split_k). One CTA (one warpgroup) owns a [tile_n, block_m]
# output tile and a contiguous range of K steps of tile_k rows each (a step never straddles a
# quantization group: tile_k divides group_size). Per step:
#   TMA the packed codes tile [tile_k (/2 for int4), tile_n] uint8 and the activation tile
#   [block_m, tile_k] into SMEM (prefetching num_buffers - 1 steps ahead);
#   load the codes into registers, unpack (int4: `& 0xF`, `>> 4`), convert to bf16/fp16 (codes
#   0..255 are exact in both) and store the code tile into a swizzled SMEM buffer;
#   acc_step = codes^T @ x^T (wgmma, both operands transposed SMEM views, f32 accumulation);
#   acc += scale[group, n-tile] (a per-row f32 vector) * acc_step.
# int4 nibble order: the low nibbles of a tile's bytes go to rows [0, tile_k/2) of the code
# tile and the high nibbles to rows [tile_k/2, tile_k); the wrapper permutes x's columns the
# same way (evens then odds within each tile), so no register interleaving is needed.
# Zero points are applied outside the kernel, exactly: sum_k s (c - z) x = sum_k s c x -
# s z sum_k x, i.e. out -= (per-group sums of x) @ (scales * zeros), a [M, K/g] x [K/g, N] dot.
# split_k partial outputs are summed by the wrapper.
# ---------------------------------------------------------------------------------------------


def _swizzled(minor_elems: int, bits: int, what: str):
    swizzle = plgpu.find_swizzle(minor_elems * bits, what)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _quant_matmul_kernel_call(x_pad, codes, scales, *, bits, group_size, tile_k, tile_n,
                              block_m, num_buffers, split_k, interpret):
    """x_pad [m_pad, K] (int4: columns permuted per tile), codes, scales f32 -> f32 partials
    [split_k, N, m_pad] of the zero-point-free product, transposed."""
    m_pad, k = x_pad.shape
    n = codes.shape[1]
    dtype = x_pad.dtype
    is_interp = interpret is not None
    tkc = tile_k // 2 if bits == 4 else tile_k  # code rows per step
    k_steps = k // tile_k
    per_split = k_steps // split_k
    nb = max(1, min(num_buffers, per_split))

    def body(x_ref, c_ref, s_ref, o_ref, x_smem, c_smem, w_smem, o_smem, x_bars, c_bars):
        ni = lax.axis_index("n")
        mi = lax.axis_index("m")
        si = lax.axis_index("split")
        n0 = ni * tile_n
        first = si * per_split

        def issue(step, buf):  # step: local to this split
            kk = first + step
            plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(mi * block_m, block_m), pl.ds(kk * tile_k, tile_k)],
                                    x_smem.at[buf], x_bars.at[buf])
            plgpu.copy_gmem_to_smem(c_ref.at[pl.ds(kk * tkc, tkc), pl.ds(n0, tile_n)],
                                    c_smem.at[buf], c_bars.at[buf])

        for b in range(nb - 1):
            issue(jnp.int32(b), jnp.int32(b))

        def step(j, acc):
            buf = lax.rem(j, jnp.int32(nb))
            ahead = j + (nb - 1)

            @pl.when(ahead < per_split)
            def _prefetch():
                issue(ahead, lax.rem(ahead, jnp.int32(nb)))

            plgpu.barrier_wait(c_bars.at[buf])
            c = c_smem[buf]
            if bits == 4:  # sm_90 has no 8-bit pointwise ops but bitwise ones: widen first
                c = c.astype(jnp.int16)
                half = tile_k // 2
                w_smem[pl.ds(0, half), :] = (c & 0xF).astype(dtype)
                w_smem[pl.ds(half, half), :] = (c >> 4).astype(dtype)
            else:
                w_smem[...] = c.astype(dtype)
            plgpu.barrier_wait(x_bars.at[buf])
            plgpu.commit_smem()

            def mma(acc_ref):
                plgpu.wgmma(acc_ref, plgpu.transpose_ref(w_smem, (1, 0)),
                            plgpu.transpose_ref(x_smem.at[buf], (1, 0)))
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            part = pl.run_scoped(mma, plgpu.ACC((tile_n, block_m), jnp.float32))
            g = lax.div((first + j) * tile_k, jnp.int32(group_size))
            if is_interp:
                scale = s_ref[g, pl.ds(n0, tile_n)]
            else:
                scale = plgpu.load(s_ref.at[g], pl.ds(n0, tile_n), layout=plgpu.Layout.WGMMA.reduce(1),
                                   optimized=False)
            return acc + part * lax.broadcast_in_dim(scale, part.shape, [0])

        acc0 = jnp.zeros((tile_n, block_m), jnp.float32)
        if not is_interp:
            acc0 = plgpu.layout_cast(acc0, plgpu.Layout.WGMMA)
        acc = lax.fori_loop(0, per_split, step, acc0)
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[si, pl.ds(n0, tile_n), pl.ds(mi * block_m, block_m)])
        plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((split_k, n, m_pad), jnp.float32),
        scratch_types=(
            plgpu.SMEM((nb, block_m, tile_k), dtype, transforms=_swizzled(tile_k, 16, "rhs")),
            plgpu.SMEM((nb, tkc, tile_n), jnp.uint8, transforms=_swizzled(tile_n, 8, "codes")),
            plgpu.SMEM((tile_k, tile_n), dtype, transforms=_swizzled(tile_n, 16, "lhs")),
            plgpu.SMEM((tile_n, block_m), jnp.float32),
            plgpu.Barrier(num_barriers=nb),
            plgpu.Barrier(num_barriers=nb),
        ),
        grid=(n // tile_n, m_pad // block_m, split_k),
        grid_names=("n", "m", "split"),
        interpret=interpret,
    )
    return call(x_pad, codes, scales)


def _permute_int4_columns(x, tile_k: int):
    """Within each tile_k block of columns: even columns first, then odd ones."""
    m, k = x.shape
    return x.reshape(m, k // tile_k, tile_k // 2, 2).transpose(0, 1, 3, 2).reshape(m, k)


# ---------------------------------------------------------------------------------------------
# Validated, jitted entry point.
# ---------------------------------------------------------------------------------------------


def _check_common(x_shape, codes, scales, zeros, bits, group_size) -> None:
    if len(x_shape) != 2:
        raise ValueError(f"x must be rank 2 [M, K], got shape {tuple(x_shape)}")
    if bits not in _SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {_SUPPORTED_BITS}, got {bits}")
    if len(codes.shape) != 2:
        raise ValueError(f"codes must be rank 2 [K/2 or K, N] uint8, got shape {tuple(codes.shape)}")
    if jnp.dtype(codes.dtype) != jnp.dtype(jnp.uint8):
        raise ValueError(f"codes must be uint8, got {jnp.dtype(codes.dtype)}")
    k = x_shape[1]
    k_codes = codes.shape[0] * (2 if bits == 4 else 1)
    if k_codes != k:
        raise ValueError(
            f"codes {tuple(codes.shape)} hold K={k_codes} rows at bits={bits} (4-bit: two per "
            f"byte), but x has K={k}")
    n = codes.shape[1]
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise ValueError(f"group_size must be a positive divisor of K={k}, got {group_size}")
    want = (k // group_size, n)
    if tuple(scales.shape) != want:
        raise ValueError(f"scales must have shape [K/group_size, N] = {want}, got {tuple(scales.shape)}")
    if not jnp.issubdtype(scales.dtype, jnp.floating):
        raise ValueError(f"scales must be floating point, got {jnp.dtype(scales.dtype)}")
    if zeros is not None:
        if tuple(zeros.shape) != want:
            raise ValueError(f"zeros must have shape {want} (like scales) or be None, got {tuple(zeros.shape)}")
        if jnp.dtype(zeros.dtype) != jnp.dtype(jnp.uint8):
            raise ValueError(f"zeros must be uint8, got {jnp.dtype(zeros.dtype)}")


def check_quant_matmul_inputs(x, codes, scales, zeros=None, *, bits, group_size, config=None,
                              g_idx=None) -> dict:
    """Raises (ValueError / NotImplementedError) for inputs the kernel does not support; returns
    the effective static kernel parameters (tile_k, tile_n, tile_m, num_buffers, split_k).
    Works on arrays, tracers and ShapeDtypeStructs."""
    if g_idx is not None:
        raise NotImplementedError(
            "quant_matmul (Mosaic GPU kernel) does not support g_idx (GPTQ act-order). Either use "
            "quant_matmul_reference, or apply the permutation to the activations instead: with "
            "perm = argsort(g_idx) (stable), x @ W == x[:, perm] @ W[perm], and W[perm] (codes rows "
            "reordered at load time) has contiguous groups, i.e. g_idx[perm] == arange(K) // group_size "
            "when every group has group_size rows")
    _check_common(x.shape, codes, scales, zeros, bits, group_size)
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"quant_matmul kernel needs x bfloat16 or float16, got {jnp.dtype(x.dtype)}")
    config = TuningConfig() if config is None else config
    if not isinstance(config, TuningConfig):
        raise ValueError(f"config must be a TuningConfig or None, got {type(config).__name__}")
    m, k = x.shape
    n = codes.shape[1]
    if m == 0:
        raise ValueError("quant_matmul kernel needs at least one row of x")
    # The code tile loaded into registers needs >= 64 rows (the sm_90 register layouts of 8-bit
    # data tile rows by 64): int8 steps are >= 64 K rows, int4 steps 128 K rows (64 bytes).
    tile_k = 128 if bits == 4 else max(64, min(config.tile_k, group_size))
    if group_size % tile_k:
        raise ValueError(
            f"quant_matmul kernel supports group_size a multiple of {tile_k} at bits={bits} "
            f"(int4: 128, 256, ... or per-channel group_size=K; int8: 64, 128, ... or K), got "
            f"{group_size}; use quant_matmul_reference for smaller groups")
    if k % tile_k:
        raise ValueError(f"K={k} must be a multiple of the K step {tile_k}")
    if n % config.tile_n:
        raise ValueError(f"N={n} must be a multiple of TuningConfig.tile_n={config.tile_n}")
    block_m, m_pad = _block_m(m, config.tile_m)
    k_steps = k // tile_k
    tiles = (n // config.tile_n) * (m_pad // block_m)
    split_k = config.split_k or _default_split_k(tiles, k_steps)
    if k_steps % split_k:
        raise ValueError(f"TuningConfig.split_k={split_k} must divide the {k_steps} K steps")
    nb = max(1, min(config.num_buffers, k_steps // split_k))
    smem = _smem_bytes(block_m, tile_k, config.tile_n, nb, bits, jnp.dtype(x.dtype).itemsize)
    if smem > SMEM_BYTES:
        raise ValueError(f"{config} needs ~{smem} bytes of shared memory, over the sm_90 limit "
                         f"{SMEM_BYTES}: lower tile_m, tile_k or num_buffers")
    return dict(tile_k=tile_k, tile_n=config.tile_n, tile_m=config.tile_m,
                num_buffers=config.num_buffers, split_k=split_k)


def _quant_matmul_kernel(x, codes, scales, zeros, *, bits, group_size, tile_k, tile_n, tile_m,
                         num_buffers, split_k, interpret):
    m, k = x.shape
    block_m, m_pad = _block_m(m, tile_m)
    xp = _permute_int4_columns(x, tile_k) if bits == 4 else x
    xp = jnp.pad(xp, ((0, m_pad - m), (0, 0)))
    part = _quant_matmul_kernel_call(
        xp, codes, scales.astype(jnp.float32), bits=bits, group_size=group_size, tile_k=tile_k,
        tile_n=tile_n, block_m=block_m, num_buffers=num_buffers, split_k=split_k,
        interpret=interpret)
    out = (part[0] if split_k == 1 else part.sum(axis=0))[:, :m].T
    if zeros is not None:
        groups = k // group_size
        xsum = x.astype(jnp.float32).reshape(m, groups, group_size).sum(axis=-1)
        sz = scales.astype(jnp.float32) * zeros.astype(jnp.float32)
        out = out - jnp.dot(xsum, sz, precision=HIGHEST, preferred_element_type=jnp.float32)
    return out


_quant_matmul_kernel_jit = jax.jit(
    _quant_matmul_kernel,
    static_argnames=("bits", "group_size", "tile_k", "tile_n", "tile_m", "num_buffers",
                     "split_k", "interpret"))


def quant_matmul(
    x,
    codes,
    scales,
    zeros=None,
    *,
    bits: int,
    group_size: int,
    config: TuningConfig | None = None,
    interpret: Any = False,  # bool, or an InterpretGPUParams (e.g. detect_races=True)
    g_idx=None,
):
    """x [M, K] bf16/fp16 @ W (int4/int8 codes, group-wise scales, optional zero points) on a
    Hopper GPU (Mosaic GPU, sm_90): float32 [M, N], same semantics as quant_matmul_reference.

    Codes are dequantized inside the kernel (codes exact in x's dtype, f32 wgmma accumulation,
    f32 scale per group). bits 4/8; group_size a multiple of 32 dividing K (32/64/128, or K for
    per-channel); N a multiple of config.tile_n; any M >= 1. `g_idx` raises
    NotImplementedError (see check_quant_matmul_inputs). `interpret=True` runs the GPU
    interpreter on CPU (tests; on JAX 0.10.2 it needs the patches in
    tests/pallas_kernels/interpreter_patch.py). Jitted inside; callable under jit.
    """
    p = check_quant_matmul_inputs(x, codes, scales, zeros, bits=bits, group_size=group_size,
                                  config=config, g_idx=g_idx)
    return _quant_matmul_kernel_jit(x, codes, scales, zeros, bits=bits, group_size=group_size,
                                    interpret=interpret_params(interpret), **p)


# ---------------------------------------------------------------------------------------------
# Reference.
# ---------------------------------------------------------------------------------------------


def unpack_codes(codes, bits: int):
    """uint8 codes [*layers, K/2 or K, N] -> int32 [*layers, K, N], one code per element."""
    c = codes.astype(jnp.int32)
    if bits != 4:  # every other width is stored one code per byte
        return c
    both = jnp.stack([c & 0xF, c >> 4], axis=-2)  # [*layers, K/2, 2, N]
    return both.reshape(*c.shape[:-2], c.shape[-2] * 2, c.shape[-1])


def dequantize(codes, scales, zeros=None, *, bits: int, group_size: int, g_idx=None, table=None):
    """The dense float32 weight W [*layers, K, N] of codes [*layers, K/2 or K, N].

    Row k belongs to group g(k) = g_idx[k] (GPTQ act-order, [*layers, K]) or k // group_size.
    W[k, n] = (code - zeros[g(k), n]) * scales[g(k), n], zeros None meaning zero; with a 16-entry
    code book `table` [*layers, 16] (NF4 / FP4) W[k, n] = table[code] * scales[g(k), n] instead,
    and zero points are not used.
    """
    # One multiply per element in float32 (codes and zero points are exact integers before it),
    # so the result does not depend on how the per-group arrays are expanded.
    q = unpack_codes(codes, bits)
    k = q.shape[-2]
    if g_idx is None:
        rows = jnp.arange(k, dtype=jnp.int32) // group_size
    else:
        rows = jnp.asarray(g_idx, jnp.int32)

    def per_row(a):  # [*layers, G, N] -> [*layers, K, N]
        # Size-1 index dims broadcast as whole slices: a row gather, not one index per element.
        idx = rows.reshape((1,) * (a.ndim - rows.ndim - 1) + rows.shape + (1,))
        return jnp.take_along_axis(a, idx, axis=-2)

    scale = per_row(scales.astype(jnp.float32))
    if table is not None:
        flat = q.reshape(*q.shape[:-2], -1)
        values = jnp.take_along_axis(table.astype(jnp.float32), flat, axis=-1)
        return values.reshape(q.shape) * scale
    if zeros is not None:
        q = q - per_row(zeros.astype(jnp.int32))
    return q.astype(jnp.float32) * scale


def quant_matmul_reference(x, codes, scales, zeros=None, *, bits: int, group_size: int, g_idx=None):
    """x [M, K] @ dequantize(W) [K, N] in float32 (HIGHEST precision): float32 [M, N].

    `g_idx` (GPTQ act-order) is supported here, not by the kernel.
    """
    _check_common(x.shape, codes, scales, zeros, bits, group_size)
    w = dequantize(codes, scales, zeros, bits=bits, group_size=group_size, g_idx=g_idx)
    return jnp.dot(x.astype(jnp.float32), w, precision=HIGHEST, preferred_element_type=jnp.float32)
