"""ONNX export (jaxinfer/onnx_export.py): the graphs' interface, logits under ONNX Runtime's CPU EP
equal to jaxinfer's within 1e-4 relative (fp32), and greedy generation through the exported
decode step equal to the Engine's. Models: the pretrained stories260K and random HF checkpoints
(GQA untied; Qwen2 GQA + tied embeddings + q/k/v bias; Mistral's sliding window)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxinfer
from jaxinfer import onnx_export as ox

REASON = ox.onnx_available()
needs_onnx = pytest.mark.skipif(REASON is not None, reason=f"ONNX packages absent: {REASON}")
RTOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]


def assert_close(got, ref):
    """Within 1e-4 relative: elementwise rtol, with atol 1e-4 of the largest |logit| (a logit near 0
    has no relative scale of its own)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def models(assets_dir, tmp_path_factory):
    from hf_oracle import make_checkpoint

    out = {"stories260K": jaxinfer.load_model(assets_dir / "stories260K")}
    for name in ("llama_gqa", "qwen2_bias", "mistral_window"):
        path = tmp_path_factory.mktemp(name)
        make_checkpoint(path, name, seed=1)
        out[name] = jaxinfer.load_model(path)
    return out


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """(forward session, decode session) per model, exported once."""
    if REASON is not None:
        pytest.skip(f"ONNX packages absent: {REASON}")
    d = tmp_path_factory.mktemp("onnx")
    return {name: tuple(ox.ort_session(ox.export_onnx(m, d / f"{name}-{k}.onnx", kind=k), threads=1)
                        for k in ox.KINDS)
            for name, m in models.items()}


def test_package_imports_without_onnx():
    """onnx / jax2onnx / onnxruntime are optional: import jaxinfer with them blocked, and the export
    says what to install."""
    code = ("import sys\n"
            "for m in ('onnx', 'jax2onnx', 'onnxruntime'): sys.modules[m] = None\n"
            "import jaxinfer\n"
            "try:\n"
            "    jaxinfer.export_onnx(jaxinfer.dummy_model(jaxinfer.get_preset('tiny')), '/nonexistent/x.onnx')\n"
            "except ImportError as e:\n"
            "    print('hint' if '.[onnx]' in str(e) else e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAXINFER_CACHE_DIR": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "hint"


@needs_onnx
def test_graph_interface(models, exported):
    import onnx

    cfg = models["stories260K"].config
    fwd, dec = exported["stories260K"]
    (ids,) = fwd.get_inputs()
    assert (ids.name, ids.type, ids.shape) == ("input_ids", "tensor(int64)", ["batch_size", "sequence_length"])
    logits = fwd.get_outputs()[0]
    assert (logits.name, logits.type, logits.shape) == (
        "logits", "tensor(float)", ["batch_size", "sequence_length", cfg.vocab_size])
    inputs = {i.name: (i.type, i.shape) for i in dec.get_inputs()}
    kv = ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
    assert inputs == {"input_ids": ("tensor(int64)", ["batch_size", "sequence_length"]),
                      "attention_mask": ("tensor(int64)", ["batch_size", "total_sequence_length"]),
                      "position_ids": ("tensor(int64)", ["batch_size", "sequence_length"]),
                      **{n: ("tensor(float)", kv) for n in ox.past_names(cfg.num_layers)}}
    outputs = [(o.name, o.shape) for o in dec.get_outputs()]
    assert outputs[0] == ("logits", ["batch_size", "sequence_length", cfg.vocab_size])
    assert outputs[1:] == [(n, ["batch_size", cfg.num_kv_heads, "total_sequence_length", cfg.head_dim])
                           for n in ox.present_names(cfg.num_layers)]
    meta = fwd.get_modelmeta().custom_metadata_map
    assert meta["jaxinfer.kind"] == "forward" and meta["jaxinfer.weights"] == "float32"
    # no hand-built model: the only nodes added after conversion are the int64 -> int32 casts
    path = Path(fwd._model_path)
    nodes = onnx.load(str(path)).graph.node
    assert [n.name for n in nodes if n.name.endswith("_to_int32")] == ["input_ids_to_int32"]


@needs_onnx
@pytest.mark.parametrize("name", ["stories260K", "llama_gqa", "qwen2_bias", "mistral_window"])
def test_forward_logits_match(models, exported, name):
    model, (fwd, _) = models[name], exported[name]
    rng = np.random.default_rng(0)
    for shape in ((2, 13), (1, 5), (3, 1)):  # dynamic batch and sequence
        ids = rng.integers(0, model.config.vocab_size, shape)
        assert_close(ox.ort_forward(fwd, ids), jaxinfer.forward(model, ids))


@needs_onnx
@pytest.mark.parametrize("name", ["stories260K", "llama_gqa", "qwen2_bias", "mistral_window"])
def test_decode_step_matches_forward(models, exported, name):
    """Prefill with an empty past, then three single-token steps feeding the presents back; a
    left-padded row in the same batch gives the logits it gives alone."""
    model, (_, dec) = models[name], exported[name]
    cfg = model.config
    rng = np.random.default_rng(1)
    seq = rng.integers(0, cfg.vocab_size, 14)
    ref = np.asarray(jaxinfer.forward(model, seq[None]))[0]  # [14, vocab]
    short = rng.integers(0, cfg.vocab_size, 6)
    ref_short = np.asarray(jaxinfer.forward(model, short[None]))[0]
    p = 11  # prompt length: rows are (seq[:11], short left-padded to 11)
    ids = np.stack([seq[:p], np.concatenate([np.zeros(p - 6, np.int64), short])])
    mask = np.stack([np.ones(p, np.int64), (np.arange(p) >= p - 6).astype(np.int64)])
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    past = {n: np.zeros((2, cfg.num_kv_heads, 0, cfg.head_dim), np.float32) for n in ox.past_names(cfg.num_layers)}
    out = dec.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
    assert_close(out[0][0], ref[:p])
    assert_close(out[0][1, p - 6:], ref_short)
    assert all(o.shape == (2, cfg.num_kv_heads, p, cfg.head_dim) for o in out[1:])
    for step in range(p, 14):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        feed = {"input_ids": np.array([[seq[step]], [seq[step]]]), "attention_mask": mask,
                "position_ids": pos[:, -1:] + 1, **dict(zip(ox.past_names(cfg.num_layers), out[1:]))}
        pos = feed["position_ids"]
        out = dec.run(None, feed)
        assert_close(out[0][0, 0], ref[step])
        assert out[1].shape[2] == step + 1


@needs_onnx
@pytest.mark.parametrize("name", ["stories260K", "qwen2_bias"])
def test_greedy_generation_matches_engine(models, exported, name):
    model, (_, dec) = models[name], exported[name]
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, model.config.vocab_size, int(n)).tolist() for n in rng.integers(1, 40, 8)]
    got = ox.ort_generate(dec, prompts, 24)
    engine = jaxinfer.Engine(model, max_slots=8, page_size=16, num_pages=128, max_seq_len=128)
    outs = engine.generate(prompts, jaxinfer.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert got == [o.token_ids for o in outs]


@needs_onnx
def test_jax_step_functions_match_forward(models):
    """The traced functions themselves (jitted in JAX, no ONNX): forward_logits and a decode step."""
    import jax

    model = models["llama_gqa"]
    em = ox.export_form(model)
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, (2, 9))
    ref = np.asarray(jaxinfer.forward(model, ids))
    assert_close(jax.jit(ox.forward_logits)(em, ids), ref)
    cfg = model.config
    past = [np.zeros((2, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.num_layers)
    pos = np.broadcast_to(np.arange(9), (2, 9))
    out = jax.jit(ox.decode_step)(em, ids, np.ones((2, 9), np.int32), pos, *past)
    assert_close(out[0], ref)


@needs_onnx
@pytest.mark.parametrize("method,options", [("int8", {}), ("int4", {"group_size": 20})])
def test_quantized_export_matches_quantized_forward(models, tmp_path, method, options):
    """Quantized weights export as dequantize-then-MatMul over their uint8 codes: ORT's logits
    equal jaxinfer's forward of the same quantized model (int4 in groups of 20: K = 32 and 48 end
    in a shorter group, the g_idx path). The small random model: jax2onnx's conversion time grows
    faster than linearly with the dequantization nodes."""
    import onnx

    q = jaxinfer.quantize(models["llama_gqa"], method, **options)
    path = ox.export_onnx(q, tmp_path / f"{method}.onnx")
    sess = ox.ort_session(path, threads=1)
    assert "dequantize-then-MatMul" in sess.get_modelmeta().custom_metadata_map["jaxinfer.weights"]
    ids = np.random.default_rng(4).integers(0, q.config.vocab_size, (2, 12))
    assert_close(ox.ort_forward(sess, ids), jaxinfer.forward(q, ids))
    dense = ox.export_onnx(models["llama_gqa"], tmp_path / "fp32.onnx")
    weights = [sum(len(t.raw_data) for t in onnx.load(str(f)).graph.initializer) for f in (path, dense)]
    assert weights[0] < 0.7 * weights[1]  # codes, not fp32 weights, are stored


def test_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        ox.export_onnx(jaxinfer.dummy_model(jaxinfer.get_preset("tiny")), "x.onnx", kind="prefill")
