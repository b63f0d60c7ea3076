"""jaxinfer.quant.quantize: each quantizer against a plain NumPy implementation of its definition,
GPTQ against round-to-nearest and a NumPy GPTQ, LLM.int8 against bitsandbytes (its checkpoint,
its reference logits and, when installed, its CPU matmul), the orbax round trip and the script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer.quant import QuantizedWeight, load_quantized_orbax, quantize, save_quantized
from jaxinfer.quant.gptq import gptq_quantize, hessian
from jaxinfer.quant.quantize import LINEAR_KEYS, NF4_TABLE, gptq, llm_int8, nf4, rtn_affine, to_quantized_weight

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "quantize.py"


# ---------------------------------------------------------------------------------------------
# Plain NumPy definitions (element by element where it is cheap)


def ref_affine(w, bits, group, sym):
    """codes, scales [G, N], zeros [G, N] of round-to-nearest on GPTQ's affine grid."""
    k, n = w.shape
    g = k if group is None else group
    maxq = 2**bits - 1
    ngroups = -(-k // g)
    codes = np.zeros((k, n), np.int64)
    scales = np.zeros((ngroups, n), np.float32)
    zeros = np.zeros((ngroups, n), np.int64)
    for gi in range(ngroups):
        rows = w[gi * g:(gi + 1) * g].astype(np.float64)
        for j in range(n):
            lo, hi = min(rows[:, j].min(), 0.0), max(rows[:, j].max(), 0.0)
            if sym:
                hi = max(-lo, hi)
                lo = -hi if lo < 0 else lo
            if lo == 0 and hi == 0:
                lo, hi = -1.0, 1.0
            scale = float(np.float32((hi - lo) / maxq))
            zero = (maxq + 1) // 2 if sym else round(-lo / scale)
            scales[gi, j], zeros[gi, j] = scale, zero
            for r in range(rows.shape[0]):
                codes[gi * g + r, j] = min(max(round(rows[r, j] / scale) + zero, 0), maxq)
    return codes, scales, zeros


def dequant_ref(codes, scales, zeros, group_of_row):
    return (codes - zeros[group_of_row]) * scales[group_of_row]


def as_weight(arrays):
    return jax.tree.map(lambda a: a[0], to_quantized_weight([arrays]))


# ---------------------------------------------------------------------------------------------
# Round to nearest


@pytest.mark.parametrize("bits, group, sym", [
    (8, None, True), (8, None, False), (4, 32, True), (4, 32, False), (4, 16, False), (3, 32, True),
    (3, 16, False), (2, 16, False), (4, 24, False),  # 24 does not divide 64: a shorter last group
])
def test_rtn_codes_and_dequantization(bits, group, sym):
    rng = np.random.default_rng(bits * 100 + (group or 0))
    w = (rng.standard_normal((64, 12)) * 0.1 + rng.standard_normal(12) * 0.05).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column
    got = rtn_affine(w, bits, group, sym)
    codes, scales, zeros = ref_affine(w, bits, group, sym)
    np.testing.assert_array_equal(got["codes"], codes)
    np.testing.assert_array_equal(got["scales"], scales)
    np.testing.assert_array_equal(got["zeros"], zeros)
    if not sym:
        assert (zeros != (2**bits) // 2).any() and (zeros != 0).any()  # real zero points
    qw = as_weight(got)
    assert qw.bits == bits and qw.shape == w.shape
    rows = np.arange(64) // (group or 64)
    np.testing.assert_allclose(np.asarray(qw.dequantize()), dequant_ref(codes, scales, zeros, rows), rtol=1e-6, atol=1e-7)
    # within half a step of the weight wherever the grid covers it
    assert np.all(np.abs(np.asarray(qw.dequantize()) - w) <= scales[rows] * 0.5 + 1e-6)


def test_quantize_model_keeps_the_rest_dense(tiny_model):
    q = quantize(tiny_model, "int4", group_size=32, sym=False)
    layers = q.params["layers"]
    for key in LINEAR_KEYS:
        qw = layers[key]
        assert isinstance(qw, QuantizedWeight) and qw.kind == "affine" and qw.bits == 4
        dense = np.asarray(tiny_model.params["layers"][key])
        for i in (0, tiny_model.config.num_layers - 1):
            codes, scales, zeros = ref_affine(dense[i], 4, 32, False)
            want = dequant_ref(codes, scales, zeros, np.arange(dense.shape[1]) // 32)
            got = np.asarray(jax.tree.map(lambda a: a[i], qw).dequantize())
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for name in ("embed", "final_norm"):
        np.testing.assert_array_equal(q.params[name], tiny_model.params[name])
    np.testing.assert_array_equal(layers["attn_norm"], tiny_model.params["layers"]["attn_norm"])
    logits = np.asarray(jaxinfer.forward(q, np.array([[1, 2, 3, 4, 5]])))
    dense_logits = np.asarray(jaxinfer.forward(tiny_model, np.array([[1, 2, 3, 4, 5]])))
    assert np.isfinite(logits).all() and np.abs(logits - dense_logits).max() < 0.3 * np.abs(dense_logits).max()
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q, "int8")
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize(tiny_model, "int5")


# ---------------------------------------------------------------------------------------------
# NF4


def test_nf4_table_is_bitsandbytes():
    assert NF4_TABLE.dtype == np.float32 and NF4_TABLE[0] == -1.0 and NF4_TABLE[7] == 0.0 and NF4_TABLE[15] == 1.0
    np.testing.assert_array_equal(NF4_TABLE[8], np.float32(0.07958029955625534))


def test_nf4_codes():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((128, 10)).astype(np.float32)
    got = nf4(w, 64)
    for b in range(2):
        block = w[b * 64:(b + 1) * 64]
        absmax = np.abs(block).max(axis=0)
        np.testing.assert_array_equal(got["scales"][b], absmax)
        scaled = block / absmax
        nearest = np.argmin(np.abs(scaled[..., None] - NF4_TABLE), axis=-1)
        np.testing.assert_array_equal(got["codes"][b * 64:(b + 1) * 64], nearest)
    qw = as_weight(got)
    assert qw.kind == "table"
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), NF4_TABLE[got["codes"]] * np.repeat(got["scales"], 64, 0))


def test_nf4_matches_bitsandbytes():
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    rng = np.random.default_rng(5)
    w = rng.standard_normal((128, 6)).astype(np.float32)  # [K, N]; bnb quantizes HF's [N, K]
    packed, state = F.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w.T)), blocksize=64, quant_type="nf4")
    p = packed.numpy().reshape(-1)
    codes_nk = np.empty(p.size * 2, np.uint8)
    codes_nk[0::2], codes_nk[1::2] = p >> 4, p & 0xF
    got = nf4(w, 64)
    np.testing.assert_array_equal(got["codes"], codes_nk.reshape(6, 128).T)
    np.testing.assert_array_equal(got["scales"], state.absmax.numpy().reshape(6, 2).T)


# ---------------------------------------------------------------------------------------------
# GPTQ


def ref_gptq(w, h, bits, group, sym, act_order, percdamp=0.01):
    """GPTQ without lazy batching: every update applied at once, column by column."""
    W = w.T.astype(np.float64).copy()
    H = h.astype(np.float64).copy()
    n, k = W.shape
    maxq = 2**bits - 1
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * np.mean(np.diag(H)) * np.eye(k)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    codes = np.zeros((n, k), np.int64)
    for i in range(k):
        if i % group == 0:
            codes_g, scales_g, zeros_g = ref_affine(W[:, i:i + group].T.astype(np.float64), bits, None, sym)
            scale, zero = scales_g[0].astype(np.float64), zeros_g[0]
        q = np.clip(np.round(W[:, i] / scale) + zero, 0, maxq)
        codes[:, i] = q
        err = (W[:, i] - (q - zero) * scale) / U[i, i]
        W[:, i:] -= np.outer(err, U[i, i:])
    inv = np.argsort(perm)
    return codes[:, inv].T, (np.arange(k) // group)[inv]


def correlated_inputs(rng, n, k):
    base = rng.standard_normal((n, k // 4))
    x = base @ rng.standard_normal((k // 4, k)) + 0.3 * rng.standard_normal((n, k))
    return (x * rng.uniform(0.2, 3.0, k)).astype(np.float32)


@pytest.mark.parametrize("bits, act_order, sym", [(4, False, True), (3, True, False), (8, True, True)])
def test_gptq_matches_numpy_reference(bits, act_order, sym):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((16, 5)).astype(np.float32)
    h = hessian(correlated_inputs(rng, 64, 16))
    # blocksize 4 with groups of 8: the lazy block updates are exercised and every group starts
    # on a block boundary, where both versions have applied every update.
    r = gptq_quantize(w, h, bits, 8, sym, act_order, 0.01, blocksize=4)
    codes, g_idx = ref_gptq(w, h, bits, 8, sym, act_order)
    np.testing.assert_array_equal(r.codes, codes)
    np.testing.assert_array_equal(r.g_idx, g_idx)
    if act_order:
        assert not np.all(np.diff(r.g_idx) >= 0)  # groups follow descending diag(H), not k // 8
        order = np.argsort(-np.diag(h), kind="stable")
        np.testing.assert_array_equal(r.g_idx[order], np.arange(16) // 8)


@pytest.mark.parametrize("bits, group, act_order", [(4, 32, False), (3, 32, False), (4, 32, True), (8, None, False)])
def test_gptq_beats_round_to_nearest(bits, group, act_order):
    rng = np.random.default_rng(10 + bits)
    k, n = 128, 48
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = correlated_inputs(rng, 1024, k)
    g = gptq(w, hessian(x), bits, group, True, act_order)
    rtn = rtn_affine(w, bits, group, True)
    assert (g["g_idx"] is not None) == act_order
    err_gptq = np.linalg.norm(x @ w - x @ np.asarray(as_weight(g).dequantize()))
    err_rtn = np.linalg.norm(x @ w - x @ np.asarray(as_weight(rtn).dequantize()))
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


def test_gptq_model_sequential(tiny_model):
    rng = np.random.default_rng(0)
    calib = rng.integers(0, tiny_model.config.vocab_size, (4, 32))
    q = quantize(tiny_model, "gptq", bits=4, group_size=32, act_order=True, sym=False, calibration=calib)
    wq = q.params["layers"]["wq"]
    assert wq.g_idx is not None and wq.g_idx.shape == (tiny_model.config.num_layers, tiny_model.config.hidden_size)
    rtn = quantize(tiny_model, "int4", group_size=32, sym=False)
    tokens = rng.integers(0, tiny_model.config.vocab_size, (2, 16))
    dense = np.asarray(jaxinfer.forward(tiny_model, tokens))
    err_gptq = np.abs(np.asarray(jaxinfer.forward(q, tokens)) - dense).mean()
    err_rtn = np.abs(np.asarray(jaxinfer.forward(rtn, tokens)) - dense).mean()
    assert err_gptq < err_rtn
    with pytest.raises(ValueError, match="calibration"):
        quantize(tiny_model, "gptq")


# ---------------------------------------------------------------------------------------------
# LLM.int8


def oracle(assets_dir, name):
    return assets_dir / "quant_oracles" / name


def test_llm_int8_weights_are_bitsandbytes(assets_dir):
    base = jaxinfer.load_model(oracle(assets_dir, "base"))
    ours = quantize(base, "llm_int8")
    theirs = jaxinfer.load_model(oracle(assets_dir, "bnb_int8"))
    for key in LINEAR_KEYS:
        a, b = ours.params["layers"][key], theirs.params["layers"][key]
        assert (a.kind, a.threshold, a.bits) == ("llm_int8", 6.0, 8)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scales, b.scales)


def test_llm_int8_logits_within_10_percent(assets_dir):
    """Distance: mean absolute logit difference over all [2, 24, 512] logits.

    bitsandbytes' int8 forward is chaotic at the rounding level (a 1-ulp change of one activation
    can move an int8 code or an fp16 value across a rounding boundary, and everything after it in
    that sequence): perturbing the embeddings of bnb's own model by 1 ulp moved its logits by up to
    36% of its distance from fp32 (max-abs). `QuantizedWeight.matmul` reproduces bnb's CPU matmul
    bit for bit (test below; with bnb's layers replaced by it, the whole torch model matches the
    reference to 2.4e-7), but jaxinfer's float32 attention / norms differ from torch's in the last
    bits, and one such flip at token 6 of the second sequence remains. Measured: mean-abs 6.6%,
    RMS 10.7%, max-abs 13.5% (the first sequence: 1e-6, i.e. identical); before the fix: max-abs 36%."""
    base_dir = oracle(assets_dir, "base")
    fp32 = np.load(base_dir / "reference_logits.npz")
    bnb = np.load(base_dir / "llm_int8_reference_logits.npz")
    np.testing.assert_array_equal(fp32["input_ids"], bnb["input_ids"])
    model = quantize(jaxinfer.load_model(base_dir), "llm_int8")
    ours = np.asarray(jaxinfer.forward(model, bnb["input_ids"]))
    ref_distance = np.abs(fp32["logits"] - bnb["logits"]).mean()
    assert np.abs(ours - bnb["logits"]).mean() <= 0.10 * ref_distance
    first = np.abs(ours[0] - bnb["logits"][0]).max()
    assert first <= 0.10 * np.abs(fp32["logits"][0] - bnb["logits"][0]).max()  # measured ~1e-6


def test_llm_int8_matmul_bit_exact_vs_bitsandbytes():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.autograd._functions import MatmulLtState

    rng = np.random.default_rng(0)
    k, n = 128, 96
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((2, 24, k)).astype(np.float32)
    x[..., [3, 50, 77]] *= 9.0  # outlier features
    x[1, 5, 20] = 6.0  # exactly at the threshold: an outlier (|x| >= threshold)
    arrays = llm_int8(w)
    cb = torch.from_numpy(np.ascontiguousarray((arrays["codes"].astype(np.int16) - 128).T.astype(np.int8)))
    state = MatmulLtState()
    state.CB, state.SCB = cb, torch.from_numpy(arrays["scales"][0] * np.float32(127.0)).half().float()
    state.threshold, state.has_fp16_weights, state.is_training = 6.0, False, False
    with torch.no_grad():
        want = bnb.matmul(torch.from_numpy(x), cb, state=state, threshold=6.0).numpy()
    qw = as_weight(arrays)
    got = np.asarray(jax.jit(lambda q, a: q.matmul(a))(qw, jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# Orbax round trip and the script


@pytest.mark.parametrize("method, options", [
    ("int4", {"group_size": 32, "sym": False}), ("nf4", {}), ("llm_int8", {}),
    ("gptq", {"bits": 3, "group_size": 32, "act_order": True}),
])
def test_orbax_round_trip(tiny_model, tmp_path, method, options):
    if method == "gptq":
        options = {**options, "calibration": np.arange(64).reshape(2, 32) % tiny_model.config.vocab_size}
    q = quantize(tiny_model, method, **options)
    save_quantized(q, tmp_path / "q")
    r = load_quantized_orbax(tmp_path / "q")
    assert r.config == q.config
    assert jax.tree.structure(r.params) == jax.tree.structure(q.params)
    for a, b in zip(jax.tree.leaves(q.params), jax.tree.leaves(r.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # Same config, tree (its static quantization metadata included) and leaves make the same
    # model; one forward checks the restored one runs (an Engine generation here only repeated
    # that, at ~20 s a method).
    tokens = np.array([[1, 5, 9, 2, 7, 7, 3]])
    np.testing.assert_array_equal(jaxinfer.forward(q, tokens), jaxinfer.forward(r, tokens))


def test_not_an_orbax_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a jaxinfer quantized checkpoint"):
        load_quantized_orbax(tmp_path)


def test_script_end_to_end(assets_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("quantize_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model_dir = assets_dir / "stories260K"
    out = tmp_path / "gptq"
    summary = script.main(["--model", str(model_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
                           "--calibration", str(assets_dir / "text" / "tinyshakespeare.txt"),
                           "--calib-samples", "2", "--calib-seq-len", "64", "--out", str(out), "--no-progress"])
    assert summary["method"] == "gptq" and summary["bits"] == 4 and summary["group_size"] == 32
    model = load_quantized_orbax(out)
    assert isinstance(model.params["layers"]["w_down"], QuantizedWeight)
    assert model.params["layers"]["w_down"].g_idx is not None  # 172 rows: a shorter last group
    dense = jaxinfer.load_model(model_dir)
    tokens = np.array([[1, 400, 33, 79, 12, 300]])
    a = np.asarray(jaxinfer.forward(model, tokens))
    assert np.isfinite(a).all()
    # Close to the dense model where it matters: mean NLL of held-out Shakespeare (not the
    # calibration slice) within 10% of the dense model's. (GPTQ on 2 x 64 calibration tokens
    # minimises the error on that distribution, not on arbitrary ids: a max-|logit| bound on a
    # random probe fails for a correct GPTQ. A broken quantization -- e.g. uniform logits,
    # NLL log(512) = 6.24 vs dense 5.49 -- fails this.)
    tok = jaxinfer.load_tokenizer(model_dir)
    held_out = tok.encode((assets_dir / "text" / "tinyshakespeare.txt").read_text()[100000:104000])[:256]
    probe = np.asarray([[1] + held_out])

    def nll(m):
        lp = np.asarray(jax.nn.log_softmax(jaxinfer.forward(m, probe)[0, :-1]))
        return -lp[np.arange(len(held_out)), held_out].mean()

    assert nll(model) < 1.1 * nll(dense)
    # The script's output is a checkpoint load_model reads (as saved, no re-quantization).
    again = jaxinfer.load_model(out)
    assert isinstance(again.params["layers"]["w_down"], QuantizedWeight)
    np.testing.assert_array_equal(np.asarray(jaxinfer.forward(again, tokens)), a)
