"""Quantized matmul backends: the reference on CPU by default, and the Pallas dequantizing
kernel in interpret mode giving the same greedy tokens end to end."""

import sys
from pathlib import Path

import numpy as np
import pytest

import jaxinfer
from jaxinfer.quant import QuantizedWeight, with_matmul_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pallas_kernels"))
from interpreter_patch import patch_interpreter_wgmma_transpose  # noqa: E402

patch_interpreter_wgmma_transpose()


def _model():
    """A bf16 Llama whose linear shapes the kernel takes (K, N multiples of 64/128)."""
    cfg = jaxinfer.ModelConfig(model_type="llama", vocab_size=96, hidden_size=128, intermediate_size=256,
                               num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, eos_token_ids=(2,))
    return jaxinfer.dummy_model(cfg, dtype="bfloat16", seed=5)


def test_backend_is_validated_and_set_everywhere():
    q = jaxinfer.quantize(_model(), "int8")
    with pytest.raises(ValueError, match="backend"):
        with_matmul_backend(q, "triton")
    weights = [w for w in jaxinfer.model.jax.tree.leaves(
        with_matmul_backend(q, "reference"), is_leaf=lambda w: isinstance(w, QuantizedWeight))
        if isinstance(w, QuantizedWeight)]
    assert len(weights) == 7 and all(w.backend == "reference" for w in weights)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method,options", [("int4", dict(group_size=128)), ("int8", {})])
def test_forward_through_interpreted_quant_kernel_tracks_reference(method, options):
    """Each kernel matmul equals the reference to ~1e-6 (tests/pallas_kernels), but every
    linear's output is rounded to bf16 and the two paths sum in different orders (the kernel
    scales after the integer-code product), so hidden states differ at bf16 resolution
    (2^-9 relative per rounding, 14 linears): logits agree within 2% of their scale."""
    model = jaxinfer.quantize(_model(), method, **options)
    tokens = np.random.default_rng(2).integers(3, 96, (1, 16))
    try:
        b = np.asarray(jaxinfer.forward(with_matmul_backend(model, "interpret"), tokens))
    finally:
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

        reset_gpu_interpret_mode_state()
    a = np.asarray(jaxinfer.forward(with_matmul_backend(model, "reference"), tokens))
    assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()


@pytest.mark.timeout(600)
def test_generation_through_interpreted_int8_kernel_equals_reference():
    model = jaxinfer.quantize(_model(), "int8")
    sp = jaxinfer.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompts = [np.random.default_rng(2).integers(3, 96, 9).tolist()]
    kw = dict(max_slots=1, page_size=16, num_pages=8, max_seq_len=32, decode_steps=2, prefill_buckets=(16, 31))
    ref = jaxinfer.Engine(with_matmul_backend(model, "reference"), **kw).generate(prompts, sp)
    try:
        ker = jaxinfer.Engine(with_matmul_backend(model, "interpret"), **kw).generate(prompts, sp)
    finally:
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

        reset_gpu_interpret_mode_state()
    assert ker[0].token_ids == ref[0].token_ids
