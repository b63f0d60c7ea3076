"""scripts/benchmark.py end to end on the tiny preset (both modes + the HF baseline, JSON and
plots) and its workload helpers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from script_loader import load_script

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


benchmark = load_script("benchmark")


def test_length_distributions():
    import argparse

    assert benchmark.parse_dist("fixed:7") == ("fixed", 7)
    assert benchmark.parse_dist("uniform:2:9") == ("uniform", 2, 9)
    assert benchmark.parse_dist("sharegpt") == ("sharegpt",)
    for bad in ("fixed:0", "uniform:9:2", "lognormal", "fixed:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            benchmark.parse_dist(bad)
    rng = np.random.default_rng(0)
    u = benchmark.draw_lengths(("uniform", 2, 9), "input", 1000, rng, np.full(1000, 100))
    assert u.min() == 2 and u.max() == 9
    cap = np.full(5000, 256)
    s = benchmark.draw_lengths(("sharegpt",), "input", 5000, rng, cap)
    assert s.min() >= 4 and s.max() <= 256
    assert 80 < np.median(s) < 112  # lognormal median 96
    assert np.mean(s) > np.median(s)  # long right tail


def test_workload_fits_and_is_seeded():
    args = benchmark.build_parser().parse_args(["--num-requests", "50", "--request-rate", "4"])
    a = benchmark.make_workload(args, 512, 128)
    b = benchmark.make_workload(args, 512, 128)
    assert a == b
    assert all(p + o <= 128 for p, o in zip(a.input_lens, a.output_lens))
    assert a.arrivals[0] == 0.0 and all(x < y for x, y in zip(a.arrivals, a.arrivals[1:]))
    assert 5 < a.arrivals[-1] < 25  # 49 gaps of mean 0.25 s
    too_long = benchmark.build_parser().parse_args(["--input-len", "fixed:100", "--output-len", "fixed:100"])
    with pytest.raises(SystemExit, match="max_seq_len"):
        benchmark.make_workload(too_long, 512, 128)


def test_benchmark_end_to_end(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out_json = tmp_path / "res.json"
    plots = tmp_path / "plots"
    res = benchmark.main([
        "--preset", "tiny", "--num-requests", "6", "--slots", "2", "--max-seq-len", "32",
        "--input-len", "uniform:3:12", "--output-len", "uniform:1:10", "--decode-steps", "4",
        "--baseline", "hf", "--threads", "1,2", "--request-rate", "200", "--sweep-slots", "1,2",
        "--profile", "--no-progress", "--json", str(out_json), "--plots", str(plots),
    ])
    printed = capsys.readouterr().out
    assert "warm-up" in printed and "JAX compilations during timed runs: 0" in printed
    data = json.loads(out_json.read_text())
    assert set(data) >= {"model", "machine", "args", "engine", "workload", "warmup", "results", "ratios",
                         "agreement", "sweep", "profile", "compilations_during_timed_runs", "notes"}
    assert sum(data["compilations_during_timed_runs"].values()) == 0
    offline = data["results"]["offline"]
    assert set(offline) == {"continuous", "static", "hf"}
    online = data["results"]["online (200 req/s Poisson)"]
    assert set(online) == {"continuous", "static"}
    total_out = sum(data["workload"]["output_lens"])
    for mode in ("continuous", "static"):
        for phase in (offline, online):
            m = phase[mode]["metrics"]
            assert m["output_tokens"] == total_out and m["completed"] == 6
            for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
                assert set(m[key]) == {"n", "mean", "median", "p90", "p99"}
            assert m["ttft_ms"]["mean"] > 0 and m["output_throughput"] > 0
            reqs = phase[mode]["requests"]
            assert [r["output_len"] for r in reqs] == data["workload"]["output_lens"]
            assert all(len(r["token_times_s"]) == r["output_len"] for r in reqs)
    hf = offline["hf"]["metrics"]
    assert hf["output_tokens"] == total_out and hf["ttft_ms"] is None and hf["itl_ms"] is None
    assert hf["batch_size"] == 2 and hf["generated_tokens_incl_padding"] >= total_out
    assert set(hf["median_output_throughput_by_threads"]) == {"1", "2"} and hf["threads"] in (1, 2)
    # Same weights, greedy, float32: the runtimes agree.
    assert data["agreement"]["continuous vs static"]["identical_requests"] == 1.0
    assert data["agreement"]["continuous vs hf"]["mean_common_prefix_fraction"] > 0.9
    assert set(data["ratios"]) == {"continuous / static", "continuous / hf", "static / hf"}
    assert [row["slots"] for row in data["sweep"]] == [1, 2]
    assert all(set(row["output_throughput"]) == {"continuous", "static", "hf"} for row in data["sweep"])
    assert all(row["compilations"] == 0 for row in data["sweep"])
    assert data["profile"]["decode_steps_calls"] > 0
    assert res["results"]["offline"]["continuous"]["metrics"]["output_throughput"] > 0
    for name in ("throughput.png", "latency_cdf_offline.png", "latency_cdf_online.png", "throughput_vs_slots.png"):
        f = plots / name
        assert f.exists() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000


def test_benchmark_help():
    r = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--request-rate" in r.stdout and "sharegpt" in r.stdout


def test_inf_request_rate_means_offline_only():
    args = benchmark.build_parser().parse_args([])
    assert math.isinf(args.request_rate)


def test_benchmark_onnxruntime_baseline(tmp_path, capsys, monkeypatch):
    """--baseline onnxruntime: the same offline workload through the exported decode step on ORT's
    CPU EP; fp32 greedy on the same weights, so its tokens equal the engine's."""
    for m in ("onnx", "jax2onnx", "onnxruntime"):
        pytest.importorskip(m, reason="the optional 'onnx' extra (pip install -e '.[onnx]') is not installed")
    monkeypatch.setattr(benchmark.bench_peers, "DEFAULT_WORKDIR", tmp_path / "peers")
    monkeypatch.setattr(benchmark.bench_peers.run_onnxruntime, "__kwdefaults__", {
        **benchmark.bench_peers.run_onnxruntime.__kwdefaults__, "workdir": tmp_path / "peers"})
    out_json = tmp_path / "res.json"
    benchmark.main(["--preset", "tiny", "--num-requests", "5", "--slots", "2", "--max-seq-len", "32",
                    "--input-len", "uniform:3:12", "--output-len", "uniform:1:10", "--decode-steps", "4",
                    "--modes", "continuous", "--baseline", "onnxruntime", "--threads", "1", "--repeat", "1",
                    "--no-progress", "--json", str(out_json)])
    data = json.loads(out_json.read_text())
    assert data["command"].startswith("python scripts/benchmark.py --preset tiny")
    ort = data["results"]["offline"]["onnxruntime"]["metrics"]
    assert ort["output_tokens"] == sum(data["workload"]["output_lens"]) and ort["output_throughput"] > 0
    assert ort["ttft_ms"] is None and ort["batch_size"] == 2
    assert data["agreement"]["continuous vs onnxruntime"]["identical_requests"] == 1.0
    assert set(data["ratios"]) == {"continuous / onnxruntime"}
    assert "onnxruntime" in capsys.readouterr().out
