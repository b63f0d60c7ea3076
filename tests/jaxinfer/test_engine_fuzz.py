"""Hypothesis fuzz of the Engine's scheduler.

Random request lists (prompt lengths 1..40, prompts that often share prefixes with a few base
prompts so the prefix cache hits, max_tokens, n in {1, 2, 3}, stop_token_ids, chunked prefill
on or off, continuous or static mode) run on a 4-slot engine whose pool (16 usable pages of 4
tokens, i.e. 64 positions for up to 4 sequences) is so small that requests are preempted and
resumed all the time. On every example:

- every sample of every request finishes exactly once (streamed deltas: exactly one carries a
  finish_reason, none come after it), with a consistent reason ("length": max_tokens or
  max_seq_len reached; "stop": the last token is EOS or one of stop_token_ids, included);
- greedy outputs equal a solo run of the same request (a fresh engine per request, same
  EngineConfig so no extra compiles, prompt prefilled whole, no cache hits, no preemption), and
  every sample of a greedy n > 1 request equals sample 0;
- after every step no reference count is negative and the null page's count is 1; once idle
  no page is in use, every count is 0 and no slot is active.
Across the run, preemptions and prefix-cache hits must actually have happened.

Stop condition (checked on the solo runs): a request whose stop_token_ids contains a token its
unstopped greedy output produces ends at the first occurrence of that token, which is included
in token_ids, with finish_reason "stop".

One EngineConfig for all examples (engines differing only in host-side settings share it), so
compilations are paid once; the engines are reused across examples, so state left behind by one
example (cached pages) is part of the next one's input.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxinfer
from jaxinfer import SamplingParams

CFG = dict(max_slots=4, page_size=4, num_pages=17, max_seq_len=64, decode_steps=3)
MAX_PROMPT, MAX_TOKENS = 40, 16
VOCAB = 258  # the tiny preset
EOS = 257

_BASES = [np.random.default_rng(100 + i).integers(0, VOCAB, n).tolist() for i, n in enumerate((12, 20, 33))]
_engines: dict = {}
_solo_cache: dict = {}
_totals = {"preemptions": 0, "cache_hits": 0, "examples": 0, "stopped_by_stop_ids": 0}


def _engine(model, chunk, mode):
    key = (id(model), chunk, mode)
    if key not in _engines:
        _engines[key] = jaxinfer.Engine(model, **CFG, prefill_chunk=chunk, mode=mode)
    return _engines[key]


def _solo(model, prompt, params):
    """(token_ids, finish_reason, logprobs) of `prompt` alone in a fresh engine (n=1)."""
    key = (tuple(prompt), params.max_tokens, tuple(params.stop_token_ids))
    if key not in _solo_cache:
        sp = dataclasses.replace(params, n=1, logprobs=2)
        out = jaxinfer.Engine(model, **CFG, prefix_caching=True).generate([prompt], sp)[0]
        _solo_cache[key] = (out.token_ids, out.finish_reason, out.logprobs)
    return _solo_cache[key]


def _gap_note(tokens, got, logprobs):
    """Where `got` first departs from the solo tokens, and the solo's top-2 logprob gap there
    (a gap < 1e-5 would be a float near-tie, not a scheduler bug)."""
    i = next((j for j, (a, b) in enumerate(zip(tokens, got)) if a != b), min(len(tokens), len(got)))
    if i < len(logprobs):
        top = sorted(logprobs[i].values(), reverse=True)[:2]
        gap = top[0] - top[1] if len(top) == 2 else float("nan")
        return f"first difference at token {i}: solo top-2 logprob gap {gap:.3g}"
    return f"first difference at token {i} (length)"


@st.composite
def _request(draw):
    kind = draw(st.sampled_from(["random", "shared", "shared"]))
    if kind == "random":
        size = draw(st.integers(1, MAX_PROMPT))
        prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=size, max_size=size))
    else:
        base = draw(st.sampled_from(_BASES))
        keep = draw(st.integers(1, len(base)))
        size = draw(st.integers(0, MAX_PROMPT - keep))
        suffix = draw(st.lists(st.integers(0, VOCAB - 1), min_size=size, max_size=size))
        prompt = base[:keep] + suffix
    max_tokens = draw(st.one_of(st.integers(1, MAX_TOKENS), st.integers(8, MAX_TOKENS)))
    n = draw(st.sampled_from([1, 1, 2, 3]))
    # None: no extra stop id; i: stop at whatever token the solo greedy run produces at step i.
    stop_at = draw(st.one_of(st.none(), st.integers(0, MAX_TOKENS - 1)))
    return prompt, max_tokens, n, stop_at


_case = st.fixed_dictionaries({
    "requests": st.lists(_request(), min_size=1, max_size=8) | st.lists(_request(), min_size=4, max_size=8),
    "chunk": st.sampled_from([None, 4, 8]),
    "mode": st.sampled_from(["continuous", "continuous", "continuous", "static"]),
})


def _check_pool(engine, idle: bool):
    refcount, active = jax.device_get((engine.state.alloc.refcount, engine.state.active))
    assert refcount[0] == 1, f"null page refcount {refcount[0]}"
    assert (refcount[1:] >= 0).all(), f"negative refcount: {refcount}"
    if idle:
        assert (refcount[1:] == 0).all(), f"pages leaked: refcount {refcount}"
        assert not active.any(), f"active slots after idle: {active}"
        s = engine.stats()
        assert s["pages_used"] == 0 and s["running"] == 0 and s["waiting"] == 0, s


def _build_params(model, prompt, max_tokens, n, stop_at):
    base = SamplingParams(max_tokens=max_tokens, temperature=0.0, n=n)
    if stop_at is None:
        return base
    tokens, _, _ = _solo(model, prompt, base)
    if stop_at >= len(tokens) or tokens[stop_at] == EOS:
        return base
    stop = tokens[stop_at]
    params = dataclasses.replace(base, stop_token_ids=(stop,))
    # The stop condition, on the solo run: ends at the first occurrence of the stop token,
    # which is included, with reason "stop".
    got, reason, _ = _solo(model, prompt, params)
    first = tokens.index(stop)
    assert got == tokens[: first + 1], (prompt, stop, tokens, got)
    assert reason == "stop"
    _totals["stopped_by_stop_ids"] += 1
    return params


def _run_case(model, case):
    engine = _engine(model, case["chunk"], case["mode"])
    before = engine.stats()
    reqs = []
    for prompt, max_tokens, n, stop_at in case["requests"]:
        params = _build_params(model, prompt, max_tokens, n, stop_at)
        reqs.append((prompt, params))
    rids = [engine.add_request(p, sp) for p, sp in reqs]
    by_rid = dict(zip(rids, reqs))
    got = {(rid, s): [] for rid, (_, sp) in by_rid.items() for s in range(sp.n)}
    finished: dict = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for d in engine.step():
            key = (d.request_id, d.sample)
            assert key in got, f"delta for an unknown request/sample {key}"
            assert key not in finished, f"delta after {key} finished ({finished[key]}): {d}"
            got[key] += d.token_ids
            if d.finish_reason is not None:
                finished[key] = d.finish_reason
        _check_pool(engine, idle=False)
    else:
        pytest.fail(f"engine did not go idle in 2000 steps: {engine.stats()}")
    assert set(finished) == set(got), f"never finished: {set(got) - set(finished)}"
    _check_pool(engine, idle=True)
    after = engine.stats()
    _totals["preemptions"] += after["preemptions"] - before["preemptions"]
    _totals["cache_hits"] += after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    _totals["examples"] += 1

    for rid, (prompt, sp) in by_rid.items():
        tokens, reason, logprobs = _solo(model, prompt, sp)
        stop_ids = {EOS, *sp.stop_token_ids}
        for s in range(sp.n):
            out, why = got[(rid, s)], finished[(rid, s)]
            assert why in ("stop", "length")
            if why == "stop":
                assert out and out[-1] in stop_ids
                assert not stop_ids & set(out[:-1])
            else:
                assert len(out) == sp.max_tokens or len(prompt) + len(out) == CFG["max_seq_len"]
            assert (out, why) == (tokens, reason), (
                f"request {rid} sample {s} (prompt len {len(prompt)}, {sp}) differs from its solo run:\n"
                f"  solo {tokens} {reason}\n  got  {out} {why}\n  {_gap_note(tokens, out, logprobs)}"
            )


def test_engine_fuzz(tiny_model):
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=_case)
    def fuzz(case):
        try:
            _run_case(tiny_model, case)
        except BaseException:
            _engines.clear()  # a failed example may leave its engine mid-run: start clean
            raise

    fuzz()
    print("fuzz totals:", _totals)
    # The run must have exercised what it claims to: preemption/resumption and the prefix cache.
    assert _totals["preemptions"] > 0, _totals
    assert _totals["cache_hits"] > 0, _totals
    assert _totals["stopped_by_stop_ids"] > 0, _totals


def test_stop_token_included_and_reason_stop(tiny_model):
    """Deterministic stop condition: stop at the 3rd greedy token (first occurrence), in a batch
    whose tiny pool forces preemption; n=2 samples both stop the same way."""
    prompt = _BASES[1][:15]
    base = SamplingParams(max_tokens=12, temperature=0.0)
    tokens = jaxinfer.Engine(tiny_model, **CFG).generate([prompt], base)[0].token_ids
    stop = next(t for t in tokens[2:] if t != EOS)
    cut = tokens.index(stop) + 1
    sp = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop,), n=2)
    others = [_BASES[0] + [i] * 20 for i in range(3)]
    engine = jaxinfer.Engine(tiny_model, **CFG)
    outs = engine.generate([*others, prompt], [SamplingParams(max_tokens=16, temperature=0.0)] * 3 + [sp])
    out = outs[-1]
    for s in out.samples:
        assert s.token_ids == tokens[:cut] and s.token_ids[-1] == stop
        assert s.finish_reason == "stop"
    assert engine.stats()["pages_used"] == 0
