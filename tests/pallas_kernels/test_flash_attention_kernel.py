"""The Mosaic GPU flash-attention kernel, run by the GPU interpreter on CPU, vs the jnp reference.

Interpret mode executes the same kernel body as the GPU except two trace-time switches in the
kernel (register layout casts, which the 0.10.2 interpreter has no rule for and which do not
change values, and K^T staged through SMEM instead of a transpose_ref wgmma operand). The real
sm_90 lowering of the GPU path is checked by CUDA cross-lowering at the end of this file.

Inputs are fresh random draws each run; every failure message carries the seed. Re-run a
failure with PALLAS_TEST_SEED=<seed>. Padded positions of q, k and v are NaN, so every numeric
test also checks that padding never leaks into the output.

Tolerances (kernel output in bf16/f16 vs the reference evaluated in float32 on the very same
rounded inputs): the kernel, like every FlashAttention, rounds the probabilities P (in [0, 1])
to the input dtype before the P V wgmma, an absolute error <= u * 1 per probability (u = unit
roundoff: 2^-9 bf16, 2^-12 f16), hence <= u * max|v| on an output (a convex combination of
the v rows; |v| <= ~6 for these normal draws); the final cast to the output dtype adds <= half
an ulp (relative 2^-8 bf16, 2^-11 f16). Everything else (f32 scores, exp2 vs exp, summation
order) is ~1e-6. So atol = 2 * u * max|v| and rtol = 2 * half-ulp: 2x margin over the bound
(observed worst cases: 0.22-0.26 of it), while a wrong mask or a lost rescale gives errors O(0.1).
"""

import dataclasses
import os
import secrets
import time

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

from pallas_kernels import NO_WINDOW
from pallas_kernels.flash_attention import (
    TuningConfig,
    _check_kernel_inputs,
    flash_attention,
    flash_attention_reference,
)

reference = jax.jit(flash_attention_reference, static_argnames=("causal", "sliding_window", "scale", "softcap"))

UNIT_ROUNDOFF = {jnp.bfloat16: 2.0**-9, jnp.float16: 2.0**-12}
HALF_ULP = {jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11}


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("PALLAS_TEST_SEED") or secrets.randbits(32))


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """A kernel that raised can leave interpreter state (and waiting warpgroups) behind."""
    yield
    reset_gpu_interpret_mode_state()


def run_kernel(*args, **kwargs):
    try:
        return jax.block_until_ready(flash_attention(*args, interpret=True, **kwargs))
    except Exception:
        reset_gpu_interpret_mode_state()
        raise


def row_lengths(rng, batch, seq):
    """Empty, length-1, partial (not a tile multiple) and full rows first, random after."""
    fixed = [0, 1, int(rng.integers(2, seq - 1)), seq]
    return np.array((fixed + list(rng.integers(0, seq + 1, batch)))[:batch], np.int32)


def make_inputs(rng, batch, seq, q_heads, kv_heads, head_dim, lengths, dtype):
    """Random q/k/v (std 1.5: a sharper softmax) in `dtype`, NaN at every padded position."""
    pad = np.arange(seq)[None, :] >= lengths[:, None]
    out = []
    for heads in (q_heads, kv_heads, kv_heads):
        x = 1.5 * rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
        x[pad] = np.nan
        out.append(jnp.asarray(x).astype(dtype))
    return out


def check_against_reference(seed, *, batch, seq, q_heads, kv_heads, head_dim, dtype,
                            causal=True, lengths="mixed", config=None, window=None, traced_window=False,
                            softcap=None):
    """`window` (an int) goes to the kernel as a Python int, or with `traced_window` as an int32
    array (the layer-scan case: one program for every window); the reference takes the int."""
    rng = np.random.default_rng(seed)
    lens = row_lengths(rng, batch, seq) if lengths == "mixed" else None
    q, k, v = make_inputs(rng, batch, seq, q_heads, kv_heads, head_dim,
                          np.full(batch, seq) if lens is None else lens, dtype)
    lengths_arr = None if lens is None else jnp.asarray(lens)
    t0 = time.perf_counter()
    kernel_window = jnp.int32(window) if traced_window and window is not None else window
    out = run_kernel(q, k, v, lengths=lengths_arr, causal=causal, config=config, sliding_window=kernel_window,
                     softcap=softcap)
    elapsed = time.perf_counter() - t0
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    expected = np.asarray(reference(*f32, lengths=lengths_arr, causal=causal, sliding_window=window,
                                    softcap=softcap))
    what = (f"seed={seed} (PALLAS_TEST_SEED) batch={batch} seq={seq} heads={q_heads}/{kv_heads} "
            f"head_dim={head_dim} {jnp.dtype(dtype).name} causal={causal} lengths={lens} {config} "
            f"window={window} traced={traced_window} softcap={softcap}")
    assert out.shape == q.shape and out.dtype == q.dtype, what
    got = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(got).all(), f"non-finite output (padding leaked?): {what}"
    if lens is not None:  # padded query rows are exactly 0
        pad = np.arange(seq)[None, :] >= lens[:, None]
        assert (got[pad] == 0).all(), f"padded query rows are not 0: {what}"
    max_v = float(np.nanmax(np.abs(np.asarray(v.astype(jnp.float32)))))
    atol = 2 * UNIT_ROUNDOFF[dtype] * max_v
    rtol = 2 * HALF_ULP[dtype]
    err = np.abs(got - expected)
    worst = np.unravel_index(np.argmax(err - rtol * np.abs(expected)), err.shape)
    np.testing.assert_allclose(
        got, expected, rtol=rtol, atol=atol,
        err_msg=f"{what}; worst at {worst}: got {got[worst]} want {expected[worst]}")
    return elapsed


# (dtype, head_dim, q_heads, kv_heads): GQA ratios 1/4/8, head_dim 64/128, bf16 and f16.
NUMERIC_CASES = [
    (jnp.bfloat16, 64, 2, 2),
    (jnp.bfloat16, 128, 4, 1),
    (jnp.bfloat16, 64, 8, 1),
    (jnp.float16, 128, 2, 2),
    (jnp.float16, 64, 4, 1),
    (jnp.float16, 128, 8, 1),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype,head_dim,q_heads,kv_heads", NUMERIC_CASES,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_causal_with_lengths_matches_reference(seed, dtype, head_dim, q_heads, kv_heads):
    # seq 128 = 2 query tiles x 2 key tiles; rows of length 0, 1, partial and full.
    check_against_reference(seed, batch=4, seq=128, q_heads=q_heads, kv_heads=kv_heads,
                            head_dim=head_dim, dtype=dtype)


@pytest.mark.timeout(120)
def test_non_causal_with_lengths(seed):
    check_against_reference(seed, batch=4, seq=128, q_heads=4, kv_heads=2, head_dim=64,
                            dtype=jnp.bfloat16, causal=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("causal", [True, False])
def test_lengths_none_means_full_rows(seed, causal):
    check_against_reference(seed, batch=1, seq=128, q_heads=2, kv_heads=1, head_dim=128,
                            dtype=jnp.bfloat16, causal=causal, lengths=None)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seq", [16, 96])
def test_seq_not_a_tile_multiple_is_padded(seed, seq):
    # Prompt buckets 16/32 are smaller than a tile; 96 pads to 128 (two tiles, one half real).
    check_against_reference(seed, batch=4, seq=seq, q_heads=4, kv_heads=1, head_dim=64,
                            dtype=jnp.bfloat16)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("config", [
    TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2),
    TuningConfig(block_q=128, block_kv=64, max_concurrent_steps=3),
    TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=1),
], ids=str)
def test_tuning_configs(seed, config):
    # seq 256: 4 key tiles of 64, so the 3-slot ring wraps and the 1-slot ring serialises.
    check_against_reference(seed, batch=2, seq=256, q_heads=2, kv_heads=1, head_dim=64,
                            dtype=jnp.float16, config=config)


# Sliding windows (Mistral, Gemma's local layers) and logit soft-capping (Gemma 2). Windows
# shorter than, equal to and longer than a 64-key tile, so whole tiles below the window are
# skipped, tiles straddle its lower edge and the diagonal tile is masked by both; traced windows
# are the layer-scan case. Soft-caps of 2 and 5 bite on these scores (|q.k| * scale ~ 2-9). The
# tolerances are the ones above: the cap is applied to f32 scores (tanh through exp2, accurate
# to ~1e-7 relative), so only the P and output roundings remain.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("window, traced, config", [
    (1, False, None),                       # a query sees only itself
    (40, False, None),                      # < block_kv: tiles skipped, every row's edge in one tile
    (64, True, TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=3)),  # = a tile, ring of 3
    (100, True, TuningConfig(block_q=128, block_kv=64, max_concurrent_steps=2)),  # edge over 2 tiles
    (300, True, None),                      # longer than the sequence: no effect
], ids=str)
def test_sliding_window_matches_reference(seed, window, traced, config):
    # batch 4: rows of length 0, 1, partial and full (so every window bites on some row).
    check_against_reference(seed, batch=4, seq=256, q_heads=2, kv_heads=1, head_dim=64,
                            dtype=jnp.bfloat16, window=window, traced_window=traced, config=config)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("softcap, window, dtype, head_dim, q_heads, kv_heads", [
    (2.0, None, jnp.bfloat16, 64, 2, 2),
    (5.0, None, jnp.float16, 128, 4, 1),
    (2.0, 48, jnp.bfloat16, 128, 4, 2),     # Gemma 2's local layers: window and cap together
], ids=str)
def test_softcap_matches_reference(seed, softcap, window, dtype, head_dim, q_heads, kv_heads):
    check_against_reference(seed, batch=4, seq=128, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                            dtype=dtype, softcap=softcap, window=window, traced_window=True)


@pytest.mark.timeout(120)
def test_window_off_paths_agree(seed):
    """No window, and the traced NO_WINDOW a global layer gets inside the layer scan, give the
    same output bit for bit (the same tiles, masks that hide nothing extra)."""
    rng = np.random.default_rng(seed)
    lens = row_lengths(rng, 2, 128)
    q, k, v = make_inputs(rng, 2, 128, 2, 1, 64, lens, jnp.bfloat16)
    plain = run_kernel(q, k, v, lengths=jnp.asarray(lens))
    traced = run_kernel(q, k, v, lengths=jnp.asarray(lens), sliding_window=jnp.int32(NO_WINDOW))
    np.testing.assert_array_equal(np.asarray(plain.astype(jnp.float32)), np.asarray(traced.astype(jnp.float32)),
                                  err_msg=f"seed={seed} lengths={lens}")


@pytest.mark.timeout(120)
def test_return_lse(seed):
    rng = np.random.default_rng(seed)
    batch, seq, q_heads, kv_heads, head_dim = 4, 128, 2, 1, 64
    lens = row_lengths(rng, batch, seq)
    q, k, v = make_inputs(rng, batch, seq, q_heads, kv_heads, head_dim, lens, jnp.bfloat16)
    out, lse = run_kernel(q, k, v, lengths=jnp.asarray(lens), return_lse=True)
    assert lse.shape == (batch, q_heads, seq) and lse.dtype == jnp.float32
    # float64 oracle on the same rounded values; only real (i < length) rows have an LSE.
    q64, k64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k))
    k64 = np.repeat(k64, q_heads // kv_heads, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", np.nan_to_num(q64), np.nan_to_num(k64)) * head_dim**-0.5
    pos = np.arange(seq)
    visible = (pos[None, :] <= pos[:, None])[None, None] & (pos[None, None, None, :] < lens[:, None, None, None])
    s = np.where(visible, s, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = s.max(-1)
        want = m + np.log(np.exp(s - m[..., None]).sum(-1))
    real = (pos[None, :] < lens[:, None])[:, None, :].repeat(q_heads, 1)
    got = np.asarray(lse)
    what = f"seed={seed} (PALLAS_TEST_SEED) lengths={lens}"
    assert (got[~real] == -np.inf).all(), what
    # f32 scores of O(10): ~1e-5 absolute error; 1e-4 leaves margin.
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-4, err_msg=what)
    ref = reference(*[x.astype(jnp.float32) for x in (q, k, v)], lengths=jnp.asarray(lens))
    max_v = float(np.nanmax(np.abs(np.asarray(v.astype(jnp.float32)))))
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.asarray(ref),  # as above
                               rtol=2 * HALF_ULP[jnp.bfloat16],
                               atol=2 * UNIT_ROUNDOFF[jnp.bfloat16] * max_v, err_msg=what)


@pytest.mark.timeout(120)
def test_no_smem_races(seed):
    # The interpreter's race detector flags SMEM read before its TMA barrier completed, or a
    # TMA overwriting a slot a wgmma still reads (the K/V ring reuse and P staging).
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    rng = np.random.default_rng(seed)
    lens = np.array([int(rng.integers(129, 256))], np.int32)
    q, k, v = make_inputs(rng, 1, 256, 1, 1, 64, lens, jnp.bfloat16)
    try:
        out = jax.block_until_ready(flash_attention(
            q, k, v, lengths=jnp.asarray(lens), interpret=InterpretGPUParams(detect_races=True)))
    except Exception:
        reset_gpu_interpret_mode_state()
        raise
    assert np.isfinite(np.asarray(out.astype(jnp.float32))).all(), f"seed={seed}"
    assert not get_races().races_found, f"SMEM race detected (seed={seed}, lengths={lens})"


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad, match", [
    (dict(head_dim=96), "head_dim in"),
    (dict(dtype=jnp.float32), "bfloat16 and float16"),
    (dict(kv_heads=3), "multiple of kv_heads"),
    (dict(lengths_shape=(3,)), "lengths must have shape"),
    (dict(lengths_dtype=jnp.float32), "integer"),
    (dict(config="64"), "TuningConfig"),
    (dict(config=TuningConfig(block_q=128, block_kv=256, max_concurrent_steps=3)), "SMEM"),
])
def test_validation_errors(bad, match):
    head_dim = bad.get("head_dim", 64)
    dtype = bad.get("dtype", jnp.bfloat16)
    q = jnp.zeros((2, 64, 4, head_dim), dtype)
    kv = jnp.zeros((2, 64, bad.get("kv_heads", 2), head_dim), dtype)
    lengths = jnp.zeros(bad.get("lengths_shape", (2,)), bad.get("lengths_dtype", jnp.int32))
    config = bad.get("config", TuningConfig())
    # Under this suite's runtime type checks (--jaxtyping-packages) the annotations reject some
    # inputs (wrong lengths shape/dtype, a non-TuningConfig) before the body runs; without them
    # (the runtime) the explicit checks raise the ValueErrors matched below.
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)):
        flash_attention(q, kv, kv, lengths=lengths, config=config, interpret=True)
    with pytest.raises(ValueError, match=match):
        _check_kernel_inputs(q, kv, kv, lengths, config, False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field, value", [("block_q", 32), ("block_kv", 100), ("max_concurrent_steps", 0)])
def test_tuning_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        TuningConfig(**{field: value})
    with pytest.raises(dataclasses.FrozenInstanceError):
        TuningConfig().block_q = 128


# ----------------------------------------------------------------------------------------------
# CUDA sm_90 cross-lowering: the real Mosaic GPU lowering (layout inference, wgmma shape and
# swizzle rules, SMEM budget) of every configuration the runtime uses, on a CPU machine.

@pytest.mark.timeout(60)
@pytest.mark.parametrize("seq", [128, 512])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("q_heads,kv_heads", [(8, 8), (8, 2), (8, 1)], ids=["gqa1", "gqa4", "gqa8"])
def test_cuda_lowering(seq, head_dim, q_heads, kv_heads):
    lower_for_cuda(_sds((2, seq, q_heads, head_dim)), _sds((2, seq, kv_heads, head_dim)))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra", [
    dict(return_lse=True),
    dict(causal=False),
    dict(dtype=jnp.float16),
    dict(seq=16),
    dict(config=TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)),
    dict(config=TuningConfig(block_q=128, block_kv=64, max_concurrent_steps=3)),
    dict(sliding_window=100),
    dict(softcap=50.0),
    dict(sliding_window=4096, softcap=50.0, config=TuningConfig(block_q=128, block_kv=64, max_concurrent_steps=3)),
], ids=str)
def test_cuda_lowering_variants(extra):
    extra = dict(extra)
    dtype, seq = extra.pop("dtype", jnp.bfloat16), extra.pop("seq", 256)
    lower_for_cuda(_sds((2, seq, 8, 128), dtype), _sds((2, seq, 2, 128), dtype), **extra)


@pytest.mark.timeout(60)
def test_cuda_lowering_traced_window():
    """The layer-scan case: the window is a traced int32 (one program for local and global)."""
    def f(q, k, v, lengths, window):
        return flash_attention(q, k, v, lengths=lengths, sliding_window=window, softcap=30.0)
    q, kv = _sds((2, 256, 8, 128)), _sds((2, 256, 2, 128))
    lowered = jax.jit(f).trace(q, kv, kv, _sds((2,), jnp.int32), _sds((), jnp.int32)).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def lower_for_cuda(q, kv, **kwargs):
    def f(q, k, v, lengths):
        return flash_attention(q, k, v, lengths=lengths, **kwargs)
    lowered = jax.jit(f).trace(q, kv, kv, _sds(q.shape[:1], jnp.int32)).lower(
        lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "mosaic_gpu" in text, "no Mosaic GPU custom call in the lowered module"
