"""The Mosaic GPU paged-attention decode kernel, on CPU.

Two checks per configuration, neither needing a GPU:
  * GPU interpret mode (numerics): `paged_attention(..., interpret=True)` against
    `paged_attention_reference` run in float32 on the same (bf16/fp16-rounded) inputs.
  * CUDA sm_90 cross-lowering (hardware constraints the interpreter ignores: wgmma tile
    shapes, swizzles, layouts): `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`.

Inputs are fresh random draws each run; every failure message carries the seed. Re-run a
failure with PALLAS_TEST_SEED=<seed>. Every page a slot does not own (the null page 0
included) and every position past a slot's length is NaN, page tables are random
permutations of the pool, and table entries past a slot's length point at random pages, so
each test also checks that nothing unowned leaks into the output.

Tolerances (kernel output in q's dtype vs the float32 reference on the same rounded inputs):
scores, softmax and both matmul accumulations are float32, but P is rounded to the input
dtype before the P @ V wgmma (unit roundoff u = 2^-9 bf16, 2^-11 fp16), which perturbs an
output by at most u * sum_t p_t |v_t| <= u * max|v| (~u * 4.5 with std-1 values), and the
result is rounded to the input dtype (<= u relative). Hence atol ~ 4.5u (+ margin) and
rtol 2u: bf16 atol 1e-2 / rtol 2^-8, fp16 atol 2.5e-3 / rtol 2^-10.

JAX 0.10.2's GPU interpreter cannot run `wgmma` with a `transpose_ref` operand (the kernel's
S = Q @ K^T); `interpreter_patch.py` beside this file teaches it that, test-only.
"""

import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interpreter_patch import patch_interpreter_wgmma_transpose
from pallas_kernels.paged_attention import (
    TuningConfig,
    check_paged_attention_kernel_inputs,
    paged_attention,
    paged_attention_reference,
)

TOL = {jnp.bfloat16: dict(rtol=2**-8, atol=1e-2), jnp.float16: dict(rtol=2**-10, atol=2.5e-3)}

reference = jax.jit(paged_attention_reference, static_argnames=("sliding_window", "scale", "softcap"))


patch_interpreter_wgmma_transpose()


def reset_interpreter():
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

    reset_gpu_interpret_mode_state()


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("PALLAS_TEST_SEED") or secrets.randbits(32))


def build_pool(rng, lengths, page_size, pages_per_seq, kv_heads, head_dim, spare_pages=3):
    """A NaN pool (null page 0 and spares included) whose slot-owned positions hold std-1 K/V.

    Each slot gets distinct pages in random pool order; table entries past its length point
    at random pages (null, spare, or another slot's). Returns float32 k, v and int32 table.
    """
    needed = [-(-int(n) // page_size) for n in lengths]
    num_pages = 1 + sum(needed) + spare_pages
    shape = (num_pages, page_size, kv_heads, head_dim)
    k, v = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    table = rng.integers(0, num_pages, (len(lengths), pages_per_seq)).astype(np.int32)
    free = iter(rng.permutation(np.arange(1, num_pages)))
    for s, n in enumerate(lengths):
        table[s, : needed[s]] = [next(free) for _ in range(needed[s])]
        t = np.arange(n)
        k[table[s, t // page_size], t % page_size] = 1.5 * rng.standard_normal((n, kv_heads, head_dim))
        v[table[s, t // page_size], t % page_size] = rng.standard_normal((n, kv_heads, head_dim))
    return k, v, table


def run_kernel(*args, **kwargs):
    try:
        return jax.block_until_ready(paged_attention(*args, interpret=True, **kwargs))
    except BaseException:
        reset_interpreter()  # a failed interpreted kernel leaves the simulated GPU dirty
        raise


def run_case(seed, lengths, *, page_size, pages_per_seq, q_heads, kv_heads, head_dim,
             dtype=jnp.bfloat16, config=None, scale=None, window=None, traced_window=False, softcap=None):
    """`window` (an int) reaches the kernel as a Python int or, with `traced_window`, as an
    int32 array (the layer-scan case); the reference takes the int."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    k, v, table = build_pool(rng, lengths, page_size, pages_per_seq, kv_heads, head_dim)
    q = jnp.asarray(1.5 * rng.standard_normal((len(lengths), q_heads, head_dim)), dtype)
    k, v = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
    table_d, lengths_d = jnp.asarray(table), jnp.asarray(lengths)
    kernel_window = jnp.int32(window) if traced_window and window is not None else window
    out = run_kernel(q, k, v, table_d, lengths_d, config=config, scale=scale, sliding_window=kernel_window,
                     softcap=softcap)
    expected = reference(*(x.astype(jnp.float32) for x in (q, k, v)), table_d, lengths_d, scale=scale,
                         sliding_window=window, softcap=softcap)
    msg = (f"seed={seed} lengths={lengths.tolist()} page_size={page_size} q_heads={q_heads} "
           f"kv_heads={kv_heads} head_dim={head_dim} dtype={jnp.dtype(dtype).name} config={config} "
           f"window={window} traced={traced_window} softcap={softcap}")
    assert out.dtype == dtype and out.shape == q.shape, msg
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), f"non-finite output: {msg}"
    assert (out[lengths == 0] == 0).all(), f"length-0 slots must be exactly 0: {msg}"
    np.testing.assert_allclose(out, np.asarray(expected), **TOL[dtype], err_msg=msg)


def boundary_lengths(page_size):
    """1, page boundary -1/0/+1 (the second page), a non-multiple past a 64-token block, 0."""
    return [1, 2 * page_size - 1, 2 * page_size, 2 * page_size + 1, 64 + page_size // 2 + 3, 0]


# --- interpret mode: numerics ----------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])  # GQA ratio q_heads // kv_heads
@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_page_size_gqa_head_dim_sweep(seed, page_size, group, head_dim):
    run_case(seed, boundary_lengths(page_size), page_size=page_size, pages_per_seq=160 // page_size + 1,
             q_heads=2 * group, kv_heads=2, head_dim=head_dim, config=TuningConfig(num_splits=1))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("config", [
    TuningConfig(num_splits=1, num_buffers=1),
    TuningConfig(num_splits=1, num_buffers=3),
    TuningConfig(num_splits=3),                  # uneven: 10 blocks over 3 splits
    TuningConfig(block_kv=128, num_splits=4),    # 5 blocks over 4 splits: one split is empty
    None,                                         # default: heuristic splits, 2 buffers
])
def test_many_pages_splits_and_buffers(seed, config):
    rng = np.random.default_rng(seed)
    lengths = [640, int(rng.integers(300, 640)), 16 * int(rng.integers(1, 40)) + 1, 0]
    run_case(seed, lengths, page_size=16, pages_per_seq=40, q_heads=4, kv_heads=1, head_dim=128,
             config=config)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_random_lengths_and_dtypes(seed, dtype):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 32 * 6 + 1, 5)
    run_case(seed, lengths, page_size=32, pages_per_seq=6, q_heads=8, kv_heads=2, head_dim=64,
             dtype=dtype, config=TuningConfig(num_splits=2), scale=0.1)


# Sliding windows and logit soft-capping. The window's lower edge falls inside a page, on a
# page boundary and inside a later 64-token block, so blocks below it are skipped (with splits:
# the splits share only the visible blocks) and the V rows below the edge are zeroed (the pool
# is NaN everywhere a slot does not own, but positions below the window are owned and finite:
# a wrong mask shows as a wrong value, not a NaN). Soft-caps of 2 and 5 bite on these scores
# (|q.k| * scale ~ 2-9). Tolerances as above: the cap acts on f32 scores (tanh through exp2,
# ~1e-7 relative), so only the P and output roundings remain.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("window, traced, config", [
    (1, False, TuningConfig(num_splits=1)),       # a query sees only itself
    (16, True, TuningConfig(num_splits=1)),       # edge on a page boundary for some lengths
    (37, True, TuningConfig(num_splits=2)),       # edge inside a page; two splits of the visible blocks
    (100, True, TuningConfig(num_splits=3, num_buffers=3)),  # edge in a later block, uneven splits
    (1000, False, None),                          # longer than every slot: no effect
], ids=str)
def test_sliding_window_matches_reference(seed, window, traced, config):
    rng = np.random.default_rng(seed)
    lengths = [1, 17, 64, 65, 200, int(rng.integers(2, 256)), 0]
    run_case(seed, lengths, page_size=16, pages_per_seq=16, q_heads=4, kv_heads=2, head_dim=64,
             config=config, window=window, traced_window=traced)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("softcap, window, dtype, head_dim, group", [
    (2.0, None, jnp.bfloat16, 64, 1),
    (5.0, None, jnp.float16, 128, 4),
    (2.0, 50, jnp.bfloat16, 128, 8),   # Gemma 2's local layers: window and cap together
], ids=str)
def test_softcap_matches_reference(seed, softcap, window, dtype, head_dim, group):
    rng = np.random.default_rng(seed)
    lengths = [1, 33, 130, int(rng.integers(2, 192)), 0]
    run_case(seed, lengths, page_size=32, pages_per_seq=6, q_heads=2 * group, kv_heads=2, head_dim=head_dim,
             dtype=dtype, config=TuningConfig(num_splits=2), window=window, traced_window=True, softcap=softcap)


@pytest.mark.timeout(120)
def test_all_slots_inactive_and_under_outer_jit(seed):
    rng = np.random.default_rng(seed)
    lengths = np.zeros(3, np.int32)
    k, v, table = build_pool(rng, lengths, 16, 4, 2, 64)
    q = jnp.asarray(rng.standard_normal((3, 8, 64)), jnp.bfloat16)
    k, v = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    f = jax.jit(lambda *a: paged_attention(*a, interpret=True))
    try:
        out = f(q, k, v, jnp.asarray(table), jnp.asarray(lengths))
    except BaseException:
        reset_interpreter()
        raise
    assert (np.asarray(out, np.float32) == 0).all(), f"seed={seed}"


# --- validation --------------------------------------------------------------------------------

def _shapes(slots=2, q_heads=8, kv_heads=2, head_dim=64, pages=8, page_size=16, pages_per_seq=4,
            dtype=jnp.bfloat16, table_dtype=jnp.int32):
    s = jax.ShapeDtypeStruct
    return (s((slots, q_heads, head_dim), dtype), s((pages, page_size, kv_heads, head_dim), dtype),
            s((pages, page_size, kv_heads, head_dim), dtype), s((slots, pages_per_seq), table_dtype),
            s((slots,), jnp.int32))


@pytest.mark.parametrize("kwargs,match", [
    (dict(head_dim=96), "head_dim"),
    (dict(head_dim=256), "head_dim"),
    (dict(page_size=8), "page_size"),
    (dict(page_size=128), "page_size"),
    (dict(dtype=jnp.float32), "bfloat16 or all float16"),
    (dict(table_dtype=jnp.float32), "page_table"),
    (dict(q_heads=6, kv_heads=4), "multiple of kv_heads"),
    (dict(q_heads=128, kv_heads=1), "q_heads // kv_heads"),
])
def test_rejects_unsupported_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_paged_attention_kernel_inputs(*_shapes(**kwargs))


def test_rejects_bad_window_softcap_and_configs():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="sliding_window"):
            check_paged_attention_kernel_inputs(*_shapes(), sliding_window=bad)
    with pytest.raises(ValueError, match="sliding_window"):
        check_paged_attention_kernel_inputs(*_shapes(), sliding_window=jnp.zeros((2,), jnp.int32))
    for bad in (0.0, -1.0, True):
        with pytest.raises(ValueError, match="softcap"):
            check_paged_attention_kernel_inputs(*_shapes(), softcap=bad)
    for bad in (dict(block_kv=96), dict(block_kv=0), dict(num_splits=0), dict(num_buffers=0)):
        with pytest.raises(ValueError, match="TuningConfig"):
            TuningConfig(**bad)
    with pytest.raises(ValueError, match="config"):
        check_paged_attention_kernel_inputs(*_shapes(), config={"block_kv": 64})
    with pytest.raises(ValueError, match="shared memory"):  # 3 x 2 x 256 x 128 x 2 B of K/V
        check_paged_attention_kernel_inputs(*_shapes(head_dim=128), config=TuningConfig(block_kv=256, num_buffers=3))


# --- CUDA sm_90 cross-lowering (the configurations the runtime would use) -----------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("config", [None, TuningConfig(num_splits=1), TuningConfig(block_kv=128, num_buffers=2)])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_lowers_for_cuda_sm90(head_dim, group, config):
    args = _shapes(slots=8, q_heads=4 * group, kv_heads=4, head_dim=head_dim, pages=257, page_size=16,
                   pages_per_seq=32)
    f = jax.jit(lambda *a: paged_attention(*a, config=config))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("traced", [False, True])
def test_lowers_for_cuda_sm90_window_and_softcap(traced):
    args = _shapes(slots=8, q_heads=8, kv_heads=4, head_dim=128, pages=257, page_size=16, pages_per_seq=32)
    if traced:  # the layer-scan case: one program for local and global layers
        f = jax.jit(lambda *a: paged_attention(*a[:-1], sliding_window=a[-1], softcap=50.0))
        args = (*args, jax.ShapeDtypeStruct((), jnp.int32))
    else:
        f = jax.jit(lambda *a: paged_attention(*a, sliding_window=100, softcap=50.0))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.timeout(120)
def test_no_smem_races(seed):
    """The interpreter's race detector: TMA writes, barrier waits, the V-tail zeroing and the
    P/O staging through SMEM are ordered (prefetching 2 blocks ahead, two splits)."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    rng = np.random.default_rng(seed)
    lengths = np.array([int(rng.integers(130, 192)), int(rng.integers(1, 64)), 0], np.int32)
    k, v, table = build_pool(rng, lengths, 16, 12, 1, 64)
    q = jnp.asarray(rng.standard_normal((3, 4, 64)), jnp.bfloat16)
    try:
        jax.block_until_ready(paged_attention(
            q, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), jnp.asarray(table),
            jnp.asarray(lengths), config=TuningConfig(num_splits=2, num_buffers=3),
            interpret=InterpretGPUParams(detect_races=True)))
    except BaseException:
        reset_interpreter()
        raise
    assert not get_races().races_found, f"seed={seed} lengths={lengths.tolist()}"


# --- 8-bit pages (int8 per-token scales, fp8 e4m3 per-head scales) ------------------------------
# The kernel widens the 8-bit tiles exactly and applies the scales in float32 (K's on the
# scores, V's on P before its rounding), so against the float32 reference on the same 8-bit
# pages (which dequantizes in jnp) the error budget is the bf16 one above: same tolerances.
# Unowned pages: int8 cannot hold NaN, so their *scales* are NaN (fp8 pages are NaN themselves).

def quantize_pool(k, v, quant, rng):
    """8-bit pages and scales of float pool k, v (NaN where build_pool put NaN)."""
    from pallas_kernels import kv_quant  # test helper: the formats the runtime writes

    nan = np.isnan(k[..., 0])  # [pages, page_size, kv_heads]
    if quant == "int8":
        (kq, ks, _), (vq, vs, _) = (kv_quant.quantize(jnp.asarray(np.nan_to_num(x)), jnp.int8) for x in (k, v))
        ks, vs = (jnp.where(nan.transpose(0, 2, 1), jnp.nan, jnp.swapaxes(s, 1, 2)).astype(s.dtype) for s in (ks, vs))
        return kq, vq, ks, vs
    scale = jnp.asarray(rng.uniform(0.25, 2.0, k.shape[2]), jnp.float32)
    kq, vq = (kv_quant.quantize(jnp.asarray(x), jnp.float8_e4m3fn, scale)[0] for x in (k, v))
    return kq, vq, scale, scale * 1.5


def run_quant_case(seed, lengths, quant, *, page_size, pages_per_seq, q_heads, kv_heads, head_dim, config=None,
                   window=None):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    k, v, table = build_pool(rng, lengths, page_size, pages_per_seq, kv_heads, head_dim)
    kq, vq, ks, vs = quantize_pool(k, v, quant, rng)
    q = jnp.asarray(1.5 * rng.standard_normal((len(lengths), q_heads, head_dim)), jnp.bfloat16)
    table_d, lengths_d = jnp.asarray(table), jnp.asarray(lengths)
    out = run_kernel(q, kq, vq, table_d, lengths_d, config=config, sliding_window=window, k_scales=ks, v_scales=vs)
    expected = reference(q.astype(jnp.float32), kq, vq, table_d, lengths_d, sliding_window=window,
                         k_scales=ks, v_scales=vs)
    msg = (f"seed={seed} quant={quant} lengths={lengths.tolist()} page_size={page_size} q_heads={q_heads} "
           f"kv_heads={kv_heads} head_dim={head_dim} config={config} window={window}")
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), f"non-finite output: {msg}"
    assert (out[lengths == 0] == 0).all(), msg
    np.testing.assert_allclose(out, np.asarray(expected), **TOL[jnp.bfloat16], err_msg=msg)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("quant", ["int8", "fp8"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_quantized_pages_sweep(seed, page_size, group, quant):
    run_quant_case(seed, boundary_lengths(page_size), quant, page_size=page_size,
                   pages_per_seq=160 // page_size + 1, q_heads=2 * group, kv_heads=2, head_dim=64,
                   config=TuningConfig(num_splits=1))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_quantized_pages_splits_window_head_dim_128(seed, quant):
    rng = np.random.default_rng(seed)
    lengths = [1, 17, 130, int(rng.integers(2, 192)), 0]
    run_quant_case(seed, lengths, quant, page_size=16, pages_per_seq=12, q_heads=4, kv_heads=2, head_dim=128,
                   config=TuningConfig(num_splits=2, num_buffers=3), window=37)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("quant", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_quantized_lowers_for_cuda_sm90(head_dim, quant):
    q, k, v, table, lengths = _shapes(slots=8, q_heads=16, kv_heads=4, head_dim=head_dim, pages=257, page_size=16,
                                      pages_per_seq=32)
    k = v = jax.ShapeDtypeStruct(k.shape, quant)
    sc = jax.ShapeDtypeStruct((257, 4, 16), jnp.bfloat16) if quant == jnp.int8 else jax.ShapeDtypeStruct((4,), jnp.float32)
    f = jax.jit(lambda q, k, v, t, n, ks, vs: paged_attention(q, k, v, t, n, k_scales=ks, v_scales=vs))
    assert "mosaic_gpu" in f.trace(q, k, v, table, lengths, sc, sc).lower(lowering_platforms=("cuda",)).as_text()
