"""The Mosaic GPU weight-only quantized matmul kernel (pallas_kernels/quant_matmul.py), on CPU.

Checks, none needing a GPU:
  * GPU interpret mode (numerics): `quant_matmul(..., interpret=True)` against
    `quant_matmul_reference` (dequantize, float32 HIGHEST dot) on the same bf16/fp16 inputs.
  * CUDA sm_90 cross-lowering for the shapes the runtime uses (wgmma tile shapes, swizzles,
    register layouts): `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`.
  * the reference against `QuantizedWeight.matmul` (same weight semantics), input validation.

Inputs are fresh random draws each run (codes over the full 4/8-bit range, zero points nonzero
and random, scales in [0.005, 0.05]); every failure message carries the seed. Re-run a failure
with PALLAS_TEST_SEED=<seed>.

Tolerance: the kernel is exact up to float32 rounding: codes (0..255) and x are exact in
bf16/fp16, wgmma accumulates in f32, the f32 group scale is applied per K step, and zero points
are subtracted afterwards as (group sums of x) @ (scales * zeros). Each of these roundings is
<= 2^-24 relative to a partial sum bounded by B = |x| @ (scales * (codes + zeros)) (elementwise,
in float64), and there are at most a few hundred of them per output, so we assert
|kernel - reference| <= 2e-5 * B + 1e-6 elementwise.

JAX 0.10.2's GPU interpreter cannot run `wgmma` with `transpose_ref` operands (the kernel's
codes^T @ x^T); `interpreter_patch.py` beside this file teaches it that, test-only.
"""

import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interpreter_patch import patch_interpreter_wgmma_transpose
from jaxinfer.quant.weight import QuantizedWeight
from pallas_kernels.quant_matmul import (
    TuningConfig,
    check_quant_matmul_inputs,
    quant_matmul,
    quant_matmul_reference,
)

patch_interpreter_wgmma_transpose()

reference = jax.jit(quant_matmul_reference, static_argnames=("bits", "group_size"))


def reset_interpreter():
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

    reset_gpu_interpret_mode_state()


def run_interpreted(*args, **kwargs):
    """quant_matmul in interpret mode; resets the interpreter's global state if it fails (a
    failed simulated kernel can leave state that would hang or poison later tests)."""
    try:
        return jax.block_until_ready(quant_matmul(*args, interpret=kwargs.pop("interpret", True), **kwargs))
    except BaseException:
        reset_interpreter()
        raise


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("PALLAS_TEST_SEED") or secrets.randbits(32))


def make_inputs(rng, m, k, n, bits, group_size, dtype, with_zeros=True):
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rows = k // 2 if bits == 4 else k
    codes = rng.integers(0, 256, (rows, n)).astype(np.uint8)  # 4-bit: two random nibbles
    scales = rng.uniform(0.005, 0.05, (k // group_size, n)).astype(np.float32)
    zeros = rng.integers(0, 2**bits, (k // group_size, n)).astype(np.uint8) if with_zeros else None
    return x, codes, scales, zeros


def error_bound(x, codes, scales, zeros, bits, group_size):
    c = np.asarray(QuantizedWeight(jnp.asarray(codes), jnp.asarray(scales), bits=bits).unpacked_codes(),
                   np.float64)
    z = 0.0 if zeros is None else np.repeat(zeros.astype(np.float64), group_size, axis=0)
    s = np.repeat(scales.astype(np.float64), group_size, axis=0)
    return 2e-5 * (np.abs(np.asarray(x, np.float64)) @ (s * (c + z))) + 1e-6


def check(out, x, codes, scales, zeros, bits, group_size, msg):
    ref = np.asarray(reference(x, codes, scales, zeros, bits=bits, group_size=group_size))
    out = np.asarray(out)
    assert out.shape == ref.shape and out.dtype == np.float32, msg
    err = np.abs(out.astype(np.float64) - ref)
    bound = error_bound(x, codes, scales, zeros, bits, group_size)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (
        f"{msg}: max |err| {err.max():.3g}, worst at {worst}: err {err[worst]:.3g} > bound "
        f"{bound[worst]:.3g} (ref {ref[worst]:.4g}, kernel {out[worst]:.4g})")


# (bits, group_size, M, K, N, zero points, dtype, config); group_size None = per-channel (K).
# Each case is 2-8 interpreted K steps (~1-3 s with compilation).
CASES = [
    (8, 64, 1, 128, 64, True, jnp.bfloat16, None),
    (8, 64, 7, 128, 128, True, jnp.float16, None),
    (8, 128, 16, 256, 64, False, jnp.bfloat16, None),
    (8, None, 64, 192, 64, True, jnp.bfloat16, None),
    (8, 128, 7, 256, 64, True, jnp.bfloat16, TuningConfig(tile_k=128, num_buffers=1)),
    (8, 64, 7, 256, 64, True, jnp.bfloat16, TuningConfig(split_k=2, num_buffers=2)),
    (4, 128, 1, 256, 64, True, jnp.bfloat16, None),
    (4, 128, 7, 128, 128, False, jnp.float16, None),
    (4, 128, 16, 256, 64, True, jnp.bfloat16, None),
    (4, None, 64, 256, 64, True, jnp.bfloat16, None),
    (4, 256, 1, 512, 128, True, jnp.bfloat16, TuningConfig(tile_n=128, split_k=2)),
    (4, 128, 70, 128, 64, True, jnp.bfloat16, TuningConfig(tile_m=64)),  # two M tiles, padded
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bits,group_size,m,k,n,with_zeros,dtype,config", CASES)
def test_kernel_matches_reference(seed, bits, group_size, m, k, n, with_zeros, dtype, config):
    rng = np.random.default_rng(seed)
    g = k if group_size is None else group_size
    x, codes, scales, zeros = make_inputs(rng, m, k, n, bits, g, dtype, with_zeros)
    out = run_interpreted(x, codes, scales, zeros, bits=bits, group_size=g, config=config)
    check(out, x, codes, scales, zeros, bits, g,
          f"seed={seed} bits={bits} group={g} M={m} K={k} N={n} zeros={with_zeros} "
          f"dtype={jnp.dtype(dtype).name} config={config}")


@pytest.mark.timeout(120)
def test_kernel_under_jit_and_no_smem_races(seed):
    """Callable under jit; the interpreter's race detector sees the TMA writes, barrier waits
    and the code-tile staging through SMEM ordered (prefetching 2 steps ahead)."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    rng = np.random.default_rng(seed)
    x, codes, scales, zeros = make_inputs(rng, 3, 512, 64, 4, 128, jnp.bfloat16)
    f = jax.jit(lambda *a: run_interpreted(*a, bits=4, group_size=128,
                                           interpret=InterpretGPUParams(detect_races=True)))
    out = f(x, codes, scales, zeros)
    assert not get_races().races_found, f"seed={seed}: SMEM races"
    check(out, x, codes, scales, zeros, 4, 128, f"seed={seed} (race-detection run)")


# --- reference semantics --------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_reference_matches_quantized_weight(seed, bits, act_order):
    rng = np.random.default_rng(seed)
    k, n, g = 256, 96, 64
    x, codes, scales, zeros = make_inputs(rng, 5, k, n, bits, g, jnp.bfloat16)
    g_idx = jnp.asarray(rng.permutation(np.arange(k) // g), jnp.int32) if act_order else None
    qw = QuantizedWeight(jnp.asarray(codes), jnp.asarray(scales), jnp.asarray(zeros), g_idx,
                         bits=bits, group_size=g)
    want = np.asarray(qw.matmul(x))
    got = np.asarray(quant_matmul_reference(x, codes, scales, zeros, bits=bits, group_size=g, g_idx=g_idx))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"seed={seed}")


def test_act_order_via_permuted_activations(seed):
    """The workaround named in the g_idx error: x[:, perm] @ W[perm] with contiguous groups."""
    rng = np.random.default_rng(seed)
    k, n, g = 256, 64, 64
    x, codes, scales, zeros = make_inputs(rng, 3, k, n, 8, g, jnp.bfloat16)
    g_idx = rng.permutation(np.arange(k) // g).astype(np.int32)
    perm = np.argsort(g_idx, kind="stable")
    want = quant_matmul_reference(x, codes, scales, zeros, bits=8, group_size=g, g_idx=jnp.asarray(g_idx))
    got = quant_matmul_reference(x[:, perm], codes[perm], scales, zeros, bits=8, group_size=g)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4, err_msg=f"seed={seed}")


# --- validation -----------------------------------------------------------------------------

def _sds(m=4, k=256, n=128, bits=4, g=128, dtype=jnp.bfloat16, zeros=True):
    return (jax.ShapeDtypeStruct((m, k), dtype),
            jax.ShapeDtypeStruct((k // 2 if bits == 4 else k, n), jnp.uint8),
            jax.ShapeDtypeStruct((k // g, n), jnp.float32),
            jax.ShapeDtypeStruct((k // g, n), jnp.uint8) if zeros else None)


@pytest.mark.parametrize("kwargs,args,match", [
    (dict(bits=4, group_size=128), _sds(dtype=jnp.float32), "bfloat16 or float16"),
    (dict(bits=3, group_size=128), _sds(), "bits must be"),
    (dict(bits=8, group_size=128), _sds(), "hold K=128 rows"),
    (dict(bits=4, group_size=100), _sds(), "positive divisor"),
    (dict(bits=4, group_size=64), _sds(g=64), "multiple of 128"),
    (dict(bits=8, group_size=32), _sds(bits=8, g=32), "multiple of 64"),
    (dict(bits=4, group_size=128), _sds(n=96), "multiple of TuningConfig.tile_n"),
    (dict(bits=4, group_size=128, config=TuningConfig(split_k=3)), _sds(), "split_k=3 must divide"),
    (dict(bits=4, group_size=128, config=dict(tile_n=64)), _sds(), "TuningConfig or None"),
])
def test_invalid_inputs(kwargs, args, match):
    with pytest.raises(ValueError, match=match):
        check_quant_matmul_inputs(*args, **kwargs)


def test_invalid_scales_zeros_and_config():
    x, c, s, z = _sds()
    with pytest.raises(ValueError, match="scales must have shape"):
        check_quant_matmul_inputs(x, c, jax.ShapeDtypeStruct((3, 128), jnp.float32), z, bits=4, group_size=128)
    with pytest.raises(ValueError, match="zeros must be uint8"):
        check_quant_matmul_inputs(x, c, s, jax.ShapeDtypeStruct(z.shape, jnp.int32), bits=4, group_size=128)
    with pytest.raises(ValueError, match="codes must be uint8"):
        check_quant_matmul_inputs(x, jax.ShapeDtypeStruct(c.shape, jnp.int8), s, z, bits=4, group_size=128)
    with pytest.raises(ValueError, match="tile_n"):
        TuningConfig(tile_n=32)
    with pytest.raises(ValueError, match="tile_m"):
        TuningConfig(tile_m=100)


def test_g_idx_not_implemented():
    x, c, s, z = _sds()
    with pytest.raises(NotImplementedError, match="act-order.*permutation"):
        quant_matmul(x, c, s, z, bits=4, group_size=128, g_idx=jnp.zeros((256,), jnp.int32))


def test_config_is_hashable_and_frozen():
    cfg = TuningConfig()
    hash(cfg)
    with pytest.raises(dataclasses_frozen_error()):
        cfg.tile_n = 128  # type: ignore[misc]


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


# --- CUDA sm_90 cross-lowering (the runtime's shapes) ---------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("m", [1, 16, 64, 300])
@pytest.mark.parametrize("bits,group_size,k,n,dtype", [
    (4, 128, 4096, 4096, jnp.bfloat16),   # GPTQ / AWQ int4 g128
    (8, None, 4096, 4096, jnp.bfloat16),  # bitsandbytes-style int8 per-channel
    (4, 128, 4096, 11008, jnp.float16),   # an MLP up-projection, fp16 activations
])
def test_lowers_for_cuda_sm90(m, bits, group_size, k, n, dtype):
    g = k if group_size is None else group_size
    args = _sds(m=m, k=k, n=n, bits=bits, g=g, dtype=dtype)
    f = jax.jit(lambda *a: quant_matmul(*a, bits=bits, group_size=g))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("config", [
    TuningConfig(tile_n=128, tile_m=256, num_buffers=2),
    TuningConfig(tile_k=128, split_k=1, num_buffers=4),
])
def test_lowers_for_cuda_sm90_configs(config):
    args = _sds(m=512, k=4096, n=4096, bits=8, g=4096, zeros=False)
    f = jax.jit(lambda *a: quant_matmul(*a, bits=8, group_size=4096, config=config))
    assert "mosaic_gpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
