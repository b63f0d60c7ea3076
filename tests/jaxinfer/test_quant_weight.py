"""QuantizedWeight on hand-made cases: packing order, zero points, g_idx, code tables, LLM.int8,
and slicing by lax.scan over stacked layers. Exact comparisons: every case is exactly
representable in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.quant import QuantizedWeight
from jaxinfer.quant.load import pack_codes, unpack_int32_rows


def pack_bitstream(codes: np.ndarray, bits: int) -> np.ndarray:
    """Reference GPTQ packer: codes [R, C] -> int32 [R*bits/32, C], a little-endian bit stream."""
    r, c = codes.shape
    words = np.zeros((r * bits // 32, c), np.uint64)
    for i in range(r):
        for b in range(bits):
            pos = i * bits + b
            words[pos // 32] |= ((codes[i].astype(np.uint64) >> b) & 1) << (pos % 32)
    return words.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_int32_rows_round_trip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(64, 5)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_int32_rows(pack_bitstream(codes, bits), bits, 64), codes)


def test_gptq_nibble_order():
    # Row k = 8i + j sits in bits 4j..4j+3 of word i (least significant nibble first).
    word = np.array([[0x76543210]], np.uint32).view(np.int32)
    np.testing.assert_array_equal(unpack_int32_rows(word, 4, 8)[:, 0], np.arange(8))


def test_int4_packing_order():
    codes = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.uint8)  # [K=4, N=2]
    packed = pack_codes(codes, 4)
    np.testing.assert_array_equal(packed, [[0x31, 0x42], [0x75, 0x86]])  # even k: low nibble
    w = QuantizedWeight(codes=jnp.asarray(packed), scales=jnp.ones((1, 2), jnp.float32), bits=4, group_size=4)
    assert w.shape == (4, 2)
    np.testing.assert_array_equal(w.dequantize(), codes.astype(np.float32))


def test_affine_groups_and_zero_points():
    codes = np.array([[0, 15], [8, 1], [3, 4], [9, 10]], np.uint8)
    scales = np.array([[0.5, 2.0], [0.25, -1.0]], np.float32)  # groups of 2 input rows
    zeros = np.array([[8, 7], [1, 0]], np.uint8)
    w = QuantizedWeight(codes=jnp.asarray(pack_codes(codes, 4)), scales=jnp.asarray(scales),
                        zeros=jnp.asarray(zeros), bits=4, group_size=2)
    expected = (codes.astype(np.float32) - np.repeat(zeros, 2, 0)) * np.repeat(scales, 2, 0)
    np.testing.assert_array_equal(w.dequantize(), expected)
    x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    np.testing.assert_allclose(w.matmul(jnp.asarray(x)), x @ expected, rtol=1e-6)


def test_g_idx_act_order():
    codes = np.array([[1], [2], [3], [4]], np.uint8)
    scales = np.array([[10.0], [100.0]], np.float32)
    zeros = np.array([[0], [1]], np.uint8)
    g_idx = np.array([1, 0, 1, 0], np.int32)  # not monotone, as with desc_act
    w = QuantizedWeight(codes=jnp.asarray(codes), scales=jnp.asarray(scales), zeros=jnp.asarray(zeros),
                        g_idx=jnp.asarray(g_idx), bits=8, group_size=2)
    np.testing.assert_array_equal(w.dequantize()[:, 0], [100.0 * 0, 10.0 * 2, 100.0 * 2, 10.0 * 4])


def test_table_lookup():
    table = np.arange(16, dtype=np.float32) / 8 - 1  # any 16-entry code book
    codes = np.array([[0, 15], [7, 8], [1, 2], [3, 4]], np.uint8)
    scales = np.array([[2.0, 4.0]], np.float32)
    w = QuantizedWeight(codes=jnp.asarray(pack_codes(codes, 4)), scales=jnp.asarray(scales),
                        table=jnp.asarray(table), bits=4, group_size=4, kind="table")
    np.testing.assert_array_equal(w.dequantize(), table[codes] * scales)


def random_weight(rng, layers, k=64, n=24, g=16):
    codes = rng.integers(0, 16, size=(layers, k, n)).astype(np.uint8)
    return QuantizedWeight(
        codes=jnp.asarray(np.stack([pack_codes(c, 4) for c in codes])),
        scales=jnp.asarray(rng.standard_normal((layers, k // g, n)).astype(np.float32)),
        zeros=jnp.asarray(rng.integers(0, 16, size=(layers, k // g, n)).astype(np.uint8)),
        g_idx=jnp.asarray(np.stack([rng.permutation(k) // g for _ in range(layers)]).astype(np.int32)),
        bits=4, group_size=g,
    )


def test_stacked_layers_in_scan():
    rng = np.random.default_rng(0)
    w = random_weight(rng, layers=3)
    assert w.dequantize().shape == (3, 64, 24)
    x = jnp.asarray(rng.standard_normal((2, 5, 64)).astype(np.float32))

    def body(carry, layer_w):
        return carry, layer_w.matmul(carry)

    _, ys = jax.jit(lambda x, w: jax.lax.scan(body, x, w))(x, w)
    dense = np.asarray(w.dequantize())
    for i in range(3):
        np.testing.assert_allclose(ys[i], np.asarray(x) @ dense[i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one layer"):
        w.matmul(x)


def int8_weight(rng, k, n, threshold):
    q = rng.integers(-127, 128, size=(k, n))
    scb = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    return QuantizedWeight(
        codes=jnp.asarray((q + 128).astype(np.uint8)),
        scales=jnp.asarray((scb * np.float32(1 / 127))[None, :]),
        zeros=jnp.full((1, n), 128, jnp.uint8), bits=8, group_size=k,
        kind="llm_int8" if threshold else "affine", threshold=threshold,
    )


def test_llm_int8_outlier_columns_take_the_float_path():
    rng = np.random.default_rng(1)
    w = int8_weight(rng, 32, 8, threshold=6.0)
    dense = np.asarray(w.dequantize())
    # Only outlier columns nonzero: the int8 part is all zeros, the rest is exact float32.
    x = np.zeros((3, 32), np.float32)
    x[:, 5] = [7.0, -9.0, 0.25]  # column 5 holds an outlier, so all of it goes the float path
    np.testing.assert_allclose(w.matmul(jnp.asarray(x)), x @ dense, rtol=1e-6)
    # Ordinary activations: int8 quantisation error only (row absmax / 127 per element).
    x = rng.uniform(-1, 1, size=(4, 32)).astype(np.float32)
    x[0, 3] = 10.0
    got = np.asarray(w.matmul(jnp.asarray(x)))
    np.testing.assert_allclose(got, x @ dense, atol=0.05 * np.abs(dense).max())
    assert not np.allclose(got, x @ dense, rtol=1e-6, atol=0)  # really quantised
    weight_only = w.replace(kind="affine", threshold=0.0)
    np.testing.assert_allclose(weight_only.matmul(jnp.asarray(x)), x @ dense, rtol=1e-5, atol=1e-5)


def test_llm_int8_matches_reference_algorithm():
    rng = np.random.default_rng(2)
    k, n = 48, 16
    w = int8_weight(rng, k, n, threshold=6.0)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    x[:, :, 7] *= 8  # an outlier feature
    # bitsandbytes' MatMul8bitLt inference path, written out in numpy.
    a = x.reshape(-1, k)
    a16 = a.astype(np.float16)
    outl = np.abs(a16) >= 6.0
    cols = outl.any(0)
    row = np.where(outl, 0, a16).astype(np.float32)
    stats = np.abs(row).max(1)
    ca = np.round(row * (np.float32(127) / stats[:, None])).astype(np.int32)
    ca[:, cols] = 0
    cb = np.asarray(w.codes).astype(np.int32) - 128
    scb = np.asarray(w.scales)[0] * np.float32(127)
    out = (ca @ cb).astype(np.float32) * (stats[:, None] * scb[None]) * np.float32(6.200124e-05)
    out += a[:, cols] @ (cb[cols] * (scb * np.float32(7.874015718698502e-3))).astype(np.float32)
    np.testing.assert_allclose(np.asarray(w.matmul(jnp.asarray(x))).reshape(-1, n), out, rtol=1e-5, atol=1e-5)
