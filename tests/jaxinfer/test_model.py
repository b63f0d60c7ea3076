"""Logits equal Hugging Face transformers; prefill + paged decode equals the full forward."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.sampling import SamplingParams
from jaxinfer.state import EngineConfig, init_state
from jaxinfer.steps import decode_forward_jit, insert_jit, make_requests

from hf_oracle import CONFIGS, hf_logits, make_checkpoint

# fp32 on both sides; the only differences are summation order and XLA vs torch kernels, which
# stay far below 1e-4 of the logit scale (the bound) for these sizes.
REL_TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(path, request.param)
    return request.param, hf, jaxinfer.load_model(path, dtype="float32")


def test_logits_equal_hf(checkpoint):
    name, hf, model = checkpoint
    rng = np.random.default_rng()
    # 40 tokens: longer than the mistral window (8) and the llama3 original context (16).
    tokens = rng.integers(0, model.config.vocab_size, (2, 40))
    ref = hf_logits(hf, tokens)
    out = np.asarray(jaxinfer.forward(model, jnp.asarray(tokens, jnp.int32)))
    err = np.abs(out - ref).max()
    assert err <= REL_TOL * np.abs(ref).max(), f"{name}: max abs err {err} vs scale {np.abs(ref).max()}"


def test_prefill_plus_paged_decode_equals_forward(checkpoint):
    """Teacher forcing through the engine's own steps: prefill a prefix (length not a multiple
    of the page size), then feed the true next tokens one by one with paged decode; every
    position's logits must equal the no-cache forward of the whole sequence."""
    name, _, model = checkpoint
    cfg = EngineConfig(max_slots=2, page_size=4, num_pages=32, max_seq_len=48, prefill_buckets=(16, 48))
    rng = np.random.default_rng()
    seq = rng.integers(0, model.config.vocab_size, 30).tolist()
    full = np.asarray(jaxinfer.forward(model, jnp.asarray([seq], jnp.int32)))[0]
    prefix = 11
    state = init_state(cfg, model.config)
    reqs = make_requests(cfg, [seq[:prefix]], [SamplingParams(max_tokens=40, temperature=0.0, seed=0)], [7], 1, 16)
    state, res = insert_jit(cfg, model, state, reqs)
    assert bool(res.accepted[0])
    slot = int(res.slot[0])
    scale = np.abs(full).max()
    for pos in range(prefix, len(seq)):
        state = state.replace(last_token=state.last_token.at[slot].set(seq[pos]))
        state, logits, ran = decode_forward_jit(cfg, model, state)
        assert bool(ran[slot])
        err = np.abs(np.asarray(logits[slot]) - full[pos]).max()
        assert err <= REL_TOL * scale, f"{name}: position {pos}: err {err}"
    assert int(state.length[slot]) == len(seq)


def test_forward_rejects_bad_tokens(tiny_model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        jaxinfer.forward(tiny_model, [[1, 2, tiny_model.config.vocab_size]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        jaxinfer.forward(tiny_model, np.array([[-1, 2]]))
    with pytest.raises(ValueError, match=r"integer array \[batch, seq\]"):
        jaxinfer.forward(tiny_model, np.array([1, 2]))
    with pytest.raises(ValueError, match=r"integer array \[batch, seq\]"):
        jaxinfer.forward(tiny_model, np.array([[1.0, 2.0]]))


def test_bf16_model_tracks_fp32(tiny_model):
    """bf16 weights/activations with f32 accumulation: logits stay close to the f32 model
    (bf16 has 8 mantissa bits; 4 layers of rounding keep the error within a few percent)."""
    import jax

    bf16 = jaxinfer.Model(tiny_model.config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_model.params))
    tokens = np.random.default_rng(0).integers(0, tiny_model.config.vocab_size, (1, 24))
    a = np.asarray(jaxinfer.forward(tiny_model, tokens))
    b = np.asarray(jaxinfer.forward(bf16, tokens))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max() + 1e-3
