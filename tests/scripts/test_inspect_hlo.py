"""scripts/inspect_hlo.py on the pretrained stories260K: XLA's passes shrink both engine steps.

Loose on purpose: the exact counts move with every XLA release (and differ per backend); what
must hold anywhere is that fusion leaves fewer ops than the lowered module has, that fusions
formed, that dead code and constant-foldable expressions went away, and that the executable
reports a memory footprint."""

from __future__ import annotations

import json

import pytest

from script_loader import load_script

inspect_hlo = load_script("inspect_hlo")


def test_parse_hlo_both_text_forms():
    lowered = ("HloModule m\n\nadd.1 {\n  a = f32[] parameter(0)\n  b = f32[] parameter(1)\n"
               "  ROOT s = f32[] add(a, b)\n}\n\nENTRY main.2 {\n  x = f32[4]{0} parameter(0)\n"
               "  c = f32[] constant(0)\n  two = f32[] constant(2)\n  dead = f32[] multiply(two, two)\n"
               "  r = f32[] reduce(x, c), dimensions={0}, to_apply=add.1\n  ROOT n = f32[] negate(r)\n}\n")
    a = inspect_hlo.analyse(lowered)
    assert a["ops"] == 5 and a["op_counts"]["constant"] == 2  # the reducer's add is not counted
    assert a["dead_instructions"] == 2  # `two` and `dead` do not reach the ROOT
    assert a["constant_foldable"] == 1 and a["fusions"] == 0
    compiled = ("HloModule m\n\n%fused_computation (p: f32[4]) -> f32[4] {\n  %p = f32[4]{0} parameter(0)\n"
                "  %e = f32[4]{0} exponential(f32[4]{0} %p)\n  ROOT %m = f32[4]{0} negate(%e)\n}\n\n"
                "ENTRY %main (x: f32[4]) -> f32[4] {\n  %x = f32[4]{0} parameter(0)\n"
                "  ROOT %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation\n}\n")
    b = inspect_hlo.analyse(compiled)
    assert (b["ops"], b["fusions"], b["fused_ops"], b["fusion_kinds"]) == (1, 1, 2, {"kLoop": 1})


def test_inspect_hlo_on_stories260k(assets_dir, tmp_path, capsys):
    out = tmp_path / "hlo.json"
    res = inspect_hlo.main(["--model", str(assets_dir / "stories260K"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "== prefill" in printed and "== decode_steps" in printed
    assert json.loads(out.read_text())["steps"].keys() == {"prefill", "decode_steps"}
    for step, r in res["steps"].items():
        before, after = r["before"], r["after"]
        assert after["ops"] < before["ops"], step  # fused op count < unfused op count
        assert after["fusions"] > 0 and after["fused_ops"] > after["fusions"], step
        assert after["dead_instructions"] == 0 and after["constant_foldable"] < before["constant_foldable"], step
        labels = after["fusions_by_label"]
        assert "RMSNorm" in labels and "rotary" in labels, (step, sorted(labels))
        assert r["memory"]["argument_size_in_bytes"] > 0 and r["memory"]["total_bytes"] > 0, step


def test_unknown_step():
    with pytest.raises(SystemExit, match="unknown --steps"):
        inspect_hlo.main(["--steps", "prefill,verify"])
