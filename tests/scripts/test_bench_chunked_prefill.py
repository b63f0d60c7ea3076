"""scripts/bench_chunked_prefill.py: a smoke run on the random-weight tiny preset (the
conftest `tiny_model`'s config), chunked vs unchunked, checking the JSON's keys and values."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from script_loader import load_script


bench = load_script("bench_chunked_prefill")

NUM_SHORT, SHORT_TOKENS, LONG_TOKENS, MAX_SEQ, CHUNK = 2, 12, 4, 64, 16
LONG_LEN = MAX_SEQ - LONG_TOKENS  # the script's default long prompt length


def test_argument_parsing():
    assert bench.parse_chunks("none,32, 64") == [None, 32, 64]
    assert bench.parse_range("16:32") == (16, 32) and bench.parse_range("8") == (8, 8)
    for bad in ("-3", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_chunks(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_range("9:2")
    s = bench.summarize([0.001, 0.002, 0.003])
    assert s["n"] == 3 and s["max"] == pytest.approx(3.0) and s["p50"] == pytest.approx(2.0)
    assert bench.summarize([])["p99"] is None
    with pytest.raises(SystemExit, match="long-after"):
        bench.main(["--preset", "tiny", "--quick", "--long-after", "30", "--short-max-tokens", "20"])


def test_smoke_run_json(tmp_path, capsys):
    out_json = tmp_path / "res.json"
    ret = bench.main([
        "--preset", "tiny", "--quick", "--max-seq-len", str(MAX_SEQ), "--num-short", str(NUM_SHORT),
        "--short-len", "4:12", "--short-max-tokens", str(SHORT_TOKENS), "--long-max-tokens", str(LONG_TOKENS),
        "--chunks", f"none,{CHUNK}", "--repeat", "2", "--json", str(out_json),
    ])
    printed = capsys.readouterr().out
    assert "unchunked" in printed and f"chunk={CHUNK}" in printed and "TTFT" in printed
    data = json.loads(out_json.read_text())
    assert data["results"] == json.loads(json.dumps(ret["results"]))
    assert set(data) >= {"model", "machine", "args", "engine", "workload", "warmup", "runs", "results",
                         "compilations_during_measured_runs", "notes"}
    assert data["args"]["quick"] is True and data["args"]["repeat"] == 2 and data["args"]["chunks"] == [None, CHUNK]
    assert data["engine"]["decode_steps"] == 1 and data["engine"]["max_seq_len"] == MAX_SEQ
    assert data["compilations_during_measured_runs"] == 0
    assert data["warmup"]["mode"] == "scenario"
    assert data["workload"]["long_prompt_len"] == LONG_LEN
    short_lens = data["workload"]["short_prompt_lens"]
    assert len(short_lens) == NUM_SHORT and all(4 <= n <= 12 for n in short_lens)
    assert set(data["runs"]) == set(data["results"]) == {"unchunked", f"chunk={CHUNK}"}

    min_steps = {"unchunked": 1, f"chunk={CHUNK}": math.ceil((LONG_LEN - 1) / CHUNK)}
    for name, runs in data["runs"].items():
        assert len(runs) == 2
        for r in runs:
            long = r["long"]
            assert long["finished"] and long["output_tokens"] == LONG_TOKENS
            assert long["ttft_ms"] > 0 and long["arrival_s"] > 0
            # the last prompt token is fed by the first decode step, so L - 1 tokens are prefilled
            assert long["steps_to_first_token"] >= min_steps[name]
            if name == "unchunked":
                assert long["steps_to_first_token"] == 1
            short = r["short"]
            assert short["all_finished"] and short["output_tokens"] == [SHORT_TOKENS] * NUM_SHORT
            # random prompts, fresh engine: no prefix-cache hit, every prompt prefilled but its last token
            assert r["stats"]["prefill_tokens"] == sum(n - 1 for n in short_lens) + LONG_LEN - 1
            assert r["stats"]["prefix_cache_hit_tokens"] == 0
            for dist in ("sync_gap_ms", "itl_ms"):
                a, w = short[dist]["all"], short[dist]["window"]
                # decode_steps=1: one token per delta, so one gap per token after the first
                assert a["n"] == NUM_SHORT * (SHORT_TOKENS - 1)
                assert 0 < w["n"] < a["n"]
                for s in (a, w):
                    assert 0 <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
                # the long request arrived mid-run: the window holds its prefill stall
                assert w["max"] <= a["max"]
            assert short["sync_gap_ms"] == short["itl_ms"]  # identical with one token per sync
            assert len(r["step_ms"]) == r["engine_steps"] and min(r["step_ms"]) >= 0
        med = data["results"][name]
        assert med["repeats"] == 2
        assert med["long_ttft_ms"] == pytest.approx(sorted(x["long"]["ttft_ms"] for x in runs)[0] / 2
                                                    + sorted(x["long"]["ttft_ms"] for x in runs)[1] / 2)
        assert med["sync_gap_ms"]["all"]["p99"] >= 0 and med["long_steps_to_first_token"] >= min_steps[name]
    chunked = data["results"][f"chunk={CHUNK}"]
    # chunking spreads the long prefill over more steps
    assert chunked["long_steps_to_first_token"] > data["results"]["unchunked"]["long_steps_to_first_token"]
