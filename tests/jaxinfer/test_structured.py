"""Structured output (issue 17): JSON schema / regex / choice constraints enforced inside the
jitted decode (jaxinfer/structured.py compiles, jaxinfer/grammar.py masks and advances).

On two real tokenizers: stories260K (its real model) and the Llama 2 tokenizer (a random Llama
with vocab 32000). Every output is checked exactly (json.loads + jsonschema, re.fullmatch,
membership); greedy output is compared token for token with a host-side reference that takes
the argmax over the tokens outlines-core's own Guide allows.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import Engine, InvalidRequestError, SamplingParams

outlines_core = pytest.importorskip("outlines_core", reason="the 'structured' extra (outlines-core) is not installed")
jsonschema = pytest.importorskip("jsonschema")

from jaxinfer import structured  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "assets"
LLAMA2_TOK = ASSETS / "llama2_tokenizer"
pytestmark = pytest.mark.skipif(not (ASSETS / "stories260K").is_dir() or not LLAMA2_TOK.is_dir(),
                                reason="../shared/assets (stories260K, llama2_tokenizer) not present")

# Small bounded schemas (every string has a maxLength, pattern or enum) so that a random model
# sampling at temperature 1 still completes them well within max_tokens.
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "admin": {"type": "boolean"}}, "required": ["id", "admin"]}}, "required": ["user"]},
    "array_min_items": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3}},
        "required": ["tags"]},
    "enum": {"type": "object", "properties": {"size": {"enum": ["S", "M", "L", "XL"]},
                                              "color": {"enum": ["red", "blue"]}}, "required": ["size", "color"]},
    "int_bounds": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 65},
        "delta": {"type": "integer", "minimum": -20, "exclusiveMaximum": 5}}, "required": ["age", "delta"]},
    "pattern": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "note": {"type": "string", "maxLength": 5}}, "required": ["code", "note"]},
}
REGEX = r"(yes|no), [0-9]{2}\.[0-9]"
CHOICES = ["alpha", "beta gamma", "δelta"]
SEEDS = 20


@pytest.fixture(scope="module")
def stories():
    d = jaxinfer.default_model_dir()
    return jaxinfer.load_model(d), jaxinfer.load_tokenizer(d)


@pytest.fixture(scope="module")
def llama2():
    cfg = jaxinfer.ModelConfig(model_type="llama", vocab_size=32000, hidden_size=64, intermediate_size=128,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    return jaxinfer.dummy_model(cfg, seed=3), jaxinfer.load_tokenizer(LLAMA2_TOK)


def _engine(model, tok, **kw):
    kw = dict(max_slots=8, max_seq_len=160, num_pages=160, page_size=16, decode_steps=8, precompile=False) | kw
    return Engine(model, tokenizer=tok, **kw)


@pytest.fixture(scope="module", params=["stories260K", "llama2_random"])
def engine(request, stories, llama2):
    model, tok = stories if request.param == "stories260K" else llama2
    return _engine(model, tok)


def test_int_range_regex_is_exact():
    for lo, hi in [(0, 120), (18, 65), (-20, 4), (-500, -3), (7, None), (None, -4), (None, None), (99, 1001)]:
        rx = re.compile(structured._int_range_regex(lo, hi))
        for n in range(-1200, 1200):
            assert bool(rx.fullmatch(str(n))) == ((lo is None or n >= lo) and (hi is None or n <= hi)), (lo, hi, n)
        assert not rx.fullmatch("01") and not rx.fullmatch("-0")


def test_json_schemas_validate(engine):
    """5 schemas x 20 seeds at temperature 1: every output parses and validates, and ends by
    EOS in an accepting state (finish_reason stop, not length)."""
    names = list(SCHEMAS)
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, json_schema=SCHEMAS[n])
              for n in names for s in range(SEEDS)]
    outs = engine.generate(["Once upon a time"] * len(params), params)
    for (n, o) in zip([n for n in names for _ in range(SEEDS)], outs):
        assert o.finish_reason == "stop", (n, o.text, o.finish_reason)
        assert o.token_ids[-1] in engine.eos_ids
        value = json.loads(o.text)
        jsonschema.validate(value, SCHEMAS[n])


def test_regex_and_choice(engine):
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, regex=REGEX) for s in range(SEEDS)]
    params += [SamplingParams(max_tokens=60, temperature=1.0, seed=s, choice=CHOICES) for s in range(SEEDS)]
    outs = engine.generate(["Once upon a time"] * len(params), params)
    for o in outs[:SEEDS]:
        assert o.finish_reason == "stop" and re.fullmatch(REGEX, o.text), o.text
    for o in outs[SEEDS:]:
        assert o.finish_reason == "stop" and o.text in CHOICES, o.text


def _reference(model, tok, eos_ids, prompt: list[int], kind, spec, max_tokens: int, width: int = 64) -> list[int]:
    """Greedy decoding on the host: at each step the argmax of the full-sequence forward's
    logits over the tokens outlines-core's own Guide allows (its EOS stands for the EOS ids)."""
    auto = structured.compile_constraint(kind, spec, tok, model.config.vocab_size, eos_ids)
    guide = outlines_core.Guide(auto.index)
    fwd = jaxinfer.forward
    seq, out = list(prompt), []
    for _ in range(max_tokens):
        toks = np.zeros((1, width), np.int32)
        toks[0, : len(seq)] = seq
        logits = np.asarray(fwd(model, jnp.asarray(toks)))[0, len(seq) - 1]
        allowed = list(guide.get_tokens())
        candidates = [t for t in allowed if t != eos_ids[0]] + ([*eos_ids] if eos_ids[0] in allowed else [])
        t = max(candidates, key=lambda i: logits[i])
        out.append(int(t))
        if t in eos_ids:
            break
        guide.advance(int(t))
        seq.append(int(t))
    return out


@pytest.mark.parametrize("which", ["stories260K", "llama2_random"])
def test_greedy_equals_host_reference(which, stories, llama2):
    model, tok = stories if which == "stories260K" else llama2
    eng = _engine(model, tok, max_slots=4)
    prompt = "Once upon a time"
    ids = jaxinfer.request.tokenize(prompt, tok, True)
    cases = [("json", SCHEMAS["nested"]), ("regex", REGEX)]
    params = [SamplingParams(max_tokens=80, temperature=0.0, **{dict(json="json_schema", regex="regex")[k]: s})
              for k, s in cases]
    outs = eng.generate([prompt] * len(cases), params)
    for (kind, spec), o in zip(cases, outs):
        ref = _reference(model, tok, eng.eos_ids, ids, kind, spec, 64 - len(ids))
        assert o.token_ids == ref, (kind, o.text, tok.decode(ref))


def test_one_host_sync_per_decode_steps_tokens(stories):
    """decode_steps=8: a constrained request's tokens come back 8 per decode_steps call."""
    model, tok = stories
    eng = _engine(model, tok, max_slots=2, profile=True)
    o = eng.generate(["Once upon a time"], SamplingParams(max_tokens=120, temperature=1.0, seed=5,
                                                          regex=r"[a-z ]{30,40}\."))[0]
    assert o.finish_reason == "stop" and re.fullmatch(r"[a-z ]{30,40}\.", o.text)
    calls = eng.profile()["decode_steps"]["calls"]
    assert len(o.token_ids) > 8 and calls == math.ceil(len(o.token_ids) / 8), (len(o.token_ids), calls)
    assert "load_grammar" in eng.profile() and eng.profile()["load_grammar"]["calls"] == 1


def test_mixed_batch_leaves_unconstrained_requests_alone(llama2):
    """Unconstrained requests get the same tokens whether constrained requests share the batch
    or not (batch_invariant engine: bitwise, so the comparison is exact)."""
    model, tok = llama2
    prompts = ["Once upon a time", "The cat", "A story", "Hello there"]
    free = [SamplingParams(max_tokens=24, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
    constrained = [SamplingParams(max_tokens=80, temperature=1.0, seed=3, json_schema=SCHEMAS["enum"]),
                   SamplingParams(max_tokens=60, temperature=1.0, seed=4, choice=CHOICES)]
    plain = [SamplingParams(max_tokens=24, temperature=1.0, seed=s) for s in (3, 4)]
    a = _engine(model, tok, max_slots=4, batch_invariant=True).generate(prompts, free + constrained)
    b = _engine(model, tok, max_slots=4, batch_invariant=True).generate(prompts, free + plain)
    assert [o.token_ids for o in a[:2]] == [o.token_ids for o in b[:2]]
    assert a[3].text in CHOICES and json.loads(a[2].text)["size"] in ("S", "M", "L", "XL")


def test_invalid_constraints_are_named_and_others_continue(stories):
    model, tok = stories
    eng = _engine(model, tok, max_slots=2)
    good = eng.add_request("Once", SamplingParams(max_tokens=40, temperature=0.0, choice=["yes", "no"]))
    for params, words in [
        (dict(json_schema={"type": "frobnicate"}), ["json_schema", "frobnicate"]),
        (dict(json_schema="{not json"), ["json_schema", "not valid JSON"]),
        (dict(regex="(ab"), ["regex", "(ab"]),
        (dict(json_schema={"type": "number", "minimum": 0}), ["json_schema", "integers only"]),
        (dict(regex="a", choice=["x"]), ["at most one"]),
        (dict(choice=[]), ["choice"]),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            eng.add_request("Once", SamplingParams(max_tokens=8, **params))
        assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(InvalidRequestError, match="needs a tokenizer"):
        Engine(model, max_slots=2, max_seq_len=64, precompile=False).add_request([1, 2], SamplingParams(regex="a"))
    eng.run_until_idle()
    out = {o.request_id: o for o in eng.outputs()}[good]
    assert out.finish_reason == "stop" and out.text in ("yes", "no")


def test_host_mask_fallback_for_large_automata(llama2):
    """An automaton larger than the device table (grammar_states=16 here) runs with the host
    mask: still exact, one token per host sync for that request only."""
    model, tok = llama2
    eng = _engine(model, tok, max_slots=4, grammar_states=16, grammar_classes=64, profile=True)
    big = SCHEMAS["int_bounds"]
    auto = structured.compile_constraint("json", big, tok, 32000, eng.eos_ids)
    assert auto.num_states > 16
    params = [SamplingParams(max_tokens=80, temperature=1.0, seed=s, json_schema=big) for s in range(3)]
    params += [SamplingParams(max_tokens=40, temperature=1.0, seed=9, choice=CHOICES)]  # fits: on device
    outs = eng.generate(["Once upon a time"] * 4, params)
    for o in outs[:3]:
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), big)
    assert outs[3].text in CHOICES
    assert eng._counters["grammar_host_masks"] >= max(len(o.token_ids) for o in outs[:3]) - 1


def test_constraint_cache_and_table_reuse(stories):
    model, tok = stories
    a = structured.compile_constraint("json", SCHEMAS["enum"], tok, 512, (2,))
    assert structured.compile_constraint("json", json.dumps(SCHEMAS["enum"]), tok, 512, (2,)) is a
    eng = _engine(model, tok, max_slots=2, profile=True)
    for _ in range(2):
        eng.generate(["Once"], SamplingParams(max_tokens=60, temperature=0.0, json_schema=SCHEMAS["enum"]))
    assert eng.profile()["load_grammar"]["calls"] == 1  # the second request found it resident
