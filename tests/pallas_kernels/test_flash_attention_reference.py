"""flash_attention_reference against a float64 NumPy oracle (and jax.nn.dot_product_attention).

Inputs are fresh random draws each run; every failure message carries the seed. Re-run a
failure with PALLAS_TEST_SEED=<seed>. Padded positions of q, k and v are always NaN, so every
test also checks that padding never leaks into the output.
"""

import inspect
import os
import secrets
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import NO_WINDOW, flash_attention_reference
from pallas_kernels.flash_attention import _check_shapes

# One jitted callable for the whole file, so repeated shapes/static args reuse compilations.
flash = jax.jit(flash_attention_reference, static_argnames=("causal", "sliding_window", "scale", "softcap"))
jax_attention = jax.jit(jax.nn.dot_product_attention, static_argnames=("is_causal", "local_window_size"))

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


def naive_attention(q, k, v, lengths, causal, window, scale, softcap=None):
    """float64 oracle: loop over rows and query positions, gather only the visible keys
    (scores soft-capped as Gemma 2: cap * tanh(s / cap) after scaling)."""
    batch, seq, q_heads, _ = q.shape
    k = np.repeat(k, q_heads // k.shape[2], axis=2)
    v = np.repeat(v, q_heads // v.shape[2], axis=2)
    out = np.zeros(q.shape)
    for b in range(batch):
        n = min(int(lengths[b]), seq)
        for i in range(n):
            js = [j for j in range(n) if (not causal or j <= i) and (window is None or i - j < window)]
            s = np.einsum("hd,jhd->hj", q[b, i], k[b, js]) * scale
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            out[b, i] = np.einsum("hj,jhd->hd", p / p.sum(axis=-1, keepdims=True), v[b, js])
    return out


def row_lengths(rng, batch, seq):
    """Full, mid-length, empty, length-1 and length seq-1 rows first, random lengths after."""
    fixed = [seq, int(rng.integers(2, seq - 1)), 0, 1, seq - 1]
    return np.array((fixed + list(rng.integers(0, seq + 1, batch)))[:batch], np.int32)


def to_device(x, dtype=np.float32):
    """Cast on the host, then transfer: a device-side cast would compile one op per shape."""
    return jnp.asarray(np.asarray(x, dtype))


def make_inputs(rng, batch, seq, q_heads, kv_heads, head_dim, lengths, dtype):
    """Random q/k/v in `dtype` with NaN at padded positions, plus float64 copies of the same values."""
    pad = np.arange(seq)[None, :] >= lengths[:, None]
    arrays = []
    for heads in (q_heads, kv_heads, kv_heads):
        x = 2.0 * rng.standard_normal((batch, seq, heads, head_dim))  # x2: sharper softmax
        x[pad] = np.nan
        arrays.append(to_device(x, dtype))
    return arrays, [np.asarray(x, np.float64) for x in arrays]


def check(out, expected, lengths, tol, seed, what):
    out = np.asarray(out, np.float64)
    msg = f"seed={seed} {what}"
    assert np.isfinite(out).all(), f"non-finite output: {msg}"
    pad = np.arange(out.shape[1])[None, :] >= lengths[:, None]
    assert (out[pad] == 0).all(), f"padded query rows must be exactly 0: {msg}"
    np.testing.assert_allclose(out, expected, **tol, err_msg=msg)


def run_case(seed, *, batch, seq, q_heads, kv_heads, head_dim, causal=True, window=None,
             dtype=jnp.float32, scale=None, softcap=None):
    rng = np.random.default_rng(seed)
    lengths = row_lengths(rng, batch, seq)
    (q, k, v), (q64, k64, v64) = make_inputs(rng, batch, seq, q_heads, kv_heads, head_dim, lengths, dtype)
    out = flash(q, k, v, lengths=to_device(lengths, np.int32), causal=causal, sliding_window=window, scale=scale,
                softcap=softcap)
    assert out.dtype == dtype and out.shape == q.shape
    expected = naive_attention(q64, k64, v64, lengths, causal, window,
                               head_dim**-0.5 if scale is None else scale, softcap)
    tol = F32_TOL if dtype == jnp.float32 else LOW_TOL[dtype]
    what = f"lengths={lengths.tolist()} causal={causal} window={window} dtype={jnp.dtype(dtype).name}"
    check(out, expected, lengths, tol, seed, what)


# GQA ratios 1 / 4 / 8, each with two of the head dims 8 / 64 / 128 (each dim with two ratios).
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [
    (4, 4, 8), (4, 4, 128), (8, 2, 64), (8, 2, 128), (8, 1, 8), (8, 1, 64)])
def test_gqa_ratios_and_head_dims(seed, q_heads, kv_heads, head_dim):
    run_case(seed, batch=5, seq=16, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim)


# 40 > seq: the window never bites. Without causal the window only limits the look-back.
@pytest.mark.parametrize("causal,window", [
    (True, None), (True, 1), (True, 4), (True, 40), (False, None), (False, 4)])
def test_causal_and_sliding_window(seed, causal, window):
    run_case(seed, batch=6, seq=24, q_heads=4, kv_heads=2, head_dim=16, causal=causal, window=window)


@pytest.mark.parametrize("dtype,causal,window", [
    (jnp.bfloat16, True, None), (jnp.bfloat16, True, 5), (jnp.bfloat16, False, None),
    (jnp.float16, True, None)])
def test_low_precision_inputs(seed, dtype, causal, window):
    run_case(seed, batch=5, seq=20, q_heads=8, kv_heads=2, head_dim=64, causal=causal,
             window=window, dtype=dtype)


def test_long_sequence_with_window(seed):
    run_case(seed, batch=2, seq=256, q_heads=8, kv_heads=2, head_dim=128, window=100)


# Soft-caps that bite (std-2 inputs: |s| up to ~15 at head_dim 16), alone and with a window
# and a custom scale (Gemma 2's query_pre_attn_scalar); tanh is smooth, so the f32 tolerance holds.
@pytest.mark.parametrize("softcap,window,scale", [(1.0, None, None), (5.0, 4, None), (3.0, 6, 0.2)])
def test_softcap(seed, softcap, window, scale):
    run_case(seed, batch=5, seq=20, q_heads=4, kv_heads=2, head_dim=16, window=window, scale=scale,
             softcap=softcap)


def test_traced_window_equals_static(seed):
    """A traced int32 window (the layer scan's) masks as the static one; NO_WINDOW hides nothing."""
    rng = np.random.default_rng(seed)
    lengths = row_lengths(rng, 4, 24)
    (q, k, v), _ = make_inputs(rng, 4, 24, 4, 2, 16, lengths, jnp.float32)
    n = to_device(lengths, np.int32)
    traced = jax.jit(lambda w: flash_attention_reference(q, k, v, lengths=n, sliding_window=w))
    np.testing.assert_array_equal(np.asarray(traced(jnp.int32(5))), np.asarray(flash(q, k, v, lengths=n, sliding_window=5)))
    np.testing.assert_array_equal(np.asarray(traced(jnp.int32(NO_WINDOW))), np.asarray(flash(q, k, v, lengths=n)))


def test_custom_scale(seed):
    run_case(seed, batch=4, seq=12, q_heads=4, kv_heads=1, head_dim=8, scale=0.3)


@pytest.mark.parametrize("causal,window", [(True, 6), (False, None)])
def test_lengths_none_matches_oracle_and_jax(seed, causal, window):
    # lengths=None means full rows. jax.nn.dot_product_attention independently checks the GQA
    # head grouping and the window convention: HF window W is its local_window_size=(W - 1, 0).
    rng = np.random.default_rng(seed)
    q, k, v = (2.0 * rng.standard_normal((2, 20, h, 16)) for h in (8, 2, 2))
    ours = flash(to_device(q), to_device(k), to_device(v), causal=causal, sliding_window=window)
    expected = naive_attention(q, k, v, [20, 20], causal, window, 16**-0.5)
    np.testing.assert_allclose(ours, expected, **F32_TOL, err_msg=f"seed={seed}")
    theirs = jax_attention(to_device(q), to_device(k), to_device(v), is_causal=causal,
                           local_window_size=None if window is None else (window - 1, 0))
    np.testing.assert_allclose(ours, theirs, **F32_TOL, err_msg=f"seed={seed}")


def test_annotations_use_the_dims_vocabulary():
    # Every shape annotation in pallas_kernels (private helpers included) must use
    # jaxinfer/dims.py's dimension vocabulary.
    import pallas_kernels._common as common
    import pallas_kernels.flash_attention as fa
    import pallas_kernels.paged_attention as pa
    from jaxinfer import dims

    vocabulary = {getattr(dims, name) for name in dims.__all__ if name.isupper()}
    hints = [inspect.signature(f) for m in (common, fa, pa) for f in vars(m).values()
             if inspect.isfunction(f) and f.__module__ == m.__name__]
    types = [p.annotation for sig in hints for p in sig.parameters.values()]
    types += [sig.return_annotation for sig in hints]
    types += [arg for t in list(types) for arg in typing.get_args(t)]  # `X | None` members
    used = {d for t in types for d in getattr(t, "dim_str", "").split() if not d.startswith("*")}
    assert used and used <= vocabulary, sorted(used - vocabulary)


def _qkv(q_shape, kv_shape, v_shape=None):
    return to_device(np.zeros(q_shape)), to_device(np.zeros(kv_shape)), to_device(np.zeros(v_shape or kv_shape))


@pytest.mark.parametrize("shapes,lengths_shape,message", [
    (((2, 4, 4, 8), (2, 4, 2, 8)), (3,), "lengths must have shape"),
    (((4, 4, 8), (2, 4, 2, 8)), None, "q must be rank 4"),
    (((2, 4, 4, 8), (2, 4, 2, 16)), None, "head_dim mismatch"),
    (((2, 4, 4, 8), (2, 5, 2, 8)), None, r"agree on \[batch, seq\]"),
    (((2, 4, 4, 8), (2, 4, 2, 8), (2, 4, 1, 8)), None, "same shape"),
])
def test_rejects_malformed_shapes(shapes, lengths_shape, message):
    # Without runtime type checks the wrapper's ValueError is the guard; with them (this test
    # suite's default) jaxtyping may reject the call first with a TypeError, so accept both
    # from the public function and check the ValueError text on the validator itself.
    q, k, v = _qkv(*shapes)
    lengths = None if lengths_shape is None else to_device(np.zeros(lengths_shape), np.int32)
    with pytest.raises((ValueError, TypeError)):
        flash_attention_reference(q, k, v, lengths=lengths)
    with pytest.raises(ValueError, match=message):
        _check_shapes(q.shape, k.shape, v.shape, lengths_shape)


def test_rejects_bad_heads_window_and_lengths_dtype():
    q, k, v = _qkv((1, 4, 6, 8), (1, 4, 4, 8))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        flash_attention_reference(q, k, v)
    q, k, v = _qkv((1, 4, 4, 8), (1, 4, 2, 8))
    with pytest.raises(ValueError, match="sliding_window"):
        flash_attention_reference(q, k, v, sliding_window=0)
    with pytest.raises((ValueError, TypeError)):
        flash_attention_reference(q, k, v, lengths=to_device(np.zeros(1)))
