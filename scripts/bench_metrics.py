"""Serving metrics from per-request token timestamps, as vLLM's `bench serve` reports them.

Pure functions over plain numbers (numpy only, no jax): every timestamp is in seconds on one
clock (`time.perf_counter` in scripts/benchmark.py); latencies come out in milliseconds.

Definitions, for a request with arrival time `a` and output-token timestamps t_1 <= ... <= t_n
(t_i = when token i left the engine, i.e. reached the host):

- TTFT (time to first token) = t_1 - a. Includes queueing and prefill.
- TPOT (time per output token, excluding the first) = (t_n - t_1) / (n - 1); defined only for
  requests with n >= 2 (a single-token request has no TPOT and is left out of its statistics).
- ITL (inter-token latency): every gap t_{i+1} - t_i of every request, pooled over requests.
  A runtime that hands tokens out in groups (jaxinfer runs `decode_steps` decode steps per host
  sync) delivers several tokens of a request with the SAME timestamp: those gaps are 0 and are
  KEPT, so the ITL distribution shows the burstiness a client really sees (many zeros, then one
  long gap per sync). `itl_zero_fraction` reports the share of zero gaps. Mean ITL over a
  request equals its TPOT either way.
- E2E latency = t_n - a (arrival to last token).

Statistics: mean, median, p90 and p99 of each list (TTFT, TPOT and E2E have one value per
request; ITL one per gap). Percentiles interpolate linearly between the two closest ranks
(numpy's default "linear" method, which vLLM uses): for sorted values v_0..v_{m-1},
p-th percentile = v_lo + (v_hi - v_lo) * frac where (m - 1) * p / 100 = lo + frac.

Throughput over the makespan D = end - start, where start defaults to the earliest arrival
(the benchmark's t=0) and end to the latest token timestamp:
request throughput = completed requests / D, input token throughput = sum of prompt lengths of
completed requests / D, output token throughput = sum of output tokens / D, total token
throughput = (input + output) / D. A request is completed when it has at least one token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request's trace. `token_times[i]` is when output token i left the engine."""

    arrival: float  # seconds, same clock as token_times
    token_times: Sequence[float]  # non-decreasing, one per output token
    prompt_len: int

    @property
    def output_len(self) -> int:
        return len(self.token_times)


def ttft(r: RequestRecord) -> float | None:
    """First token time - arrival, in seconds; None without tokens."""
    return r.token_times[0] - r.arrival if r.token_times else None


def tpot(r: RequestRecord) -> float | None:
    """(last - first token time) / (n - 1), in seconds; None for fewer than 2 tokens."""
    n = len(r.token_times)
    return (r.token_times[-1] - r.token_times[0]) / (n - 1) if n >= 2 else None


def itl(r: RequestRecord) -> list[float]:
    """Every gap between consecutive token timestamps, in seconds (0 for tokens delivered
    together); n - 1 values for n tokens."""
    t = list(r.token_times)
    return [b - a for a, b in zip(t, t[1:])]


def e2e(r: RequestRecord) -> float | None:
    """Last token time - arrival, in seconds; None without tokens."""
    return r.token_times[-1] - r.arrival if r.token_times else None


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default method); `values` must be non-empty."""
    if len(values) == 0:
        raise ValueError("percentile of an empty list")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile p must be in [0, 100], got {p}")
    v = sorted(values)
    pos = (len(v) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(values: Iterable[float], scale: float = 1.0) -> dict:
    """{"n", "mean", "median", "p90", "p99"} of `values` times `scale` (None stats when empty)."""
    v = [x * scale for x in values]
    if not v:
        return {"n": 0, "mean": None, "median": None, "p90": None, "p99": None}
    return {"n": len(v), "mean": float(np.mean(v)), "median": percentile(v, 50),
            "p90": percentile(v, 90), "p99": percentile(v, 99)}


def throughput(num_requests: int, input_tokens: int, output_tokens: int, duration: float) -> dict:
    """Request and token rates over `duration` seconds."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    return {
        "duration_s": duration,
        "completed": num_requests,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": num_requests / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }


def compute_metrics(records: Sequence[RequestRecord], start: float | None = None,
                    end: float | None = None) -> dict:
    """Throughput over the makespan plus TTFT/TPOT/ITL/E2E statistics in milliseconds.

    `start` defaults to the earliest arrival, `end` to the latest token timestamp."""
    done = [r for r in records if r.token_times]
    if not done:
        raise ValueError("no request produced a token")
    start = min(r.arrival for r in records) if start is None else start
    end = max(r.token_times[-1] for r in done) if end is None else end
    out = throughput(len(done), sum(r.prompt_len for r in done), sum(r.output_len for r in done), end - start)
    gaps = [g for r in done for g in itl(r)]
    ms = 1000.0
    out.update(
        ttft_ms=summarize((ttft(r) for r in done), ms),
        tpot_ms=summarize((x for x in map(tpot, done) if x is not None), ms),
        itl_ms=summarize(gaps, ms),
        e2e_ms=summarize((e2e(r) for r in done), ms),
        itl_zero_fraction=(sum(g == 0 for g in gaps) / len(gaps)) if gaps else None,
    )
    return out
