"""scripts/bench_metrics.py on a hand-made trace whose every metric is computed by hand below."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from script_loader import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_metrics.py"


bm = load_script("bench_metrics")
R = bm.RequestRecord

# Seconds. A: 6 tokens in 3 host syncs (3 + 2 + 1 tokens delivered together, so 3 zero gaps).
# B: a single-token request (no TPOT, no ITL). C: 3 tokens, one per sync.
A = R(arrival=0.0, token_times=[0.5, 0.5, 0.5, 1.0, 1.0, 2.0], prompt_len=10)
B = R(arrival=1.0, token_times=[1.25], prompt_len=4)
C = R(arrival=0.25, token_times=[1.0, 1.5, 3.0], prompt_len=6)
TRACE = [A, B, C]


def test_per_request_definitions():
    # TTFT = first - arrival; E2E = last - arrival; TPOT = (last - first) / (n - 1).
    assert (bm.ttft(A), bm.ttft(B), bm.ttft(C)) == (0.5, 0.25, 0.75)
    assert (bm.e2e(A), bm.e2e(B), bm.e2e(C)) == (2.0, 0.25, 2.75)
    assert bm.tpot(A) == pytest.approx(1.5 / 5) and bm.tpot(C) == 1.0
    assert bm.tpot(B) is None  # single token: no TPOT
    # ITL: every gap, simultaneous tokens give 0 and are kept.
    assert bm.itl(A) == [0.0, 0.0, 0.5, 0.0, 1.0]
    assert bm.itl(B) == []
    assert bm.itl(C) == [0.5, 1.5]
    empty = R(arrival=0.0, token_times=[], prompt_len=3)
    assert bm.ttft(empty) is None and bm.e2e(empty) is None and bm.tpot(empty) is None and bm.itl(empty) == []


def test_percentile_by_hand_and_against_numpy():
    v = [250.0, 500.0, 750.0]
    assert bm.percentile(v, 50) == 500.0
    assert bm.percentile(v, 90) == pytest.approx(700.0)  # rank 1.8: 500 + 0.8 * 250
    assert bm.percentile(v, 99) == pytest.approx(745.0)  # rank 1.98
    assert bm.percentile([7.0], 99) == 7.0
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 100):
        x = rng.exponential(size=n).tolist()
        for p in (0, 37.5, 50, 90, 99, 100):
            assert bm.percentile(x, p) == pytest.approx(np.percentile(x, p))
    with pytest.raises(ValueError):
        bm.percentile([], 50)


def test_compute_metrics_hand_made_trace():
    m = bm.compute_metrics(TRACE)
    # Makespan: earliest arrival 0.0 to last token 3.0.
    assert m["duration_s"] == 3.0 and m["completed"] == 3
    assert m["input_tokens"] == 20 and m["output_tokens"] == 10
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["input_throughput"] == pytest.approx(20 / 3)
    assert m["output_throughput"] == pytest.approx(10 / 3)
    assert m["total_token_throughput"] == pytest.approx(10.0)

    def check(stats, n, mean, median, p90, p99):
        assert stats["n"] == n
        assert [stats[k] for k in ("mean", "median", "p90", "p99")] == pytest.approx([mean, median, p90, p99])

    # TTFT ms [500, 250, 750] -> sorted [250, 500, 750].
    check(m["ttft_ms"], 3, 500.0, 500.0, 700.0, 745.0)
    # TPOT ms: A 300, C 1000 (B has one token and is left out); ranks 0.5, 0.9, 0.99.
    check(m["tpot_ms"], 2, 650.0, 650.0, 930.0, 993.0)
    # ITL ms: A [0, 0, 500, 0, 1000] + C [500, 1500] -> sorted [0, 0, 0, 500, 500, 1000, 1500];
    # mean 3500 / 7; ranks 3, 5.4, 5.94.
    check(m["itl_ms"], 7, 500.0, 500.0, 1200.0, 1470.0)
    assert m["itl_zero_fraction"] == pytest.approx(3 / 7)
    # E2E ms [2000, 250, 2750] -> sorted [250, 2000, 2750]; ranks 1, 1.8, 1.98.
    check(m["e2e_ms"], 3, 5000 / 3, 2000.0, 2600.0, 2735.0)


def test_compute_metrics_explicit_window_and_unfinished_requests():
    never = R(arrival=0.0, token_times=[], prompt_len=99)  # produced nothing: not completed
    m = bm.compute_metrics(TRACE + [never], start=-1.0, end=4.0)
    assert m["duration_s"] == 5.0 and m["completed"] == 3 and m["input_tokens"] == 20
    assert m["output_throughput"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bm.compute_metrics([never])


def test_summarize_empty_and_throughput_validation():
    assert bm.summarize([]) == {"n": 0, "mean": None, "median": None, "p90": None, "p99": None}
    assert bm.summarize([1.0, 3.0], scale=1000.0)["mean"] == 2000.0
    with pytest.raises(ValueError):
        bm.throughput(1, 1, 1, 0.0)


def test_module_does_not_import_jax():
    assert "import jax" not in SCRIPT.read_text()
