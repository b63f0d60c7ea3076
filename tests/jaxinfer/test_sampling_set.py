"""The "sampling set": repetition / presence / frequency penalties, min_tokens, logprobs,
prompt_logprobs and stop strings, each against a plain NumPy implementation of its definition.

- `process_logits` (penalties + min_tokens masking) is compared with NumPy on random logits
  rows with mixed per-slot settings (float32 vs float64: rtol 1e-6).
- End to end on a small random HF Llama (hf_oracle): greedy decoding with penalties / min_tokens
  equals a NumPy loop over transformers' logits with the same definitions applied (exact token
  equality: the loop asserts a top-2 gap > 1e-4 after processing, while jax and torch logits
  differ by ~1e-6); default requests in the same batch still equal HF greedy.
- logprobs / prompt_logprobs equal log_softmax of transformers' logits at every step, atol 1e-4
  (float32 forward passes on two frameworks differ by ~1e-6; the top-k ids are compared exactly,
  with a check that neighbouring logprobs are > 1e-4 apart so the order is well defined).
- Stop strings on the real stories260K model and tokenizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import InvalidRequestError, SamplingParams
from jaxinfer.sampling import process_logits

from hf_oracle import hf_greedy, hf_logits, make_checkpoint

EOS = 2
ENGINE_ARGS = dict(max_slots=3, page_size=4, num_pages=64, max_seq_len=64, decode_steps=4)


# --------------------------------------------------------------------------- NumPy references
def np_process(logits, generated, prompt, min_tokens=0, stop_ids=(), rep=1.0, pres=0.0, freq=0.0):
    """One logits row processed by the definitions (float64): stop ids -inf while fewer than
    min_tokens tokens were generated; repetition penalty (HF/vLLM) over prompt + output tokens;
    presence / frequency penalties (OpenAI/vLLM) over output tokens."""
    z = np.asarray(logits, np.float64).copy()
    if len(generated) < min_tokens:
        z[list(stop_ids)] = -np.inf
    seen = sorted(set(prompt) | set(generated))
    z[seen] = np.where(z[seen] > 0, z[seen] / rep, z[seen] * rep)
    counts = np.bincount(np.asarray(generated, np.int64), minlength=z.shape[0]).astype(np.float64)
    return z - freq * counts - pres * (counts > 0)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_greedy(hf, prompt, max_tokens, stop_ids=(EOS,), **kw):
    """Greedy decoding over transformers' logits with np_process applied at every step."""
    out = []
    for _ in range(max_tokens):
        z = np_process(hf_logits(hf, [list(prompt) + out])[0, -1], out, prompt, stop_ids=stop_ids, **kw)
        top2 = np.sort(z)[-2:]
        assert top2[1] - top2[0] > 1e-4, "near-tie in the reference: pick another prompt"
        out.append(int(np.argmax(z)))
        if out[-1] in stop_ids:
            break
    return out


# --------------------------------------------------------------------------- process_logits
@jax.jit
def _process(*args):
    return process_logits(*args)


def _batch(rng, slots=6, vocab=40):
    logits = rng.normal(scale=3.0, size=(slots, vocab)).astype(np.float32)
    prompts = [rng.integers(0, vocab, int(rng.integers(1, 12))).tolist() for _ in range(slots)]
    outputs = [rng.integers(0, vocab, int(rng.integers(0, 8))).tolist() for _ in range(slots)]
    seen = np.zeros((slots, vocab), bool)
    counts = np.zeros((slots, vocab), np.int32)
    for s in range(slots):
        seen[s, prompts[s] + outputs[s]] = True
        np.add.at(counts[s], outputs[s], 1)
    return logits, prompts, outputs, seen, counts


def test_penalties_match_numpy_definitions():
    rng = np.random.default_rng(0)
    logits, prompts, outputs, seen, counts = _batch(rng)
    # Mixed per-slot settings; slot 0 uses none (and must come back bit-identical).
    rep = np.asarray([1.0, 1.3, 0.7, 1.0, 2.0, 1.1], np.float32)
    pres = np.asarray([0.0, 0.0, 0.5, -1.0, 0.0, 2.0], np.float32)
    freq = np.asarray([0.0, 0.0, 0.0, 0.3, -0.5, 1.0], np.float32)
    stop_ids = np.full((6, 2), -1, np.int32)
    got = np.asarray(_process(jnp.asarray(logits), jnp.asarray([len(o) for o in outputs], jnp.int32),
                              jnp.zeros(6, jnp.int32), jnp.asarray(stop_ids), jnp.asarray(seen),
                              jnp.asarray(counts), jnp.asarray(rep), jnp.asarray(pres), jnp.asarray(freq)))
    for s in range(6):
        want = np_process(logits[s], outputs[s], prompts[s], rep=float(rep[s]), pres=float(pres[s]),
                          freq=float(freq[s]))
        np.testing.assert_allclose(got[s], want, rtol=1e-6, atol=1e-6, err_msg=f"slot {s}")
    np.testing.assert_array_equal(got[0], logits[0])
    # A batch where no slot uses a penalty takes the cheap branch: logits unchanged.
    ones, zeros = jnp.ones(6, jnp.float32), jnp.zeros(6, jnp.float32)
    got = np.asarray(_process(jnp.asarray(logits), jnp.zeros(6, jnp.int32), jnp.zeros(6, jnp.int32),
                              jnp.asarray(stop_ids), jnp.asarray(seen), jnp.asarray(counts), ones, zeros, zeros))
    np.testing.assert_array_equal(got, logits)


def test_min_tokens_masks_stop_ids_until_reached():
    rng = np.random.default_rng(1)
    logits, prompts, _, seen, counts = _batch(rng)
    generated = np.asarray([0, 2, 3, 5, 0, 1], np.int32)
    min_tokens = np.asarray([0, 3, 3, 4, 1, 1], np.int32)
    stop_ids = np.asarray([[2, 7], [2, 7], [2, -1], [5, 9], [2, 3], [-1, -1]], np.int32)
    ones, zeros = jnp.ones(6, jnp.float32), jnp.zeros(6, jnp.float32)
    got = np.asarray(_process(jnp.asarray(logits), jnp.asarray(generated), jnp.asarray(min_tokens),
                              jnp.asarray(stop_ids), jnp.asarray(seen), jnp.asarray(counts), ones, zeros, zeros))
    for s in range(6):
        ids = [int(t) for t in stop_ids[s] if t >= 0]
        want = np_process(logits[s], [0] * int(generated[s]), prompts[s], min_tokens=int(min_tokens[s]), stop_ids=ids)
        np.testing.assert_array_equal(got[s], want.astype(np.float32), err_msg=f"slot {s}")
    # Slots 1 and 4 are below their minimum: masked; 0, 2, 3 have reached it: untouched.
    assert np.isneginf(got[1, [2, 7]]).all() and np.isneginf(got[4, [2, 3]]).all()
    np.testing.assert_array_equal(got[[0, 2, 3, 5]], logits[[0, 2, 3, 5]])


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, field", [
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=17), "min_tokens"),
    (dict(logprobs=-1), "logprobs"), (dict(prompt_logprobs=-2), "prompt_logprobs"),
    (dict(stop=[""]), "stop"), (dict(stop=["a", 3]), "stop"),
])
def test_new_fields_are_validated(kwargs, field):
    with pytest.raises(InvalidRequestError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(max_tokens=16, **kwargs)


@pytest.mark.parametrize("field, value", [("min_tokens", 1.0), ("min_tokens", True), ("logprobs", 1.5),
                                          ("prompt_logprobs", True), ("repetition_penalty", "1"),
                                          ("stop", "abc"), ("stop", None)])
def test_new_fields_reject_wrong_types(field, value):
    sp = SamplingParams()
    object.__setattr__(sp, field, value)  # behind the runtime type checker's back (see test_sampling)
    with pytest.raises(InvalidRequestError, match=rf"SamplingParams\.{field}\b"):
        sp.validate()


def test_boundaries_and_max_logprobs():
    SamplingParams(repetition_penalty=1e-3, presence_penalty=-2, frequency_penalty=2, min_tokens=16,
                   max_tokens=16, logprobs=0, prompt_logprobs=5, stop=["x"]).validate(max_logprobs=5)
    assert SamplingParams(stop="end").stop == ("end",)  # one string, not its characters
    with pytest.raises(InvalidRequestError, match=r"SamplingParams\.logprobs.*\[0, 5\]"):
        SamplingParams(logprobs=6).validate(max_logprobs=5)


# --------------------------------------------------------------------------- end to end (HF oracle)
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_gqa")
    hf = make_checkpoint(path, "llama_gqa", seed=1)
    return hf, jaxinfer.load_model(path)


def _prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def test_penalties_and_min_tokens_end_to_end_and_batch_isolation(llama):
    hf, model = llama
    prompts = _prompts(model.config.vocab_size, (5, 9, 3, 12, 7), seed=3)
    n = 10
    default = SamplingParams(max_tokens=n, temperature=0.0)
    g = hf_greedy(hf, prompts[4], n, eos_token_id=EOS)
    special = [
        dict(repetition_penalty=1.5),
        dict(presence_penalty=1.0, frequency_penalty=0.5),
        dict(repetition_penalty=0.8, frequency_penalty=-0.3),
        # min_tokens with a stop id that greedy decoding would pick first: masked for 3 tokens.
        dict(min_tokens=3, stop_token_ids=(g[0],)),
    ]
    params = [SamplingParams(max_tokens=n, temperature=0.0, **kw) for kw in special[:3]] + [default] * 2
    params.append(SamplingParams(max_tokens=n, temperature=0.0, **special[3]))
    prompts = prompts + [prompts[4]]
    engine = jaxinfer.Engine(model, **ENGINE_ARGS)
    outs = engine.generate(prompts, params)  # 6 requests on 3 slots: mixed batches
    for i, kw in enumerate(special[:3]):
        want = np_greedy(hf, prompts[i], n, rep=kw.get("repetition_penalty", 1.0),
                         pres=kw.get("presence_penalty", 0.0), freq=kw.get("frequency_penalty", 0.0))
        assert outs[i].token_ids == want, kw
        assert outs[i].token_ids != hf_greedy(hf, prompts[i], n, eos_token_id=EOS), "penalty had no effect"
    for i in (3, 4):  # default requests next to penalised ones: still HF greedy
        assert outs[i].token_ids == hf_greedy(hf, prompts[i], n, eos_token_id=EOS)
    want = np_greedy(hf, prompts[5], n, stop_ids=(EOS, g[0]), min_tokens=3)
    assert outs[5].token_ids == want and g[0] not in want[:3]
    assert engine.stats()["pages_used"] == 0


def test_penalty_history_in_state(llama):
    """`seen` = prompt + output tokens and `counts` = output bincount, as insert/decode keep them
    (evict leaves the row; the next insert overwrites it whole)."""
    _, model = llama
    engine = jaxinfer.Engine(model, **ENGINE_ARGS)
    prompt = _prompts(model.config.vocab_size, (9,), seed=11)[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=7, temperature=0.0, frequency_penalty=0.1))[0]
    seen, counts = np.asarray(engine.state.seen[0]), np.asarray(engine.state.counts[0])
    np.testing.assert_array_equal(counts, np.bincount(out.token_ids, minlength=model.config.vocab_size))
    np.testing.assert_array_equal(np.nonzero(seen)[0], sorted(set(prompt) | set(out.token_ids)))
    # evict reset the penalty settings, so later default batches skip the penalty pass.
    assert float(engine.state.frequency_penalty[0]) == 0.0 and int(engine.state.logprobs[0]) == -1


def test_logprobs_and_prompt_logprobs_equal_hf_log_softmax(llama):
    hf, model = llama
    prompts = _prompts(model.config.vocab_size, (6, 11), seed=5)
    k = 3
    engine = jaxinfer.Engine(model, **ENGINE_ARGS)
    params = [SamplingParams(max_tokens=8, temperature=0.0, logprobs=k, prompt_logprobs=k),
              SamplingParams(max_tokens=8, temperature=0.0, logprobs=0)]
    outs = engine.generate(prompts, params)
    for o, sp in zip(outs, params):
        assert o.token_ids == hf_greedy(hf, o.prompt_token_ids, 8, eos_token_id=EOS)
        seq = o.prompt_token_ids + o.token_ids
        lp = np_log_softmax(hf_logits(hf, [seq])[0])  # row j: distribution of token j + 1
        p = len(o.prompt_token_ids)
        assert len(o.logprobs) == len(o.token_ids)
        for j, (tok, entry) in enumerate(zip(o.token_ids, o.logprobs)):
            row = lp[p - 1 + j]
            top = np.argsort(-row)[: sp.logprobs]
            assert np.all(-np.diff(np.sort(row)[::-1][: sp.logprobs + 1]) > 1e-4), "near-tie in the top-k"
            assert set(entry) == {tok, *top.tolist()}, j
            for t, v in entry.items():
                assert v == pytest.approx(row[t], abs=1e-4), (j, t)
        if sp.prompt_logprobs is None:
            assert o.prompt_logprobs is None
            continue
        assert len(o.prompt_logprobs) == p and o.prompt_logprobs[0] is None
        for i in range(1, p):
            row, entry = lp[i - 1], o.prompt_logprobs[i]
            assert set(entry) == {seq[i], *np.argsort(-row)[:k].tolist()}, i
            for t, v in entry.items():
                assert v == pytest.approx(row[t], abs=1e-4), (i, t)
    # Streaming delivers the same logprobs, aligned with the tokens of each delta.
    got = {0: [], 1: []}
    for d in engine.stream(prompts, params):
        assert len(d.logprobs) == len(d.token_ids)
        got[d.index] += d.logprobs
    assert got[0] == outs[0].logprobs and got[1] == outs[1].logprobs
    # Without logprobs requested, none are returned.
    assert engine.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0.0))[0].logprobs is None


def test_logprobs_above_max_logprobs_rejected(llama):
    _, model = llama
    engine = jaxinfer.Engine(model, **ENGINE_ARGS, max_logprobs=2)
    with pytest.raises(InvalidRequestError, match=r"SamplingParams\.prompt_logprobs"):
        engine.add_request([3, 4], SamplingParams(prompt_logprobs=3))
    with pytest.raises(InvalidRequestError, match="needs a tokenizer"):
        engine.add_request([3, 4], SamplingParams(stop=["x"]))


# --------------------------------------------------------------------------- stop strings
def test_stop_string_truncates_text_and_drops_later_tokens(assets_dir):
    path = assets_dir / "stories260K"
    model = jaxinfer.load_model(path)
    tok = jaxinfer.load_tokenizer(path)
    engine = jaxinfer.Engine(model, max_slots=2, page_size=16, num_pages=64, max_seq_len=256, tokenizer=tok,
                             decode_steps=8)
    prompt = "Once upon a time"
    full = engine.generate([prompt], SamplingParams(max_tokens=60, temperature=0.0))[0]
    stop = ". "  # (this model starts its continuation with ", ")
    cut = full.text.find(stop)
    assert cut > 0, f"pick another stop string: {full.text!r}"
    sp = SamplingParams(max_tokens=60, temperature=0.0, stop=[stop, "never appears"])
    out = engine.generate([prompt], sp)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    # Tokens end with the one that completed the stop string; nothing after it.
    ids = out.token_ids
    assert ids == full.token_ids[: len(ids)]
    decode = lambda t: tok.decode(out.prompt_token_ids + t)[len(tok.decode(out.prompt_token_ids)):]  # noqa: E731
    assert stop in decode(ids) and stop not in decode(ids[:-1])
    # Streaming: deltas add up to the same text and never show the stop string.
    deltas = list(engine.stream([prompt], sp))
    assert "".join(d.text for d in deltas) == out.text
    assert [t for d in deltas for t in d.token_ids] == ids and deltas[-1].finish_reason == "stop"
    assert engine.stats()["pages_used"] == 0 and engine.stats()["running"] == 0
    # The freed slot serves the next request normally.
    assert engine.generate([prompt], SamplingParams(max_tokens=60, temperature=0.0))[0].token_ids == full.token_ids
