"""scripts/bench_serving.py end to end on the tiny preset: a real server, real HTTP streams,
and the same workload through the engine directly; the metrics must be those of the requests
it sent (every token counted, the same tokens per request on both paths)."""

from __future__ import annotations

import pytest

from script_loader import load_script

pytest.importorskip("fastapi", reason="the serving benchmark needs the 'serve' extra")
pytest.importorskip("httpx")


def test_bench_serving_measures_http_and_direct(tmp_path):
    bs = load_script("bench_serving")
    out = bs.main(["--preset", "tiny", "--num-requests", "12", "--request-rate", "40", "--slots", "4",
                   "--max-seq-len", "64", "--input-len", "uniform:4:12", "--output-len", "uniform:4:12",
                   "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    http, direct = out["results"]["http"], out["results"]["direct"]
    for run in (http, direct):
        assert run["metrics"]["request_throughput"] > 0 and len(run["requests"]) == 12
    assert [len(r["token_times_s"]) for r in http["requests"]] == [len(r["token_times_s"]) for r in direct["requests"]]
    assert http["metrics"]["output_throughput"] > 0 and "output_throughput_ratio" in out["http_overhead"]
    assert (tmp_path / "s.json").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0
