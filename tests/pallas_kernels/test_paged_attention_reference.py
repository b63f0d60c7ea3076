"""paged_attention_reference against a float64 NumPy oracle and against the prefill reference.

Inputs are fresh random draws each run; every failure message carries the seed. Re-run a
failure with PALLAS_TEST_SEED=<seed>. Every page a slot does not own (the null page 0
included) and every position past a slot's length is NaN, and table entries past a slot's
length point at random pages, so each test also checks that nothing unowned leaks.
"""

import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention_reference, paged_attention_reference
from pallas_kernels.paged_attention import _check_shapes

# One jitted callable per reference, so repeated shapes/static args reuse compilations.
paged = jax.jit(paged_attention_reference, static_argnames=("sliding_window", "scale", "softcap"))
flash = jax.jit(flash_attention_reference, static_argnames=("causal", "sliding_window", "scale"))

# f32: with std-2 inputs a score's rounding error is ~eps * sum_d |q_d k_d| * scale ~ 3e-6 at
# head_dim 128 (eps = 1.2e-7), a probability's relative error equals its score's absolute
# error, and outputs are weighted sums of |v| up to ~8: observed worst case ~1.5e-5 over
# 5e5 outputs, so atol 5e-5 (rtol 1e-5) leaves ~3x margin while still catching any real bug.
F32_TOL = dict(rtol=1e-5, atol=5e-5)
# Low precision: the oracle reads the same rounded inputs, so the only extra error is rounding
# the f32 result to the output dtype (<= 1 ulp: 2^-8 for bf16, 2^-11 for f16): allow 2 ulp,
# plus the f32 atol above for outputs near 0.
LOW_TOL = {jnp.bfloat16: dict(rtol=2**-7, atol=5e-5), jnp.float16: dict(rtol=2**-10, atol=5e-5)}


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("PALLAS_TEST_SEED") or secrets.randbits(32))


def to_device(x, dtype=np.float32):
    """Cast on the host, then transfer: a device-side cast would compile one op per shape."""
    return jnp.asarray(np.asarray(x, dtype))


def naive_paged(q, k_pages, v_pages, table, lengths, window, scale, softcap=None):
    """float64 oracle: per slot, look up each visible token's page and offset one by one
    (scores soft-capped as Gemma 2: cap * tanh(s / cap) after scaling)."""
    slots, q_heads, _ = q.shape
    group = q_heads // k_pages.shape[2]
    page_size = k_pages.shape[1]
    out = np.zeros(q.shape)
    for s in range(slots):
        n = int(lengths[s])
        if n == 0:
            continue
        t = np.arange(0 if window is None else max(0, n - window), n)  # query is at n - 1
        k = np.repeat(k_pages[table[s, t // page_size], t % page_size], group, axis=1)
        v = np.repeat(v_pages[table[s, t // page_size], t % page_size], group, axis=1)
        scores = np.einsum("hd,thd->ht", q[s], k) * scale
        if softcap is not None:
            scores = softcap * np.tanh(scores / softcap)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[s] = np.einsum("ht,thd->hd", p / p.sum(axis=-1, keepdims=True), v)
    return out


def slot_lengths(rng, page_size, pages_per_seq):
    """0, 1, page boundaries +-1, capacity-1, full capacity, and two non-multiples of page_size."""
    cap = page_size * pages_per_seq
    fixed = [0, 1, page_size - 1, page_size, page_size + 1, 2 * page_size - 1, 2 * page_size + 1,
             cap - 1, cap]
    rand = [x for x in rng.integers(1, cap, 8) if x % page_size][:2]
    return np.array(fixed + rand, np.int32)


def build_pool(rng, lengths, page_size, pages_per_seq, kv_heads, head_dim, spare_pages=3):
    """A NaN pool (null page 0 and spares included) whose slot-owned positions hold random K/V.

    Each slot gets distinct pages in random pool order; table entries past its length point at
    random pages (null, spare, or another slot's). Returns float64 k, v and int32 table.
    """
    needed = [-(-int(n) // page_size) for n in lengths]
    num_pages = 1 + sum(needed) + spare_pages
    shape = (num_pages, page_size, kv_heads, head_dim)
    k, v = np.full(shape, np.nan), np.full(shape, np.nan)
    table = rng.integers(0, num_pages, (len(lengths), pages_per_seq)).astype(np.int32)
    free = iter(rng.permutation(np.arange(1, num_pages)))
    for s, n in enumerate(lengths):
        table[s, : needed[s]] = [next(free) for _ in range(needed[s])]
        t = np.arange(n)
        for pool in (k, v):
            pool[table[s, t // page_size], t % page_size] = 2.0 * rng.standard_normal((n, kv_heads, head_dim))
    return k, v, table


def run_case(seed, *, page_size, pages_per_seq, q_heads, kv_heads, head_dim, window=None,
             dtype=jnp.float32, scale=None, softcap=None):
    rng = np.random.default_rng(seed)
    lengths = slot_lengths(rng, page_size, pages_per_seq)
    k64, v64, table = build_pool(rng, lengths, page_size, pages_per_seq, kv_heads, head_dim)
    q = to_device(2.0 * rng.standard_normal((len(lengths), q_heads, head_dim)), dtype)
    k, v = to_device(k64, dtype), to_device(v64, dtype)
    out = paged(q, k, v, to_device(table, np.int32), to_device(lengths, np.int32),
                sliding_window=window, scale=scale, softcap=softcap)
    assert out.dtype == dtype and out.shape == q.shape
    expected = naive_paged(np.asarray(q, np.float64), np.asarray(k, np.float64),
                           np.asarray(v, np.float64), table, lengths, window,
                           head_dim**-0.5 if scale is None else scale, softcap)
    msg = f"seed={seed} lengths={lengths.tolist()} window={window} dtype={jnp.dtype(dtype).name}"
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), f"non-finite output: {msg}"
    assert (out[lengths == 0] == 0).all(), f"length-0 slots must be exactly 0: {msg}"
    tol = F32_TOL if dtype == jnp.float32 else LOW_TOL[dtype]
    np.testing.assert_allclose(out, expected, **tol, err_msg=msg)


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (8, 1)])  # GQA ratio 1 / 4 / 8
@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_page_sizes_and_gqa_ratios(seed, page_size, q_heads, kv_heads):
    run_case(seed, page_size=page_size, pages_per_seq=4, q_heads=q_heads, kv_heads=kv_heads, head_dim=64)


@pytest.mark.parametrize("head_dim", [8, 128])
def test_head_dims(seed, head_dim):
    run_case(seed, page_size=16, pages_per_seq=4, q_heads=8, kv_heads=2, head_dim=head_dim)


def test_many_pages(seed):
    run_case(seed, page_size=16, pages_per_seq=40, q_heads=8, kv_heads=2, head_dim=64)


@pytest.mark.parametrize("window", [1, 5, 17, 1000])  # 17 = page_size + 1; 1000 never bites
def test_sliding_window(seed, window):
    run_case(seed, page_size=16, pages_per_seq=4, q_heads=8, kv_heads=2, head_dim=32, window=window)


@pytest.mark.parametrize("dtype,window", [(jnp.bfloat16, None), (jnp.bfloat16, 20), (jnp.float16, None)])
def test_low_precision_inputs(seed, dtype, window):
    run_case(seed, page_size=32, pages_per_seq=4, q_heads=8, kv_heads=2, head_dim=128,
             window=window, dtype=dtype)


def test_custom_scale(seed):
    run_case(seed, page_size=16, pages_per_seq=3, q_heads=4, kv_heads=1, head_dim=8, scale=0.3)


@pytest.mark.parametrize("window", [None, 7])
def test_matches_prefill_reference_last_row(seed, window):
    # The two oracles must agree: the last valid row of causal prefill over a row's K/V is the
    # decode step whose pages hold the same K/V.
    rng = np.random.default_rng(seed)
    page_size, pages_per_seq, q_heads, kv_heads, head_dim = 16, 3, 8, 2, 32
    seq = page_size * pages_per_seq
    lengths = np.array([1, 15, 16, 17, 33, seq], np.int32)
    k64, v64, table = build_pool(rng, lengths, page_size, pages_per_seq, kv_heads, head_dim)
    q = 2.0 * rng.standard_normal((len(lengths), seq, q_heads, head_dim))
    # Dense rows read through the same table, so positions past a length stay NaN / garbage.
    t = np.arange(seq)
    rows_k, rows_v = (pool[table[:, t // page_size], t % page_size] for pool in (k64, v64))
    rows = np.arange(len(lengths))
    q_last = q[rows, lengths - 1]
    q, rows_k, rows_v, k, v, q_last = map(to_device, (q, rows_k, rows_v, k64, v64, q_last))
    lengths_d = to_device(lengths, np.int32)
    prefill = flash(q, rows_k, rows_v, lengths=lengths_d, sliding_window=window)
    decode = paged(q_last, k, v, to_device(table, np.int32), lengths_d, sliding_window=window)
    last = np.asarray(prefill)[rows, lengths - 1]
    np.testing.assert_allclose(decode, last, **F32_TOL, err_msg=f"seed={seed} window={window}")


def test_out_of_range_table_entries_past_length_are_ignored(seed):
    rng = np.random.default_rng(seed)
    lengths = np.array([0, 5, 20], np.int32)
    k64, v64, table = build_pool(rng, lengths, 8, 4, 2, 8)
    args = (to_device(rng.standard_normal((3, 4, 8))), to_device(k64), to_device(v64))
    lengths = to_device(lengths, np.int32)
    wild = table.copy()
    wild[0, :], wild[1, 1:], wild[2, 3:] = -7, 10_000, len(k64)  # past each slot's length
    np.testing.assert_array_equal(
        paged(*args, to_device(wild, np.int32), lengths),
        paged(*args, to_device(table, np.int32), lengths), err_msg=f"seed={seed}")


@pytest.mark.parametrize("q_shape,kv_shape,v_shape,table_shape,lengths_shape,message", [
    ((2, 4, 8), (5, 16, 2, 8), None, (2, 3), (3,), "lengths must have shape"),
    ((2, 4, 8), (5, 16, 2, 8), None, (3, 3), (2,), "page_table must have shape"),
    ((2, 4, 8), (5, 16, 2, 8), None, (2,), (2,), "page_table must have shape"),
    ((2, 1, 4, 8), (5, 16, 2, 8), None, (2, 3), (2,), "q must be rank 3"),
    ((2, 4, 8), (16, 2, 8), None, (2, 3), (2,), "k_pages must be rank 4"),
    ((2, 4, 8), (5, 16, 2, 8), (5, 8, 2, 8), (2, 3), (2,), "same shape"),
    ((2, 4, 8), (5, 16, 2, 16), None, (2, 3), (2,), "head_dim mismatch"),
])
def test_rejects_malformed_shapes(q_shape, kv_shape, v_shape, table_shape, lengths_shape, message):
    # Without runtime type checks the wrapper's ValueError is the guard; with them (this test
    # suite's default) jaxtyping may reject the call first with a TypeError, so accept both
    # from the public function and check the ValueError text on the validator itself.
    v_shape = v_shape or kv_shape
    args = (*(to_device(np.zeros(s)) for s in (q_shape, kv_shape, v_shape)),
            *(to_device(np.zeros(s), np.int32) for s in (table_shape, lengths_shape)))
    with pytest.raises((ValueError, TypeError)):
        paged_attention_reference(*args)
    with pytest.raises(ValueError, match=message):
        _check_shapes(q_shape, kv_shape, v_shape, table_shape, lengths_shape)


def test_rejects_bad_heads_window_and_int_dtypes():
    q, pages = to_device(np.zeros((2, 6, 8))), to_device(np.zeros((5, 16, 4, 8)))
    table, lengths = to_device(np.zeros((2, 3)), np.int32), to_device(np.zeros(2), np.int32)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        paged_attention_reference(q, pages, pages, table, lengths)
    q = to_device(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="sliding_window"):
        paged_attention_reference(q, pages, pages, table, lengths, sliding_window=0)
    with pytest.raises((ValueError, TypeError)):
        paged_attention_reference(q, pages, pages, to_device(np.zeros((2, 3))), lengths)


# Soft-caps that bite (std-2 inputs), alone and with a window and a custom scale (Gemma 2's
# local layers); tanh is smooth, so the f32 tolerance holds.
@pytest.mark.parametrize("softcap,window,scale", [(1.0, None, None), (5.0, 5, None), (3.0, 17, 0.2)])
def test_softcap(seed, softcap, window, scale):
    run_case(seed, page_size=16, pages_per_seq=4, q_heads=8, kv_heads=2, head_dim=64, window=window, scale=scale,
             softcap=softcap)


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_quantized_pages_equal_dequantized_float_pages(quant):
    """8-bit pages (pallas_kernels.kv_quant) read as their dequantized float32 values: the same
    computation, so equal to float32 rounding (1e-6)."""
    from pallas_kernels import kv_quant  # the 8-bit formats (only these tests use them here)

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 7, 16, 2, 32)), jnp.float32)  # K and V: [pages, ps, kvh, hd]
    if quant == "int8":
        (kq, ks, _), (vq, vs, _) = (kv_quant.quantize(y, jnp.int8) for y in x)
        ks, vs = jnp.swapaxes(ks, 1, 2), jnp.swapaxes(vs, 1, 2)
    else:
        ks = vs = jnp.asarray([0.5, 2.0], jnp.float32)
        kq, vq = (kv_quant.quantize(y, jnp.float8_e4m3fn, ks)[0] for y in x)
    table = jnp.asarray(rng.permutation(7)[:6].reshape(2, 3).astype(np.int32))
    lengths = jnp.asarray([20, 41], jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32)
    out = paged_attention_reference(q, kq, vq, table, lengths, k_scales=ks, v_scales=vs)
    want = paged_attention_reference(q, kv_quant.dequantize(kq, ks), kv_quant.dequantize(vq, vs), table, lengths)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)
