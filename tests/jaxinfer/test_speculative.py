"""Speculative decoding (jaxinfer/speculative.py): n-gram proposals verified in one paged
forward. Greedy output must equal plain greedy decoding token for token; sampled output must
be distributed exactly as the target's (chi-square); rejected positions must never be read."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer import SamplingParams as SP
from jaxinfer import SpeculativeConfig
from jaxinfer.sampling import filtered_probs

REPEAT = "Once upon a time, there was a little girl named Lily. She liked to play. Once upon a time, there was a"
PROMPTS = [REPEAT, "The dog ran. The dog ran. The dog", "Lily", "Ben and Lily went to the park. Ben and Lily",
           "One day, Tom saw a big red ball.", "She said: the cat, the cat, the"] * 3
PROMPTS = PROMPTS[:16]  # the minimum: more requests than slots, each method and k


@pytest.fixture(scope="module")
def stories(assets_dir):
    path = assets_dir / "stories260K"
    return jaxinfer.load_model(path), jaxinfer.load_tokenizer(path)


@pytest.fixture(scope="module")
def int8_draft(stories):
    return jaxinfer.quantize(stories[0], "int8")  # a quantized copy of the target is a valid draft


@pytest.fixture(scope="module")
def plain_reference(stories):
    model, tok = stories
    cache = {}

    def run(prompts, params, **kw):
        key = (repr(params), repr(sorted(kw.items())))
        if key not in cache:
            cache[key] = jaxinfer.Engine(model, tokenizer=tok, **kw).generate(prompts, params)
        return cache[key]
    return run


# k = 1 and 5 bracket the proposal lengths for the n-gram proposer; the draft path (the same
# verify step, other proposals) at k = 3. (All six pairs passed when this was cut to three for
# CI time; draft k = 5 alone took a minute.)
@pytest.mark.parametrize("method,k", [("ngram", 1), ("ngram", 5), ("draft", 3)])
def test_greedy_equals_plain_decoding_with_preemption(stories, int8_draft, plain_reference, method, k):
    """16 requests on 4 slots and a pool small enough to preempt, with stop strings, min_tokens
    and logprobs: tokens, texts and finish reasons equal; logprobs to 1e-5 (the verify forward
    runs k+1 positions at once, so float32 rounding differs from one-token decode)."""
    model, tok = stories
    kw = dict(max_slots=4, page_size=8, num_pages=24, max_seq_len=160, decode_steps=8)
    params = [SP(max_tokens=40, temperature=0.0, logprobs=2, stop=["Lily."] if i % 3 == 0 else (),
                 min_tokens=4 if i % 4 == 1 else 0) for i in range(len(PROMPTS))]
    ref = plain_reference(PROMPTS, params, **kw)
    spec = jaxinfer.Engine(model, tokenizer=tok, speculative=SpeculativeConfig(method=method, num_tokens=k),
                           draft_model=int8_draft if method == "draft" else None, **kw)
    got = spec.generate(PROMPTS, params)
    for g, r in zip(got, ref):
        assert (g.token_ids, g.text, g.finish_reason) == (r.token_ids, r.text, r.finish_reason)
        for a, b in zip(g.logprobs, r.logprobs):
            assert a.keys() == b.keys() and np.allclose(list(a.values()), [b[t] for t in a], atol=1e-5)
    st = spec.stats()
    assert st["preemptions"] > 0, "the pool was meant to force preemption"
    assert st["spec_acceptance_rate"] > 0.2 and st["spec_mean_accepted_length"] > 1.1, st
    assert st["pages_used"] == 0


def test_rejected_positions_are_never_read(stories, monkeypatch):
    """After every engine step, every pool position at or beyond a slot's length (where rejected
    proposals left their K/V) is overwritten with NaN: the output must not change."""
    model, tok = stories
    kw = dict(max_slots=4, page_size=8, num_pages=64, max_seq_len=160, decode_steps=8)
    sp = SP(max_tokens=40, temperature=0.0)
    ref = jaxinfer.Engine(model, tokenizer=tok, **kw).generate(PROMPTS[:6], sp)
    engine = jaxinfer.Engine(model, tokenizer=tok, speculative=SpeculativeConfig(num_tokens=4), **kw)
    real, poisoned = engine._advance, []

    def poison_after():
        real()
        st = engine.state
        kp, vp = np.array(st.k_pages), np.array(st.v_pages)
        table, length, active = map(np.asarray, (st.page_table, st.length, st.active))
        ps = kp.shape[2]
        for s in np.nonzero(active)[0]:
            for e, page in enumerate(table[s]):
                if page == 0:
                    continue
                for off in range(ps):
                    if e * ps + off >= length[s]:
                        kp[:, page, off] = np.nan
                        vp[:, page, off] = np.nan
                        poisoned.append(1)
        engine.state = st.replace(k_pages=jax.device_put(kp), v_pages=jax.device_put(vp))
    monkeypatch.setattr(engine, "_advance", poison_after)
    got = engine.generate(PROMPTS[:6], sp)
    assert poisoned and [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert engine.stats()["spec_accepted"] > 0  # proposals were accepted, so rejections happened around them
    assert engine.stats()["pages_used"] == 0


def test_pool_below_length_equals_a_run_without_proposals(stories):
    """Pure steps: after speculative bursts, K/V at every position < length equal those of plain
    decoding to the same length (1e-5: the verify forward batches positions differently)."""
    model, tok = stories
    cfg = dict(max_slots=2, page_size=8, num_pages=40, max_seq_len=128, decode_steps=6)
    prompts = [REPEAT, "The dog ran. The dog ran. The dog"]
    sp = SP(max_tokens=80, temperature=0.0, ignore_eos=True)

    def pool_after(spec):
        e = jaxinfer.Engine(model, tokenizer=tok, prefix_caching=False, speculative=spec, **cfg)
        for p in prompts:
            e.add_request(p, sp)
        while True:
            e.step()
            lengths = np.asarray(e.state.length)
            if lengths.min() >= 40 or not e.has_unfinished():
                break
        st = e.state
        table, length = np.asarray(st.page_table), np.asarray(st.length)
        kp = np.asarray(st.k_pages)
        return [kp[:, table[s]].reshape(kp.shape[0], -1, *kp.shape[3:])[:, :40] for s in range(2)], length

    spec_kv, spec_len = pool_after(SpeculativeConfig(num_tokens=3))
    plain_kv, plain_len = pool_after(None)
    assert (spec_len >= 40).all() and (plain_len >= 40).all()
    for a, b in zip(spec_kv, plain_kv):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_sampled_output_is_distributed_as_the_target(tiny_model):
    """Chi-square goodness of fit of the first two generated tokens (jointly) against the exact
    target distribution, over 20,000 samples, with temperature, top-k and top-p on.

    A tiny-vocabulary model (16 tokens, random weights, lm_head scaled up so the distribution is
    far from uniform); the prompt repeats a pattern so the n-gram proposer proposes the first
    token, which is accepted about half the time (both the acceptance and the residual path).
    The test rejects at significance 0.001: a correct implementation fails it one run in a
    thousand (seeds are fixed, so it is deterministic here); a wrong acceptance rule (e.g.
    accepting every proposal, or resampling from p instead of the residual) is rejected with
    p-values far below that at this sample size."""
    scipy_stats = pytest.importorskip("scipy.stats")
    import dataclasses

    cfg = dataclasses.replace(tiny_model.config, vocab_size=16, bos_token_id=None, eos_token_ids=())
    model = jaxinfer.dummy_model(cfg, seed=1)
    model = model.replace(params={**model.params, "lm_head": model.params["lm_head"] * 6.0})
    prompt = [12, 13, 12, 13, 12]  # the proposer proposes 13, which the target gives p ~ 0.57
    temp, top_k, top_p = 0.9, 10, 0.95
    n, reqs = 250, 80
    engine = jaxinfer.Engine(model, max_slots=256, page_size=4, num_pages=1024, max_seq_len=32, decode_steps=2,
                             speculative=SpeculativeConfig(num_tokens=3), add_bos=False)
    outs = engine.generate([prompt] * reqs, [SP(max_tokens=2, temperature=temp, top_k=top_k, top_p=top_p, n=n,
                                                seed=i, ignore_eos=True) for i in range(reqs)])
    pairs = np.array([s.token_ids for o in outs for s in o.samples])
    assert pairs.shape == (n * reqs, 2)
    st = engine.stats()
    assert st["spec_proposed"] >= n * reqs and 0 < st["spec_accepted"] < st["spec_proposed"], st
    # The exact target: p(t1) from the prompt, p(t2 | t1) from prompt + t1, both filtered.
    v = cfg.vocab_size

    def dist(ids):
        logits = jaxinfer.forward(model, np.array([ids]))[0, -1][None]
        import jax.numpy as jnp
        return np.asarray(filtered_probs(logits, jnp.array([temp], jnp.float32), jnp.array([top_k]),
                                         jnp.array([top_p], jnp.float32), jnp.array([0.0], jnp.float32)))[0]
    p1 = dist(prompt)
    joint = np.array([p1[a] * dist(prompt + [a]) for a in range(v)], np.float64)  # [v, v]
    observed = np.zeros((v, v))
    np.add.at(observed, (pairs[:, 0], pairs[:, 1]), 1)
    expected = joint.ravel() * len(pairs)
    assert observed.ravel()[expected == 0].sum() == 0, "a token outside the filtered support was sampled"
    keep = expected >= 5
    obs, exp = observed.ravel()[keep], expected[keep]
    obs = np.append(obs, observed.ravel()[~keep].sum())
    exp = np.append(exp, expected[~keep].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    exp = exp.astype(np.float64) * (obs.sum() / exp.astype(np.float64).sum())
    p = scipy_stats.chisquare(obs, exp).pvalue
    assert p > 1e-3, f"chi-square p-value {p:.2e}: speculative samples are not distributed as the target"


def test_seeded_sampling_with_speculation_is_reproducible(stories):
    model, tok = stories
    kw = dict(max_slots=4, page_size=8, num_pages=64, max_seq_len=160, decode_steps=8,
              speculative=SpeculativeConfig(num_tokens=3))
    params = [SP(max_tokens=40, temperature=0.8, top_p=0.9, seed=i) for i in range(6)]
    a = jaxinfer.Engine(model, tokenizer=tok, **kw).generate(PROMPTS[:6], params)
    b = jaxinfer.Engine(model, tokenizer=tok, **kw).generate(PROMPTS[:6], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_bad_speculative_config_is_refused(tiny_model):
    with pytest.raises(ValueError, match="method must be one of"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ValueError, match="draft_model= goes with"):
        jaxinfer.Engine(tiny_model, speculative=SpeculativeConfig(method="draft"))
    import dataclasses
    other = jaxinfer.dummy_model(dataclasses.replace(tiny_model.config, vocab_size=300))
    with pytest.raises(ValueError, match="vocabulary"):
        jaxinfer.Engine(tiny_model, speculative=SpeculativeConfig(method="draft"), draft_model=other)
    with pytest.raises(ValueError, match="num_tokens must be an integer >= 1"):
        SpeculativeConfig(num_tokens=0)
