"""Quantized KV cache (EngineConfig.kv_dtype "int8" / "fp8_e4m3"; formats in
pallas_kernels/kv_quant.py).

Attention over 8-bit pages is checked two ways:
- against the float32 reference applied to the *dequantized* pages (the same function on the
  same values, so float tolerance: 1e-5 of the largest |v|, float32 summation-order noise), on every jnp decode
  path ("reference", "xla" dense views) and the chunk/prefix path;
- against attention over the *unquantized* K/V, within a bound derived from the scales. With
  per-element errors |dk| <= ek, |dv| <= ev (int8: scale / 2; fp8: 2^-4 |x| + 2^-10 * scale),
  each score moves by at most e_t = scale_attn * sum_d |q_d| ek_td, so the softmax weights move
  by a factor within exp(+-2E) (E = max_t e_t) and
      |o' - o| <= sum_t p'_t ev_t + (exp(2E) - 1) * max_t |v_t|
  (first term: V's error under the quantized weights; second: the weights' total variation
  times the values). Checked per query head on random and on outlier-heavy inputs (a few
  channels 20x larger, a few tokens 10x), where per-token int8 scales are widest.

Engine level (stories260K from the shared assets, float32 weights): perplexity with int8 KV
within 1% of float KV (fp8's stated and bounded at 3%), greedy agreement share, per-channel K
smoothing (exact in float, smaller int8 error, calibration = the written keys' RMS), fork (copy-on-
write) and prefix caching with int8 pages, save_state / load_state of the scales, the
memory budget (int8 >= 1.9x the tokens of bf16 at head_dim >= 64), and the scheduler fuzz
(no page leak, greedy equal to solo runs) rerun with int8 KV.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import SamplingParams
import jaxinfer.attention
from jaxinfer.attention import chunk_attention_reference, decode_attention, smooth_qk, write_kv
from jaxinfer.kv_smoothing import k_channel_scale
from jaxinfer.presets import get_preset
from jaxinfer.state import EngineConfig, init_state, kv_bytes_per_token, pages_for_memory
from jaxinfer.steps import insert, make_requests
from pallas_kernels import kv_quant
from pallas_kernels.paged_attention import paged_attention_reference

QUANT = {"int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn}


def _pool(rng, kv_dtype, *, pages=12, ps=8, kvh=2, hd=16, outliers=False):
    """Float K/V for every position of a one-layer pool, and the pool written by write_kv."""
    shape = (1, pages, ps, kvh, hd)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    if outliers:
        for x in (k, v):
            x[..., rng.choice(hd, 2, replace=False)] *= 20.0
            x[:, rng.integers(0, pages, 5), rng.integers(0, ps, 5)] *= 10.0
    cfg = EngineConfig(max_slots=1, page_size=ps, num_pages=pages, max_seq_len=ps * pages, kv_dtype=kv_dtype)
    mc = dataclasses.replace(get_preset("tiny"), num_layers=1, num_kv_heads=kvh, num_heads=4 * kvh, head_dim=hd)
    st = init_state(cfg, mc, jnp.float32)
    page = jnp.broadcast_to(jnp.arange(pages)[:, None], (pages, ps))
    off = jnp.broadcast_to(jnp.arange(ps)[None, :], (pages, ps))
    kp, ks, _ = write_kv(st.k_pages, st.k_scales, 0, page, off, jnp.asarray(k[0]))
    vp, vs, _ = write_kv(st.v_pages, st.v_scales, 0, page, off, jnp.asarray(v[0]))
    return k, v, (kp, vp, ks, vs)


def _dequant(pool, scales):
    """float32 values of layer 0's pages (int8 scales [pages, kv_heads, page_size]; fp8 [kv_heads])."""
    return np.asarray(kv_quant.dequantize(pool[0], scales[0]))


def _element_error_bound(x, deq_scale, dtype):
    """Per-element |x - dequantize(quantize(x))| bound (see the module docstring)."""
    if dtype == jnp.int8:  # scale / 2; deq_scale [pages, kvh, ps] -> [pages, ps, kvh, 1]
        return np.swapaxes(np.asarray(deq_scale, np.float32), 1, 2)[..., None] / 2
    return 2.0**-4 * np.abs(x) + 2.0**-10 * np.asarray(deq_scale, np.float32)[:, None]


@pytest.mark.parametrize("outliers", [False, True], ids=["random", "outliers"])
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_decode_attention_over_quantized_pages(kv_dtype, outliers):
    rng = np.random.default_rng(7 + outliers)
    pages, ps, kvh, hd, slots, qh = 12, 8, 2, 16, 4, 8
    k, v, (kp, vp, ks, vs) = _pool(rng, kv_dtype, pages=pages, ps=ps, kvh=kvh, hd=hd, outliers=outliers)
    assert kp.dtype == QUANT[kv_dtype]
    table = np.stack([rng.permutation(pages)[:5] for _ in range(slots)]).astype(np.int32)
    lengths = np.array([1, 13, 40, 29], np.int32)  # 40 = all 5 pages; others end inside a page
    q = jnp.asarray(1.5 * rng.standard_normal((slots, qh, hd)), jnp.float32)
    kd, vd = _dequant(kp, ks), _dequant(vp, vs)
    dq = paged_attention_reference(q, jnp.asarray(kd), jnp.asarray(vd), jnp.asarray(table), jnp.asarray(lengths))
    # Float tolerance: float32 rounding of scores and sums in another order ("xla" is not at
    # HIGHEST precision and sums differently), relative to the largest value (~400 with outliers).
    atol = 1e-5 * max(1.0, float(np.abs(vd).max()))
    for backend in ("reference", "xla"):
        out = decode_attention(q, kp, vp, 0, jnp.asarray(table), jnp.asarray(lengths), backend=backend,
                               k_scales=ks, v_scales=vs)
        np.testing.assert_allclose(np.asarray(out), np.asarray(dq), rtol=1e-5, atol=atol, err_msg=backend)
    # The reference's own 8-bit path equals it too (the kernel's oracle).
    ref8 = paged_attention_reference(q, kp[0], vp[0], jnp.asarray(table), jnp.asarray(lengths),
                                     k_scales=ks[0], v_scales=vs[0])
    np.testing.assert_allclose(np.asarray(ref8), np.asarray(dq), rtol=1e-6, atol=1e-6)

    # Bound vs the unquantized attention.
    exact = np.asarray(paged_attention_reference(q, jnp.asarray(k[0]), jnp.asarray(v[0]), jnp.asarray(table),
                                                 jnp.asarray(lengths)))
    dt = QUANT[kv_dtype]
    ek = _element_error_bound(k[0], ks[0], dt)
    ev = _element_error_bound(v[0], vs[0], dt)
    ek, ev = np.broadcast_to(ek, k[0].shape), np.broadcast_to(ev, v[0].shape)
    g = qh // kvh
    worst = 0.0
    for s in range(slots):
        n = lengths[s]
        t = np.arange(n)
        pg, of = table[s, t // ps], t % ps
        for h in range(qh):
            kv = h // g
            e = hd**-0.5 * (np.abs(np.asarray(q[s, h]))[None, :] * ek[pg, of, kv]).sum(-1)  # [n]
            scores = hd**-0.5 * kd[pg, of, kv] @ np.asarray(q[s, h])
            p = np.exp(scores - scores.max())
            p /= p.sum()
            bound = (p[:, None] * ev[pg, of, kv]).sum(0) + np.expm1(2 * e.max()) * np.abs(v[0][pg, of, kv]).max()
            err = np.abs(np.asarray(dq)[s, h] - exact[s, h])
            assert (err <= bound * (1 + 1e-4) + 1e-6).all(), (kv_dtype, outliers, s, h, err.max(), bound.max())
            worst = max(worst, float((err / bound).max()))
    assert worst > 0  # the comparison is not vacuous (quantization did change the output)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_chunk_attention_reads_quantized_pages(kv_dtype):
    rng = np.random.default_rng(3)
    pages, ps, kvh, hd = 12, 8, 2, 16
    _, _, (kp, vp, ks, vs) = _pool(rng, kv_dtype, pages=pages, ps=ps, kvh=kvh, hd=hd)
    table = jnp.asarray(np.stack([rng.permutation(pages)[:4] for _ in range(2)]).astype(np.int32))
    start = jnp.asarray([5, 17], jnp.int32)
    q = jnp.asarray(rng.standard_normal((2, 6, 4 * kvh, hd)), jnp.float32)
    out = chunk_attention_reference(q, kp, vp, 0, table, start, k_scales=ks, v_scales=vs)
    kd, vd = jnp.asarray(_dequant(kp, ks))[None], jnp.asarray(_dequant(vp, vs))[None]
    want = chunk_attention_reference(q, kd, vd, 0, table, start)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_rejects_bad_kv_dtype_and_scales():
    with pytest.raises(ValueError, match="kv_dtype"):
        EngineConfig(kv_dtype="int4")
    k = jnp.zeros((4, 8, 2, 16), jnp.int8)
    q, table, lengths = jnp.zeros((1, 4, 16)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match="k_scales"):
        paged_attention_reference(q, k, k, table, lengths)
    with pytest.raises(ValueError, match="k_scales"):
        paged_attention_reference(q, k, k, table, lengths, k_scales=jnp.zeros((4, 8, 2)), v_scales=jnp.zeros((4, 8, 2)))


# ----------------------------------------------------------------------------- K smoothing
def test_k_smoothing_is_exact_in_float_and_shrinks_int8_error():
    """smooth_qk's (q * c, k / c) leaves float attention unchanged (1e-5 of max |o|: float32
    rounding of the products), and with two outlier channels (20x) the int8 K error it leaves
    is under half of plain per-token int8's (measured ~7x smaller here); non-int8 pools are
    untouched."""
    rng = np.random.default_rng(3)
    t, kvh, g, hd = 64, 2, 4, 16
    q = rng.standard_normal((t, kvh * g, hd)).astype(np.float32)
    k = rng.standard_normal((t, kvh, hd)).astype(np.float32)
    v = rng.standard_normal((t, kvh, hd)).astype(np.float32)
    k[..., [3, 11]] *= 20.0
    c = jnp.asarray(np.sqrt(np.mean(k**2, axis=0)))[None]  # [layers=1, kvh, hd]: the calibrated RMS
    int8_pool, f32_pool = jnp.zeros((1, 1, 1, kvh, hd), jnp.int8), jnp.zeros((1, 1, 1, kvh, hd))

    def attn(q, k):
        return np.asarray(jaxinfer.attention.prefill_attention(q[None], k[None], jnp.asarray(v)[None], lengths=None,
                                                               backend="reference"))[0]

    ref = attn(jnp.asarray(q), jnp.asarray(k))
    qs, ks = smooth_qk(jnp.asarray(q), jnp.asarray(k), int8_pool, c, 0)
    assert np.max(np.abs(attn(qs, ks) - ref)) <= 1e-5 * np.max(np.abs(ref))
    err_plain = np.max(np.abs(attn(jnp.asarray(q), kv_quant.quantize(jnp.asarray(k), jnp.int8)[2]) - ref))
    err_smooth = np.max(np.abs(attn(qs, kv_quant.quantize(ks, jnp.int8)[2]) - ref))
    assert err_smooth < 0.5 * err_plain, (err_smooth, err_plain)
    same = smooth_qk(jnp.asarray(q), jnp.asarray(k), f32_pool, jnp.ones((1,)), 0)
    assert same[0] is not None and np.array_equal(same[0], q) and np.array_equal(same[1], k)


def test_k_channel_calibration_is_the_rms_of_the_written_keys(tiny_model):
    """k_channel_scale with caller tokens equals the per-channel RMS of the K that prefill writes
    into a float32 pool for the same tokens (another code path: the pool, not the calibration's
    attend hook); 1e-5 relative: float32 sums in a different order. The Engine's int8 state
    holds the default (random-token) calibration, positive and finite."""
    mc = tiny_model.config
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, mc.vocab_size, 40)]
    c = np.asarray(k_channel_scale(tiny_model, 64, tokens))
    cfg = EngineConfig(max_slots=1, page_size=8, num_pages=16, max_seq_len=64, kv_dtype="float32")
    state = init_state(cfg, mc, jnp.float32)
    req = make_requests(cfg, [tokens + [5]], [SamplingParams(max_tokens=2, temperature=0.0)], [0], 1, 64)
    state, _ = jax.jit(insert, static_argnums=0)(cfg, tiny_model, state, req)
    pages = np.asarray(state.page_table)[0, :5]
    k = np.asarray(state.k_pages)[:, pages].reshape(mc.num_layers, -1, mc.num_kv_heads, mc.head_dim)[:, :40]
    rms = np.sqrt(np.mean(k.astype(np.float64) ** 2, axis=1))
    np.testing.assert_allclose(c, rms, rtol=1e-5)
    e = jaxinfer.Engine(tiny_model, max_slots=2, page_size=8, num_pages=16, max_seq_len=64, kv_dtype="int8")
    kc = np.asarray(e.state.k_channel)
    assert kc.shape == (mc.num_layers, mc.num_kv_heads, mc.head_dim) and np.all(np.isfinite(kc)) and np.all(kc > 0)
    assert not np.allclose(kc, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kv_dtype="bfloat16", kv_calibration=[1, 2]), "kv_calibration calibrates an int8"),
    (dict(kv_dtype="int8", kv_calibration=[]), "non-empty sequence of token ids"),
    (dict(kv_dtype="int8", kv_calibration=[1, 2.5]), "non-empty sequence of token ids"),
    (dict(kv_dtype="int8", kv_calibration=[1, 100000]), r"outside \[0, 258\)"),
    (dict(kv_dtype="int8", kv_calibration=list(range(65))), "at most max_seq_len=64"),
])
def test_kv_calibration_rejects_bad_input(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxinfer.Engine(tiny_model, max_slots=1, page_size=8, num_pages=16, max_seq_len=64, **kwargs)


def test_init_state_rejects_bad_k_channel(tiny_model):
    mc = tiny_model.config
    cfg = EngineConfig(max_slots=1, page_size=8, num_pages=16, max_seq_len=64, kv_dtype="int8")
    with pytest.raises(ValueError, match=r"k_channel must be float32 \[4, 2, 16\]"):
        init_state(cfg, mc, jnp.float32, k_channel=np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="K smoothing of an int8 pool"):
        init_state(dataclasses.replace(cfg, kv_dtype="bfloat16"), mc, jnp.float32,
                   k_channel=np.ones((4, 2, 16), np.float32))


# ----------------------------------------------------------------------------- memory budget
@pytest.mark.parametrize("preset", ["llama-3.2-1b", "llama-3-8b"])
def test_int8_pool_holds_twice_the_tokens_of_bf16(preset):
    """Same budget: int8 pages (head_dim bytes + a 2-byte scale per token and head) hold
    2 * head_dim / (head_dim + 2) times the tokens of bf16 ones: 1.94x at head_dim 64, 1.97x at
    128 (stories260K's head_dim 8 gets only 1.6x: the per-token scale is 20% of its int8 K/V)."""
    mc = get_preset(preset)
    pages = {d: pages_for_memory(4.0, mc, 16, d) for d in (jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn)}
    assert pages[jnp.int8] >= 1.9 * pages[jnp.bfloat16], pages
    assert pages[jnp.float8_e4m3fn] >= 1.99 * pages[jnp.bfloat16], pages
    assert kv_bytes_per_token(mc, jnp.bfloat16) == 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 2


def test_engine_kv_memory_budget_and_stats(tiny_model):
    e16 = jaxinfer.Engine(tiny_model, page_size=8, max_seq_len=64, kv_dtype="bfloat16", kv_memory_gb=0.001)
    e8 = jaxinfer.Engine(tiny_model, page_size=8, max_seq_len=64, kv_dtype="int8", kv_memory_gb=0.001)
    mc = tiny_model.config
    assert e8.cfg.num_pages == pages_for_memory(0.001, mc, 8, jnp.int8)
    s16, s8 = e16.stats(), e8.stats()
    assert s16["kv_bytes_per_token"] == 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 2
    assert s8["kv_bytes_per_token"] == 2 * mc.num_layers * mc.num_kv_heads * (mc.head_dim + 2)
    for e, s in ((e16, s16), (e8, s8)):  # the pool fits the budget
        assert s["kv_pool_bytes"] <= 0.001 * 2**30
        assert s["kv_pool_bytes"] == e.cfg.num_pages * 8 * s["kv_bytes_per_token"] + (8 if s is s16 else 0)
    ratio = e8.cfg.num_pages / e16.cfg.num_pages  # head_dim 16: 2 * 16 / 18
    assert ratio >= 1.75, ratio


# ----------------------------------------------------------------------------- engine, tiny
def test_fork_prefix_cache_and_snapshot_with_int8(tiny_model, tmp_path):
    """n=2 greedy samples share the prompt's pages and copy the partial one (with its scales):
    both equal the n=1 run; a second identical request hits the prefix cache and decodes the
    same; save_state / load_state round-trips the scales."""
    prompt = list(range(3, 30))
    kw = dict(max_slots=4, page_size=8, num_pages=40, max_seq_len=96, kv_dtype="int8")
    one = jaxinfer.Engine(tiny_model, **kw).generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0]
    e = jaxinfer.Engine(tiny_model, **kw)
    two = e.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, n=2))[0]
    assert [s.token_ids for s in two.samples] == [one.token_ids] * 2
    again = e.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert e.stats()["prefix_cache_hit_tokens"] > 0 and again.token_ids == one.token_ids
    assert e.stats()["pages_used"] == 0
    assert np.asarray(e.state.k_scales).any()  # scales were written
    jaxinfer.save_state(e.state, tmp_path / "s")
    back = jaxinfer.load_state(tmp_path / "s", like=e.state)
    for a, b in zip(jax.tree.leaves(e.state), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_engine_fuzz_with_int8_kv(tiny_model, monkeypatch):
    """tests/jaxinfer/test_engine_fuzz.py's scheduler fuzz (preemption, prefix cache, chunked
    prefill, n > 1) on an int8 pool, 8 examples: every sample finishes once, greedy outputs
    equal solo runs (also int8), no page leaks."""
    import test_engine_fuzz as fuzz  # the fuzz's case generator and checks, rerun on int8 pages
    from hypothesis import HealthCheck, given, settings  # only this test uses hypothesis here

    monkeypatch.setattr(fuzz, "CFG", dict(fuzz.CFG, kv_dtype="int8"))
    monkeypatch.setattr(fuzz, "_engines", {})
    monkeypatch.setattr(fuzz, "_solo_cache", {})
    monkeypatch.setattr(fuzz, "_totals", dict.fromkeys(fuzz._totals, 0))

    @settings(max_examples=8, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=fuzz._case)
    def run(case):
        fuzz._run_case(tiny_model, case)

    run()
    assert fuzz._totals["examples"] == 8
    assert fuzz._totals["preemptions"] > 0 and fuzz._totals["cache_hits"] > 0, fuzz._totals
    assert all(e.state.k_pages.dtype == jnp.int8 for e in fuzz._engines.values())


# ----------------------------------------------------------------------------- stories260K
def _stories(assets_dir):
    path = assets_dir / "stories260K"
    return jaxinfer.load_model(path, dtype="float32"), jaxinfer.load_tokenizer(path)


def kv_scores(model, ids, kv_dtype, chunk=128):
    """(mean NLL of ids[1:] given their prefixes, top-1 prediction at each position) from the
    engine's prompt logprobs with the given KV dtype (chunked prefill: later chunks read the
    earlier chunks' pages)."""
    e = jaxinfer.Engine(model, max_slots=1, page_size=16, num_pages=40, max_seq_len=len(ids) + 1,
                        kv_dtype=kv_dtype, prefill_chunk=chunk, prefix_caching=False)
    out = e.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))[0]
    plp = out.prompt_logprobs[1:]
    return -float(np.mean([d[t] for d, t in zip(plp, ids[1:])])), [max(d, key=d.get) for d in plp]


def test_stories260k_perplexity_and_greedy_with_quantized_kv(assets_dir):
    model, tok = _stories(assets_dir)
    golden = json.loads((assets_dir / "stories260K" / "golden.json").read_text())
    ids = list(golden["shakespeare_first512"]["token_ids"])[:500]
    scores = {d: kv_scores(model, ids, d) for d in ("auto", "int8", "fp8_e4m3")}
    ppl = {d: float(np.exp(v[0])) for d, v in scores.items()}
    top1 = {d: float(np.mean(np.array(v[1]) == np.array(scores["auto"][1]))) for d, v in scores.items()}
    print("stories260K perplexity by KV dtype:", ppl, "teacher-forced top-1 agreement with float KV:", top1)
    assert abs(ppl["int8"] / ppl["auto"] - 1) < 0.01, ppl
    assert abs(ppl["fp8_e4m3"] / ppl["auto"] - 1) < 0.03, ppl
    assert top1["int8"] >= 0.97, top1  # same context: the argmax rarely moves (0.962 without K smoothing)

    # Free-running greedy: 8 story openings, 48 tokens each. Once a near tie flips one token
    # the continuations differ, so the share counted is the common prefix of each pair.
    prompts = ["Once upon a time", "Tom and Lily", "One day, a little dog", "The sun was", "Sara had a big",
               "There was a cat", "Mom said", "The boy ran"]
    sp = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    outs = {}
    for d in ("auto", "int8"):
        e = jaxinfer.Engine(model, max_slots=8, page_size=16, num_pages=64, max_seq_len=128, tokenizer=tok, kv_dtype=d)
        outs[d] = [o.token_ids for o in e.generate(prompts, sp)]
        assert e.stats()["pages_used"] == 0
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(outs["auto"], outs["int8"])]
    share = sum(prefix) / sum(len(x) for x in outs["auto"])
    identical = sum(x == y for x, y in zip(outs["auto"], outs["int8"]))
    print(f"greedy int8 vs float KV: common prefix {share:.3f} of tokens, {identical}/8 sequences identical, "
          f"prefixes {prefix}")
    # Measured 0.862 and 6/8 (without K smoothing: 0.609 and 3/8; bf16 KV: 1.0 and 8/8).
    assert share >= 0.8 and identical >= 5, (share, prefix)
