"""scripts/export_onnx.py and scripts/eval_onnx_quant.py's ORT scoring on stories260K (the export
itself is tested in tests/jaxinfer/test_onnx_export.py)."""

from __future__ import annotations

import numpy as np
import pytest

from script_loader import load_script

for _m in ("onnx", "jax2onnx", "onnxruntime"):
    pytest.importorskip(_m, reason="the optional 'onnx' extra (pip install -e '.[onnx]') is not installed")

export_onnx = load_script("export_onnx")
eval_onnx_quant = load_script("eval_onnx_quant")


def test_export_script_and_ort_perplexity_scoring(assets_dir, tmp_path):
    import stride_perplexity as sp

    import jaxinfer
    from jaxinfer import onnx_export as ox

    out = tmp_path / "model.onnx"
    summary = export_onnx.main(["--model", str(assets_dir / "stories260K"), "--out", str(out)])
    assert out.exists() and summary["out"] == str(out) and summary["kind"] == "forward"
    assert summary["logits_max_rel_diff"] < 1e-4  # fp32 both sides: the script's own tolerance
    # eval_onnx_quant scores ORT's logits in float64 on the host, jaxinfer in float32 on device
    # (stride_perplexity.token_nll): per-token NLLs agree to float32 rounding of the logits.
    model = jaxinfer.load_model(assets_dir / "stories260K")
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 24)).astype(np.int32)
    got = eval_onnx_quant.ort_nll(ox.ort_session(out, threads=1))(tokens)
    np.testing.assert_allclose(got, np.asarray(sp.token_nll(model, tokens)), rtol=1e-4, atol=1e-4)
