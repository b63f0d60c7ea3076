"""`QuantizedWeight`: one PyTree for every quantized linear-weight format jaxinfer reads.

The weight is logically W [in=K, out=N], the dense layout of jaxinfer/model.py, optionally with a
leading stacked-layers axis (`lax.scan` over the layers slices every array leaf, so all leaves
carry it or none does). Arrays:

- `codes` uint8: the integer codes. bits == 4: two codes per byte packed along K,
  `codes[k // 2, n]` holds code (k, n) in its low nibble for even k and its high nibble for odd
  k, so `codes` is [K/2, N]. Any other width (8, and 2- and 3-bit GPTQ) is stored one code per
  byte, [K, N] (unpacked: simple, not memory-optimal for 2/3 bits).
- `scales` float32 [G, N]: one scale per (group of input rows, output column). Groups run over
  the input dim: row k is in group `g_idx[k]` if `g_idx` is given (GPTQ act-order), else
  `k // group_size`; a per-output-channel scale is one group, group_size == K.
- `zeros` uint8 [G, N] or None: zero points in code units (None: zero).
- `g_idx` int32 [K] or None.
- `table` float32 [16] or None: code book for 4-bit float formats (NF4 / FP4).

Dequantization, by `kind` (static):
- "affine" (GPTQ, bitsandbytes int8 weight-only): W[k, n] = (code - zero[g(k), n]) * scale[g(k), n]
- "table"  (bitsandbytes NF4 / FP4):              W[k, n] = table[code] * scale[g(k), n]
- "llm_int8": the same weights as "affine" (8-bit codes offset by 128, zero 128, scale = SCB/127),
  but `matmul` runs LLM.int8 (bitsandbytes' outlier decomposition at `threshold`).

`matmul` here is the plain-jnp reference (dequantize, then a float32 dot); a fused kernel can
replace it per backend without changing the PyTree.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt8

from pallas_kernels import is_sm90
from pallas_kernels import quant_matmul as qm

KINDS = ("affine", "table", "llm_int8")
# bitsandbytes' float32 constants for 1/127 and 1/(127*127) (int8_vectorwise_dequant, int8_mm_dequant).
_INV_127 = 7.874015718698502e-3
_INV_127_SQ = 6.200124e-05


MATMUL_BACKENDS = ("auto", "reference", "interpret")


@flax.struct.dataclass
class QuantizedWeight:
    """A quantized [*layers, K, N] linear weight; see the module docstring for the layout."""

    codes: UInt8[Array, "*layers kc n"]
    scales: Float[Array, "*layers groups n"]
    zeros: UInt8[Array, "*layers groups n"] | None = None
    g_idx: Int[Array, "*layers k"] | None = None
    table: Float[Array, "*layers 16"] | None = None
    bits: int = flax.struct.field(pytree_node=False, default=4)
    group_size: int = flax.struct.field(pytree_node=False, default=128)
    kind: str = flax.struct.field(pytree_node=False, default="affine")
    threshold: float = flax.struct.field(pytree_node=False, default=0.0)  # llm_int8 only
    # Matmul implementation: "auto" = the Pallas kernel on a Hopper GPU where it supports the
    # format (bits 4/8, no act-order, kernel group sizes), else the jnp reference; "reference";
    # "interpret" = the kernel in Mosaic GPU interpret mode (CPU tests). See `with_matmul_backend`.
    backend: str = flax.struct.field(pytree_node=False, default="auto")

    @property
    def in_features(self) -> int:
        return self.codes.shape[-2] * (2 if self.bits == 4 else 1)

    @property
    def out_features(self) -> int:
        return self.codes.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical dense shape [*layers, K, N]."""
        return (*self.codes.shape[:-2], self.in_features, self.out_features)

    def unpacked_codes(self) -> Int[Array, "*layers k n"]:
        """The codes one per element, int32 [*layers, K, N]."""
        return qm.unpack_codes(self.codes, self.bits)

    def dequantize(self) -> Float[Array, "*layers k n"]:
        """The dense float32 weight [*layers, K, N]."""
        if self.kind == "table" and self.table is None:
            raise ValueError("a 'table' QuantizedWeight needs its code table")
        return qm.dequantize(self.codes, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                             g_idx=self.g_idx, table=self.table if self.kind == "table" else None)

    def matmul(self, x: Float[Array, "*b k"]) -> Float[Array, "*b n"]:
        """x @ W with float32 accumulation; float32 [*b, N]. Needs an unstacked (2-D) weight."""
        if len(self.codes.shape) != 2:
            raise ValueError(f"matmul needs one layer's weight, got stacked shape {self.shape}")
        if self.kind == "llm_int8" and self.threshold > 0:
            return self._llm_int8_matmul(x)
        kernel = self._kernel_matmul(x)
        if kernel is not None:
            return kernel
        w = self.dequantize()
        return jnp.einsum("...i,io->...o", x.astype(jnp.float32), w, preferred_element_type=jnp.float32)

    def _kernel_matmul(self, x: Float[Array, "*b k"]) -> Float[Array, "*b n"] | None:
        """The dequantize-in-kernel Pallas matmul, or None where the reference must run."""
        if self.backend not in MATMUL_BACKENDS:
            raise ValueError(f"QuantizedWeight.backend {self.backend!r} is not one of {MATMUL_BACKENDS}")
        if self.backend == "reference" or self.kind != "affine" or self.g_idx is not None:
            return None
        if self.backend == "auto" and not is_sm90():
            return None
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype not in (jnp.bfloat16, jnp.float16):
            x2 = x2.astype(jnp.bfloat16)  # the kernel's activation dtypes
        try:
            qm.check_quant_matmul_inputs(x2, self.codes, self.scales, self.zeros, bits=self.bits,
                                         group_size=self.group_size)
        except (ValueError, NotImplementedError):
            if self.backend == "interpret":
                raise  # asked for the kernel explicitly: say why it cannot run
            return None
        out = qm.quant_matmul(x2, self.codes, self.scales, self.zeros, bits=self.bits, group_size=self.group_size,
                              interpret=self.backend == "interpret")
        return out.reshape(*x.shape[:-1], self.out_features)

    def _llm_int8_matmul(self, x: Float[Array, "*b k"]) -> Float[Array, "*b n"]:
        """bitsandbytes LLM.int8 (MatMul8bitLt at inference, its default CPU kernels), bit for bit.

        Activations are cast to float16; elements with |x| >= threshold are outliers and every
        column holding one goes through a float32 matmul with the dequantized weight columns.
        The rest is quantized row-wise (absmax over the non-outlier elements) to int8 and
        multiplied with the int8 weight in int32, rescaled by row_absmax * SCB / 127**2.

        The float32 operations follow bitsandbytes' own evaluation order, because its forward
        pass is chaotic at the rounding level (one code rounded the other way in one layer moves
        the logits by ~1/3 of the whole int8-vs-fp32 difference):
        - the row scale is torch's `127.0 / row_stats`, i.e. reciprocal(row_stats) * 127;
        - the outlier weight columns are (CB * SCB) * (1/127);
        - the outlier product is a sequential fused multiply-add over the outlier columns in
          ascending order (what the BLAS sgemm does for a handful of columns), added to the int8
          part afterwards (torch's `addmm`).
        """
        k, n = self.shape
        lead = x.shape[:-1]
        a = x.reshape(-1, k).astype(jnp.float32)
        rows = a.shape[0]
        a16 = a.astype(jnp.float16)
        outliers = jnp.abs(a16) >= self.threshold
        cols = jnp.any(outliers, axis=0)  # [K]
        inliers = jnp.where(outliers, jnp.float16(0), a16).astype(jnp.float32)
        row_stats = jnp.max(jnp.abs(inliers), axis=-1)  # [rows] float32
        inv = jnp.where(row_stats > 0, (1.0 / row_stats) * 127.0, 0.0)
        ca = jnp.round(inliers * inv[:, None]).astype(jnp.int8)
        if rows > 1:
            ca = jnp.where(cols[None, :], jnp.int8(0), ca)
        cb = (self.codes.astype(jnp.int32) - self.zeros.astype(jnp.int32)).astype(jnp.int8)  # [K, N]
        acc = jax.lax.dot_general(ca, cb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        # scales hold SCB * float32(1/127), which does not always multiply back to SCB exactly.
        # bitsandbytes' SCB is the absmax of a float16 weight row (it quantizes W.to(float16)), so
        # the float16 value whose scale is the stored one is SCB bit for bit; other scales (not
        # from bnb) use scales * 127.
        scales = self.scales[0].astype(jnp.float32)
        scb = scales * 127.0
        scb16 = scb.astype(jnp.float16).astype(jnp.float32)
        scb = jnp.where(scb16 * jnp.float32(_INV_127) == scales, scb16, scb)
        out = acc.astype(jnp.float32) * (row_stats[:, None] * scb[None, :]) * jnp.float32(_INV_127_SQ)

        # The outlier columns in ascending order, then a loop over just those.
        order = jnp.argsort(jnp.logical_not(cols), stable=True).astype(jnp.int32)
        count = jnp.sum(cols, dtype=jnp.int32)

        def body(carry):
            j, acc, out = carry
            c = order[j]
            a_col = jax.lax.dynamic_index_in_dim(a, c, axis=1, keepdims=True)  # [rows, 1]
            b_row = jax.lax.dynamic_index_in_dim(cb, c, axis=0, keepdims=True).astype(jnp.float32)
            b_row = (b_row * scb[None, :]) * jnp.float32(_INV_127)  # [1, N]
            # `out` rides through the loop, unchanged but not visibly so (j >= 0 always), which
            # keeps its last multiply out of the fusion with the add below: XLA:CPU would contract
            # the two into one FMA (an optimization_barrier is expanded away before fusion).
            return j + 1, _fma(a_col, b_row, acc), jnp.where(j < 0, acc, out)

        init = (jnp.int32(0), jnp.zeros((rows, n), jnp.float32), out)
        _, sub, out = jax.lax.while_loop(lambda c: c[0] < count, body, init)
        return (out + sub).reshape(*lead, n)


def _split(v: Array) -> tuple[Array, Array]:
    # Veltkamp split of a float32 into two halves whose products are exact.
    t = v * jnp.float32(4097.0)
    hi = t - (t - v)
    return hi, v - hi


def _fma(a: Array, b: Array, c: Array) -> Array:
    """float32 a * b + c rounded once (as a hardware FMA), from error-free transformations, so
    the result does not depend on whether the backend contracts multiply-adds."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    err = ((ah * bh - p) + ah * bl + al * bh) + al * bl  # a * b - p, exactly
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)  # p + c - s, exactly
    return s + (e + err)


def with_matmul_backend(params, backend: str):
    """A copy of a params PyTree (or a Model) with every QuantizedWeight's matmul backend set."""
    if backend not in MATMUL_BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {MATMUL_BACKENDS}")
    return jax.tree.map(lambda w: w.replace(backend=backend) if isinstance(w, QuantizedWeight) else w, params,
                        is_leaf=lambda w: isinstance(w, QuantizedWeight))
