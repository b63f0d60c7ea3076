"""Serving benchmark over HTTP: Poisson arrivals of streaming `/v1/completions` requests,
TTFT / TPOT / ITL / E2E percentiles and throughput, computed by the same code as
scripts/benchmark.py (bench_metrics.compute_metrics), and the HTTP overhead: the same workload
through `Engine` directly (benchmark.run_engine) in the same process and session.

    python scripts/bench_serving.py --num-requests 64 --request-rate 16 --json out.json --plot out.png
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --num-requests 200 --request-rate 8

Without `--url` the script starts the server itself (in-process, `jaxinfer.server.start`) on
the model of `--model/--preset` (default: stories260K when found), warms it up, and also runs
the direct-engine baseline on an identical second engine. With `--url` it only measures that
server (the direct baseline needs the model in this process).

Token timestamps: each SSE chunk carries `usage` (vLLM's `stream_options.continuous_usage_stats`),
so a chunk that brings k tokens (the engine hands out `decode_steps` tokens per host sync)
stamps k tokens with the chunk's arrival time, exactly as the direct run stamps a delta's
tokens with `StreamDelta.time`. Prompts are random token ids; EOS is ignored, greedy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path

import numpy as np

import bench_common
import bench_metrics
import benchmark
from bench_metrics import RequestRecord


async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int, start_at: float) -> RequestRecord:
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    arrival, times, seen = time.perf_counter(), [], 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"continuous_usage_stats": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            now, done = time.perf_counter(), chunk.get("usage", {}).get("completion_tokens", seen)
            times.extend([now] * (done - seen))
            seen = done
    if seen != max_tokens:
        raise RuntimeError(f"a request produced {seen} tokens, expected {max_tokens}")
    return RequestRecord(arrival, times, len(prompt))


async def run_http(url: str, model: str, wl, concurrency: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter() + 0.05
        records = await asyncio.gather(*(
            _one(client, url, model, p, n, t0 + a) for p, n, a in zip(wl.prompts, wl.output_lens, wl.arrivals)))
    scheduled = [RequestRecord(t0 + a, r.token_times, r.prompt_len) for r, a in zip(records, wl.arrivals)]
    return {"metrics": bench_metrics.compute_metrics(scheduled, start=t0),
            "requests": [{"arrival_s": r.arrival - t0, "prompt_len": r.prompt_len,
                          "token_times_s": [t - t0 for t in r.token_times]} for r in scheduled],
            "client_send_lag_ms": bench_metrics.summarize((r.arrival - s.arrival for r, s in zip(records, scheduled)),
                                                          1000.0)}


def overhead(http: dict, direct: dict) -> dict:
    h, d = http["metrics"], direct["metrics"]
    return {
        "output_throughput_ratio": h["output_throughput"] / d["output_throughput"],
        "ttft_median_ms_added": h["ttft_ms"]["median"] - d["ttft_ms"]["median"],
        "tpot_median_ms_added": (h["tpot_ms"]["median"] - d["tpot_ms"]["median"])
        if h["tpot_ms"]["median"] is not None and d["tpot_ms"]["median"] is not None else None,
        "e2e_median_ms_added": h["e2e_ms"]["median"] - d["e2e_ms"]["median"],
    }


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, label in zip(axes, ("ttft", "itl", "e2e"), ("TTFT", "ITL", "E2E latency")):
        for name, run in out["results"].items():
            fn = {"ttft": bench_metrics.ttft, "e2e": bench_metrics.e2e}.get(key)
            recs = [RequestRecord(r["arrival_s"], r["token_times_s"], r["prompt_len"]) for r in run["requests"]]
            xs = [g for r in recs for g in bench_metrics.itl(r)] if key == "itl" else [fn(r) for r in recs]
            xs = np.sort(np.asarray(xs) * 1000)
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.legend()
    w = out["workload"]
    fig.suptitle(f"{out['model']}: {w['num_requests']} requests at {w['request_rate']} req/s, HTTP vs Engine direct")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one in this process)")
    ap.add_argument("--served-model-name", default=None, help="the model name to send (default: the server's)")
    ap.add_argument("--vocab-size", type=int, default=256, help="with --url: prompts draw token ids below this")
    bench_common.add_model_args(ap)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=16.0, help="Poisson arrivals per second (inf: all at 0)")
    ap.add_argument("--input-len", default="uniform:16:64", help="fixed:L | uniform:LO:HI | sharegpt")
    ap.add_argument("--output-len", default="uniform:16:64")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=0)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--max-prefill-batch", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=256, help="HTTP connections at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import httpx
    import jaxinfer

    out = {"workload": {"num_requests": args.num_requests, "request_rate": args.request_rate,
                        "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed},
           "results": {}}
    running = None
    if args.url is None:
        from jaxinfer import server  # the optional "serve" extra, only when this script serves

        model, name, _ = bench_common.load_model_arg(args)
        kwargs = benchmark.engine_kwargs(args, args.slots, args.max_seq_len)
        wl = benchmark.make_workload(args, model.config.vocab_size, args.max_seq_len)
        engine = jaxinfer.Engine(model, seed=0, **kwargs)
        bench_common.warm_up(model, kwargs, max(map(len, wl.prompts)), bench_common.log)
        server.serve.warm_up(engine)
        running = server.start(engine, name)
        url, served = running.url, name
        out["engine"] = kwargs
    else:
        url = args.url.rstrip("/")
        served = args.served_model_name or httpx.get(url + "/v1/models").json()["data"][0]["id"]
        model, name = None, served
        wl = benchmark.make_workload(args, args.vocab_size, args.max_seq_len)
    out["model"] = name
    try:
        bench_common.log(f"HTTP: {args.num_requests} streaming requests at {args.request_rate} req/s to {url}")
        warm = benchmark.Workload(wl.prompts[:4], [min(4, n) for n in wl.output_lens[:4]], [0.0] * 4)
        asyncio.run(run_http(url, served, warm, args.concurrency))  # connections and the server's first steps
        http = asyncio.run(run_http(url, served, wl, args.concurrency))
        out["results"]["http"] = http
    finally:
        if running is not None:
            running.stop()
    if model is not None:
        bench_common.log("direct: the same workload through Engine.add_request / step")
        direct = benchmark.run_engine(model, out["engine"], "continuous", wl, False, "direct")
        out["results"]["direct"] = {"metrics": direct["metrics"], "requests": direct["requests"]}
        out["http_overhead"] = overhead(http, direct)
    for k, r in out["results"].items():
        m = r["metrics"]
        bench_common.log(f"{k:>7}: {m['output_throughput']:8.1f} out tok/s  {m['request_throughput']:6.2f} req/s  "
                         f"TTFT p50 {m['ttft_ms']['median']:7.1f} ms  TPOT p50 {m['tpot_ms']['median'] or math.nan:6.2f} ms"
                         f"  E2E p50 {m['e2e_ms']['median']:7.1f} ms")
    if "http_overhead" in out:
        bench_common.log("HTTP overhead: " + json.dumps({k: round(v, 3) for k, v in out["http_overhead"].items()
                                                         if v is not None}))
    if args.json:
        bench_common.write_json(args.json, out)
    if args.plot and "direct" in out["results"]:
        plot(out, args.plot)
    return out


if __name__ == "__main__":
    main()
