"""The real pretrained stories260K reproduces golden.json (float64 NumPy port of llama2.c)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer


@pytest.fixture(scope="module")
def stories(assets_dir):
    path = assets_dir / "stories260K"
    golden = json.loads((path / "golden.json").read_text())
    return jaxinfer.load_model(path), jaxinfer.load_tokenizer(path), golden


def test_greedy_from_bos_matches_golden(stories):
    model, tok, golden = stories
    ids = golden["greedy_from_bos_255"]
    engine = jaxinfer.Engine(model, max_slots=2, page_size=16, num_pages=64, max_seq_len=512, tokenizer=tok)
    out = engine.generate([[ids[0]]], jaxinfer.SamplingParams(max_tokens=255, temperature=0.0))[0]
    assert out.token_ids == ids[1:]
    assert out.finish_reason == "length"
    assert out.text.strip() == golden["greedy_text"].strip()


def test_shakespeare_nll_matches_golden(stories):
    model, _, golden = stories
    ids = golden["shakespeare_first512"]["token_ids"]
    logits = np.asarray(jaxinfer.forward(model, jnp.asarray([ids], jnp.int32)))[0].astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    nll = -np.mean(logp[np.arange(len(ids) - 1), ids[1:]])
    assert abs(nll - 3.900033) <= 1e-3, nll
