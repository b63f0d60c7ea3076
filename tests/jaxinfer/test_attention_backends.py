"""The attention interface: backend selection, and one end-to-end generation through the
Pallas kernels in GPU interpret mode that must equal the reference path token for token."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.attention import decode_attention, prefill_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pallas_kernels"))
from interpreter_patch import patch_interpreter_wgmma_transpose  # noqa: E402

patch_interpreter_wgmma_transpose()


def _gqa_bf16_model():
    """A random bf16 GQA Llama with the kernels' head_dim (64) and 4 q heads per KV head. The
    lm_head is scaled up so greedy picks have wide margins: bf16 kernels and the reference
    round differently (P is rounded to bf16 before P @ V), and a near-tie could flip a token
    without either being wrong."""
    cfg = jaxinfer.ModelConfig(model_type="llama", vocab_size=96, hidden_size=256, intermediate_size=256,
                               num_layers=2, num_heads=4, num_kv_heads=1, head_dim=64, eos_token_ids=(2,))
    model = jaxinfer.dummy_model(cfg, dtype="bfloat16", seed=3)
    params = dict(model.params, lm_head=model.params["lm_head"] * 40)
    return jaxinfer.Model(cfg, params)


def test_unknown_backend_rejected():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="backend"):
        prefill_attention(q, q, q, lengths=None, backend="triton")


def test_auto_on_cpu_is_the_reference():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 16, 4, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(2, 16, 1, 64)), jnp.bfloat16)
    lengths = jnp.array([16, 5], jnp.int32)
    a = prefill_attention(q, k, k, lengths=lengths, backend="auto")
    b = prefill_attention(q, k, k, lengths=lengths, backend="reference")
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_kernel_backends_explain_unsupported_inputs():
    q = jnp.zeros((1, 16, 2, 8), jnp.float32)  # fp32: not a kernel input
    with pytest.raises(ValueError):
        prefill_attention(q, q, q, lengths=None, backend="interpret")
    with pytest.raises(ValueError, match="softcap"):
        decode_attention(jnp.zeros((1, 2, 64), jnp.bfloat16), jnp.zeros((1, 4, 16, 1, 64), jnp.bfloat16),
                         jnp.zeros((1, 4, 16, 1, 64), jnp.bfloat16), 0, jnp.zeros((1, 2), jnp.int32),
                         jnp.ones((1,), jnp.int32), softcap=-1.0, backend="interpret")


@pytest.mark.timeout(300)
def test_window_softcap_and_scale_reach_the_kernels():
    """A Gemma-2-like layer (window, soft-cap, query_pre_attn_scalar scale; the window traced,
    as in the layer scan) through the interpreted kernels equals the reference path. Tolerance:
    bf16 outputs, and the kernels round P to bf16 before P @ V: <= 2^-8 relative + 2^-8 * max|v|."""
    rng = np.random.default_rng(0)
    spec = dict(softcap=5.0, scale=0.1)
    q = jnp.asarray(rng.normal(size=(2, 40, 4, 64)), jnp.bfloat16)
    kv = jnp.asarray(rng.normal(size=(2, 40, 1, 64)), jnp.bfloat16)
    lengths = jnp.array([40, 23], jnp.int32)
    prefill = jax.jit(lambda w, backend: prefill_attention(q, kv, kv, lengths=lengths, sliding_window=w,
                                                           backend=backend, **spec), static_argnums=1)
    tol = dict(rtol=2**-8, atol=2**-8 * 4.5)
    np.testing.assert_allclose(np.asarray(prefill(jnp.int32(9), "interpret"), np.float32),
                               np.asarray(prefill(jnp.int32(9), "reference"), np.float32), **tol)
    pool = jnp.asarray(rng.normal(size=(2, 6, 16, 1, 64)), jnp.bfloat16)  # [layers, pages, page, kv, d]
    table = jnp.array([[1, 2, 3, 4], [5, 3, 0, 0]], jnp.int32)
    dl = jnp.array([57, 20], jnp.int32)
    decode = jax.jit(lambda w, backend: decode_attention(q[:, 0], pool, pool, 1, table, dl, sliding_window=w,
                                                         backend=backend, **spec), static_argnums=1)
    np.testing.assert_allclose(np.asarray(decode(jnp.int32(9), "interpret"), np.float32),
                               np.asarray(decode(jnp.int32(9), "reference"), np.float32), **tol)


@pytest.mark.timeout(600)
def test_generation_through_interpreted_kernels_equals_reference():
    model = _gqa_bf16_model()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 96, n).tolist() for n in (5, 16, 21)]  # below/at/across a page
    sp = jaxinfer.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    kw = dict(max_slots=2, page_size=16, num_pages=16, max_seq_len=64, decode_steps=3, prefill_buckets=(32, 63))
    ref = jaxinfer.Engine(model, attention_backend="reference", **kw).generate(prompts, sp)
    try:
        ker = jaxinfer.Engine(model, attention_backend="interpret", **kw).generate(prompts, sp)
    finally:
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

        reset_gpu_interpret_mode_state()
    assert [o.token_ids for o in ker] == [o.token_ids for o in ref]


@pytest.mark.timeout(600)
def test_stories260k_through_interpreted_kernels_equals_reference(assets_dir):
    """The real model (head_dim 8, zero-padded to the kernels' 64) in bf16 (the kernels take
    bf16/fp16): same greedy tokens through the interpreted kernels as through the reference
    path on the same bf16 weights."""
    model = jaxinfer.load_model(assets_dir / "stories260K", dtype="bfloat16")
    sp = jaxinfer.SamplingParams(max_tokens=12, temperature=0.0)
    prompts = [[1], [1, 403, 407, 261, 378]]
    kw = dict(max_slots=2, page_size=16, num_pages=16, max_seq_len=64, decode_steps=4, prefill_buckets=(16, 63))
    ref = jaxinfer.Engine(model, attention_backend="reference", **kw).generate(prompts, sp)
    try:
        ker = jaxinfer.Engine(model, attention_backend="interpret", **kw).generate(prompts, sp)
    finally:
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

        reset_gpu_interpret_mode_state()
    assert [o.token_ids for o in ker] == [o.token_ids for o in ref]
