"""scripts/eval_quant.py: mode parsing, --help, and the stories260K quality table (fp32, int8, int4-g32
RTN, GPTQ-4bit-g32, NF4) on the first 4096 tinyshakespeare tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "eval_quant.py"


eq = load_script("eval_quant")


def test_parse_modes():
    m = eq.parse_mode("gptq4-g32-act")
    assert (m.method, m.bits, m.group_size) == ("gptq", 4, 32)
    assert m.options == {"bits": 4, "group_size": 32, "act_order": True}
    assert eq.parse_mode("int4-g32").options == {"bits": 4, "group_size": 32}
    assert eq.parse_mode("int3-pc-asym").options == {"bits": 3, "group_size": None, "sym": False}
    assert eq.parse_mode("int8").method == "int8" and eq.parse_mode("int8").group_size is None
    assert eq.parse_mode("gptq").options == {"bits": 4} and eq.parse_mode("gptq").group_size == 128
    assert eq.parse_mode("nf4").group_size == 64 and eq.parse_mode("nf4-g32").group_size == 32
    assert eq.parse_mode("llm_int8-t4").options == {"threshold": 4.0}
    assert [m.name for m in eq.parse_modes("int8,nf4")] == ["fp32", "int8", "nf4"]  # the baseline is added
    for bad in ("int5", "gptq4-x", "nf4-act", "fp32-g32", "llm_int8-g32", "int4-g0", "fp16"):
        with pytest.raises(ValueError):
            eq.parse_mode(bad)
    with pytest.raises(ValueError, match="twice"):
        eq.parse_modes("int8,int8")


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        eq.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--modes" in out and "--calib-samples" in out and "not representative" in out.lower().replace("\n", " ")


def test_bad_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        eq.main(["--model", str(SCRIPT.parent), "--modes", "int5"])
    assert e.value.code == 2


def test_stories260k_table(assets_dir, tmp_path, capsys):
    model = assets_dir / "stories260K"
    text = assets_dir / "text" / "tinyshakespeare.txt"
    if not (model / "config.json").is_file() or not text.is_file():
        pytest.skip(f"stories260K or tinyshakespeare missing under {assets_dir}")
    out_json = tmp_path / "eq.json"
    modes = ["fp32", "int8", "int4-g32", "gptq4-g32", "nf4"]
    eq.main(["--model", str(model), "--text", str(text), "--max-tokens", "4096", "--window", "256", "--stride", "128",
             "--modes", ",".join(modes), "--calib-samples", "32", "--calib-seq-len", "128", "--decode-tokens", "8",
             "--repeats", "1", "--no-progress", "--json", str(out_json)])
    printed = capsys.readouterr().out
    res = json.loads(out_json.read_text())
    rows = res["modes"]
    assert list(rows) == modes
    assert res["calibration"] == {"text": str(text), "offset": 8192, "samples": 32, "seq_len": 128}
    for name, r in rows.items():
        assert r["tokens_scored"] == 4095
        assert math.isfinite(r["perplexity"]) and r["perplexity"] == pytest.approx(math.exp(r["nll"]))
        assert r["weight_bytes"] > 0 and r["fp32_weight_bytes"] == rows["fp32"]["weight_bytes"]
        assert r["size_ratio"] == pytest.approx(r["fp32_weight_bytes"] / r["weight_bytes"])
        assert r["tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["decode_tokens"] == 8
        assert name in printed
    fp32 = rows["fp32"]
    # The golden fp32 perplexity (eval_perplexity, window 256 stride 128) and the earlier measurement.
    assert fp32["perplexity"] == pytest.approx(66.55, abs=0.01)
    assert fp32["size_ratio"] == 1.0 and fp32["ppl_delta_pct"] == 0.0
    assert abs(rows["int8"]["perplexity"] / fp32["perplexity"] - 1) < 0.01
    # GPTQ beats round-to-nearest at the same bits and group size (65.26 vs 72.43 measured).
    assert rows["gptq4-g32"]["perplexity"] < rows["int4-g32"]["perplexity"] - 3.0
    assert rows["gptq4-g32"]["weight_bytes"] == rows["int4-g32"]["weight_bytes"]
    # Sizes: 4-bit codes packed two per byte plus per-group scales / zeros.
    assert 3.5 < rows["int8"]["size_ratio"] < 4.0
    assert 5.0 < rows["int4-g32"]["size_ratio"] < 8.0 and 5.0 < rows["nf4"]["size_ratio"] < 8.0
    assert rows["int4-g32"]["ragged_groups"] == ["w_down (K=172: 5x32+12)"]
    assert "not representative" in printed and "Δppl%" in printed
