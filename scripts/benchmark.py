"""jaxinfer serving benchmark: offline throughput and online latency, in the form vLLM's
`benchmark_throughput` / `bench serve` report them, with an optional Hugging Face baseline.

    python scripts/benchmark.py --model ../shared/assets/stories260K --baseline hf \\
        --num-requests 64 --slots 64 --decode-steps 16 --json out/res.json --plots out/
    python scripts/benchmark.py --preset llama-20m --request-rate 8 --sweep-slots 1,4,16,64

Model: `--model DIR` (HF checkpoint) or `--preset NAME` (random weights). Default: stories260K
when the shared assets are found, else the llama-20m preset. For `--baseline hf` a preset is
written to a temporary checkpoint with `jaxinfer.save_model` and loaded by transformers, so both
runtimes run identical weights.

Workload (seeded by --seed): `--num-requests` prompts of random token ids with lengths drawn
from `--input-len`, output lengths from `--output-len`; EOS is ignored (`ignore_eos=True`) so
every request generates exactly its drawn length; greedy sampling. Length distributions:
  fixed:L          every request L tokens
  uniform:LO:HI    uniform integers in [LO, HI]
  sharegpt         synthetic long-tailed lengths in the spirit of ShareGPT (NOT fitted to it):
                   prompt = round(lognormal(median 96, sigma 1.0)) clipped to
                   [4, max_seq_len // 2]; output = round(lognormal(median 128, sigma 0.8))
                   clipped to [4, max_seq_len - prompt].
prompt + output must fit max_seq_len (fixed/uniform lengths that do not are an error).

Runs, for each mode in `--modes` (jaxinfer "continuous" and/or "static" batching) on the same
engine shape:
- offline: every request submitted at t=0 (`add_request`), then `engine.step()` until done:
  request/s, input and output tokens/s over the makespan, plus latency stats under that load;
- online (only when `--request-rate R` is finite): Poisson arrivals at R req/s; a request is
  submitted with `engine.add_request` as soon as its arrival time has passed (checked between
  `engine.step()` calls) and its arrival time is the scheduled one. TTFT, TPOT, ITL and E2E
  come from the timestamps of the stream deltas (`StreamDelta.time`, when the tokens reached
  the host), never estimated. Tokens handed out in one host sync (`--decode-steps` decode
  steps each) share a timestamp: their ITL gap is 0 and is kept (see scripts/bench_metrics.py).
- `--baseline hf`: transformers `generate`, greedy, batched: requests grouped in arrival order
  into batches of `--hf-batch-size` (default `--slots`), left padding + attention mask, each
  batch generating its longest request's output length (max_new_tokens = min_new_tokens;
  EOS disabled like ignore_eos); only each request's own tokens are counted. It runs with
  every torch thread count in `--threads` and the fastest is reported (on a shared machine two
  OpenMP threads can stall badly when another process takes a core; one thread does not). Offline
  throughput only: per-token latency is not observable from batched generate, so HF TTFT,
  TPOT and ITL are omitted (reported as null); its E2E is the completion time of the
  request's batch.
- `--sweep-slots 1,2,...`: offline output tokens/s vs number of slots for every mode (and hf
  with batch size = slots when --baseline hf).

Warm-up: before any timed run the engine runs every (prefill batch bucket, prefill length
bucket) pair the workload can use, plus decode and evict, so no JAX compilation is timed; the
jit cache sizes are checked after the timed runs and any compilation is reported.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_common
import bench_metrics
import bench_peers
import bench_plots
from bench_common import jit_cache_sizes, load_model_arg, log, warm_up
from bench_metrics import RequestRecord

SHAREGPT = {"input": {"median": 96.0, "sigma": 1.0}, "output": {"median": 128.0, "sigma": 0.8}, "min": 4}
# the step functions jaxinfer.Engine(profile=True) times (engine.profile())
PROFILED = ("admit", "prefill", "fork", "decode_steps", "evict", "num_free_pages")


# ---------------------------------------------------------------------------- workload
def parse_dist(spec: str) -> tuple:
    parts = spec.split(":")
    try:
        if parts[0] == "fixed" and len(parts) == 2 and int(parts[1]) >= 1:
            return ("fixed", int(parts[1]))
        if parts[0] == "uniform" and len(parts) == 3 and 1 <= int(parts[1]) <= int(parts[2]):
            return ("uniform", int(parts[1]), int(parts[2]))
    except ValueError:
        pass
    if spec == "sharegpt":
        return ("sharegpt",)
    raise argparse.ArgumentTypeError(f"bad length distribution {spec!r}: use fixed:L, uniform:LO:HI or sharegpt")


def draw_lengths(dist: tuple, which: str, n: int, rng: np.random.Generator, hi: np.ndarray) -> np.ndarray:
    """n lengths from `dist`; `hi` ([n]) is the per-request cap used to clip sharegpt lengths."""
    if dist[0] == "fixed":
        return np.full(n, dist[1], np.int64)
    if dist[0] == "uniform":
        return rng.integers(dist[1], dist[2] + 1, n)
    p = SHAREGPT[which]
    x = np.rint(rng.lognormal(math.log(p["median"]), p["sigma"], n)).astype(np.int64)
    return np.clip(x, SHAREGPT["min"], np.maximum(hi, SHAREGPT["min"]))


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    arrivals: list[float]  # seconds after t=0 (all 0 offline)

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]


def make_workload(args, vocab: int, max_seq_len: int) -> Workload:
    rng = np.random.default_rng(args.seed)
    n = args.num_requests
    inp = draw_lengths(args.input_len, "input", n, rng, np.full(n, max_seq_len // 2))
    out = draw_lengths(args.output_len, "output", n, rng, max_seq_len - inp)
    bad = np.nonzero(inp + out > max_seq_len)[0]
    if len(bad):
        raise SystemExit(f"error: request {bad[0]} has prompt {inp[bad[0]]} + output {out[bad[0]]} tokens > "
                         f"max_seq_len {max_seq_len}; shorten the lengths or raise --max-seq-len")
    prompts = [bench_common.random_prompt(rng, vocab, int(k)) for k in inp]
    if math.isinf(args.request_rate):
        arrivals = [0.0] * n
    else:
        gaps = rng.exponential(1.0 / args.request_rate, n)
        arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()
    return Workload(prompts, [int(x) for x in out], arrivals)


# ---------------------------------------------------------------------------- jaxinfer runs
def engine_kwargs(args, slots: int, max_seq_len: int) -> dict:
    kw = bench_common.engine_kwargs(slots, max_seq_len, args.page_size, args.decode_steps,
                                    args.max_prefill_batch or slots, args.num_pages)
    if getattr(args, "kv_dtype", "auto") != "auto":
        kw["kv_dtype"] = args.kv_dtype
    return kw


def run_engine(model, kwargs: dict, mode: str, wl: Workload, progress: bool, desc: str) -> dict:
    """Serve the workload; returns metrics, per-request records and output tokens."""
    import jaxinfer
    from tqdm.auto import tqdm

    engine = jaxinfer.Engine(model, mode=mode, seed=0, **kwargs)
    n = len(wl.prompts)
    order = sorted(range(n), key=lambda i: wl.arrivals[i])
    params = [jaxinfer.SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in wl.output_lens]
    times: list[list[float]] = [[] for _ in range(n)]
    tokens: list[list[int]] = [[] for _ in range(n)]
    index: dict[int, int] = {}
    steps = done = nxt = 0
    bar = tqdm(total=n, desc=desc, unit="req", disable=not progress, leave=False)
    t0 = time.perf_counter()
    while done < n:
        now = time.perf_counter()
        while nxt < n and t0 + wl.arrivals[order[nxt]] <= now:
            i = order[nxt]
            index[engine.add_request(wl.prompts[i], params[i])] = i
            nxt += 1
        if not engine.has_unfinished():  # idle: wait for the next arrival
            time.sleep(max(0.0, t0 + wl.arrivals[order[nxt]] - time.perf_counter()))
            continue
        for d in engine.step():
            i = index[d.request_id]
            times[i].extend([d.time] * len(d.token_ids))
            tokens[i].extend(d.token_ids)
            if d.finish_reason is not None:
                done += 1
                bar.update(1)
        steps += 1
    bar.close()
    records = [RequestRecord(t0 + wl.arrivals[i], times[i], len(wl.prompts[i])) for i in range(n)]
    metrics = bench_metrics.compute_metrics(records, start=t0)
    metrics["engine_steps"] = steps
    metrics["kv_bytes_per_token"] = engine.stats()["kv_bytes_per_token"]
    short = [i for i in range(n) if len(tokens[i]) != wl.output_lens[i]]
    if short:
        raise RuntimeError(f"{mode}: request {short[0]} produced {len(tokens[short[0]])} tokens, "
                           f"expected {wl.output_lens[short[0]]}")
    return {"metrics": metrics, "tokens": tokens,
            "requests": [{"arrival_s": r.arrival - t0, "prompt_len": r.prompt_len, "output_len": r.output_len,
                          "token_times_s": [t - t0 for t in r.token_times]} for r in records]}


def median_run(runs: list[dict]) -> dict:
    """The run with the median output throughput (the lower one for an even count); every
    run's throughput is kept in metrics["repeats_output_throughput"]."""
    ranked = sorted(runs, key=lambda r: r["metrics"]["output_throughput"])
    best = ranked[(len(ranked) - 1) // 2]
    best["metrics"]["repeats_output_throughput"] = [r["metrics"]["output_throughput"] for r in runs]
    return best


def profile_run(model, kwargs: dict, wl: Workload) -> dict:
    """Where the time of a continuous offline run goes: the engine runs with `profile=True`, so
    each jitted call blocks until its result is ready and is timed (`engine.profile()`); host time
    is the rest of `engine.step()` (scheduling, packing, device_get, token hand-out,
    detokenisation). Blocking removes the overlap of host work and device work, so the total is a
    bit above a normal run."""
    import jaxinfer

    engine = jaxinfer.Engine(model, mode="continuous", seed=0, profile=True, **kwargs)
    for i, p in enumerate(wl.prompts):
        engine.add_request(p, jaxinfer.SamplingParams(max_tokens=wl.output_lens[i], temperature=0.0, ignore_eos=True))
    steps, step_time, tokens = 0, 0.0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        t = time.perf_counter()
        tokens += sum(len(d.token_ids) for d in engine.step())
        step_time += time.perf_counter() - t
        steps += 1
    total = time.perf_counter() - t0
    prof = engine.profile()
    spent = {n: prof.get(n, {}).get("seconds", 0.0) for n in PROFILED}
    calls = {n: prof.get(n, {}).get("calls", 0) for n in PROFILED}
    device = sum(spent.values())
    cfg = engine.cfg
    decode_tokens_computed = calls["decode_steps"] * cfg.decode_steps * cfg.max_slots
    return {
        "total_s": total, "steps": steps, "output_tokens": tokens,
        "admit_s": spent["admit"], "admit_calls": calls["admit"],
        "prefill_s": spent["prefill"], "prefill_calls": calls["prefill"],
        "fork_s": spent["fork"], "free_pages_s": spent["num_free_pages"],
        "decode_steps_s": spent["decode_steps"], "decode_steps_calls": calls["decode_steps"],
        "decode_ms_per_step": 1000 * spent["decode_steps"] / max(1, calls["decode_steps"] * cfg.decode_steps),
        # every token comes from decode (a request's first one too) / slot-steps run
        "decode_slot_utilisation": tokens / max(1, decode_tokens_computed),
        "evict_s": spent["evict"], "evict_calls": calls["evict"],
        "host_in_step_s": step_time - device, "outside_step_s": total - step_time,
    }


def print_profile(p: dict, log) -> None:
    log("\n== profile (continuous offline run, every device call blocked on) ==")
    for key, label in (("admit_s", "admit"), ("prefill_s", "prefill"), ("decode_steps_s", "decode_steps"),
                       ("evict_s", "evict"), ("fork_s", "fork"), ("free_pages_s", "free-page count"),
                       ("host_in_step_s", "host, inside step()"), ("outside_step_s", "host, outside step()")):
        log(f"{label:<22}{p[key]:>8.3f} s {p[key] / p['total_s']:>6.1%}")
    log(f"{'total':<22}{p['total_s']:>8.3f} s; {p['steps']} steps, {p['prefill_calls']} prefills, "
        f"decode {p['decode_ms_per_step']:.2f} ms per decode step, "
        f"{p['decode_slot_utilisation']:.0%} of computed slot-steps produced a token")


def pick_best_hf(by_mode: dict) -> None:
    """Replace each peer's "<peer>@<threads>" entries by one "<peer>": the thread count with the
    highest median output throughput (the most favourable baseline); every count's median is kept."""
    for peer in sorted({k.split("@")[0] for k in by_mode if "@" in k}):
        keys = [k for k in by_mode if k.startswith(f"{peer}@")]
        medians = {int(k.split("@")[1]): by_mode[k]["metrics"]["output_throughput"] for k in keys}
        best = by_mode[max(keys, key=lambda k: by_mode[k]["metrics"]["output_throughput"])]
        for k in keys:
            del by_mode[k]
        best["metrics"]["median_output_throughput_by_threads"] = medians
        by_mode[peer] = best


# ---------------------------------------------------------------------------- HF baseline
def load_hf(model, model_dir: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    import jaxinfer

    if model_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            jaxinfer.save_model(model, tmp)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return hf.eval()


def run_hf(hf, wl: Workload, batch_size: int, threads: int, progress: bool, desc: str) -> dict:
    """transformers `generate` in batches of `batch_size` (bench_peers.hf_generate: left padding,
    greedy, EOS neither stops nor is masked), timed per batch so each request gets its batch's
    completion time."""
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    n = len(wl.prompts)
    order = sorted(range(n), key=lambda i: wl.arrivals[i])
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]

    def generate(rows: list[int]):
        return bench_peers.hf_generate(hf, [wl.prompts[i] for i in rows], max(wl.output_lens[i] for i in rows))

    generate(batches[0][:2] if len(batches[0]) > 1 else batches[0])  # warm-up (allocator, threads)
    tokens: list[list[int]] = [[] for _ in range(n)]
    done_at = [0.0] * n
    bar = tqdm(total=n, desc=desc, unit="req", disable=not progress, leave=False)
    t0 = time.perf_counter()
    for rows in batches:
        out = generate(rows)
        now = time.perf_counter()
        for r, i in enumerate(rows):
            tokens[i] = out[r, : wl.output_lens[i]].tolist()
            done_at[i] = now - t0
        bar.update(len(rows))
    duration = time.perf_counter() - t0
    bar.close()
    metrics = bench_metrics.throughput(n, sum(wl.input_lens), sum(wl.output_lens), duration)
    metrics.update(ttft_ms=None, tpot_ms=None, itl_ms=None,
                   e2e_ms=bench_metrics.summarize((done_at[i] - wl.arrivals[i] for i in range(n)), 1000.0),
                   batch_size=batch_size, num_batches=len(batches), threads=threads,
                   generated_tokens_incl_padding=sum(len(b) * max(wl.output_lens[i] for i in b) for b in batches))
    return {"metrics": metrics, "tokens": tokens,
            "requests": [{"arrival_s": wl.arrivals[i], "prompt_len": len(wl.prompts[i]),
                          "output_len": wl.output_lens[i], "completion_s": done_at[i]} for i in range(n)]}


def run_llamacpp(model_dir: str, wl: Workload, n_parallel: int, threads: int, dtype: str) -> dict:
    """llama.cpp serving the offline workload (bench_peers.run_llamacpp: continuous batching over
    n_parallel sequences, greedy, EOS ignored); throughput only (no per-token timestamps)."""
    r = bench_peers.run_llamacpp(model_dir, wl.prompts, wl.output_lens, n_parallel=n_parallel, threads=threads,
                                 dtype=dtype)
    metrics = bench_metrics.throughput(len(wl.prompts), sum(wl.input_lens), sum(wl.output_lens), r["seconds"])
    metrics.update(ttft_ms=None, tpot_ms=None, itl_ms=None, e2e_ms=None, threads=threads, n_parallel=n_parallel,
                   dtype=dtype, kv_type=r["kv_type"], flash_attn=r["flash_attn"])
    return {"metrics": metrics, "tokens": r["tokens"], "requests": []}


def run_onnxruntime(model_dir: str, wl: Workload, batch_size: int, threads: int) -> dict:
    """ONNX Runtime serving the offline workload (bench_peers.run_onnxruntime: the exported decode
    step in a plain batched loop, greedy, EOS ignored); throughput only (no per-token timestamps)."""
    r = bench_peers.run_onnxruntime(model_dir, wl.prompts, wl.output_lens, batch_size=batch_size, threads=threads)
    metrics = bench_metrics.throughput(len(wl.prompts), sum(wl.input_lens), sum(wl.output_lens), r["seconds"])
    metrics.update(ttft_ms=None, tpot_ms=None, itl_ms=None, e2e_ms=None, threads=threads, batch_size=batch_size,
                   generated_tokens_incl_padding=r["generated_tokens_incl_padding"])
    return {"metrics": metrics, "tokens": r["tokens"], "requests": []}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Exact-match fraction of requests and mean fraction of the common greedy prefix."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        k = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(k / max(len(x), 1))
    return {"identical_requests": same / len(a), "mean_common_prefix_fraction": float(np.mean(prefix))}


# ---------------------------------------------------------------------------- report
def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(results: dict, log) -> None:
    for phase, runs in results.items():
        if not runs:
            continue
        log(f"\n== {phase} ==")
        log(f"{'mode':<12}{'duration s':>11}{'req/s':>9}{'in tok/s':>11}{'out tok/s':>11}{'total tok/s':>13}")
        for mode, r in runs.items():
            m = r["metrics"]
            log(f"{mode:<12}{m['duration_s']:>11.2f}{m['request_throughput']:>9.2f}{m['input_throughput']:>11.1f}"
                f"{m['output_throughput']:>11.1f}{m['total_token_throughput']:>13.1f}")
        log(f"{'latency ms':<12}{'metric':<6}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
        for mode, r in runs.items():
            m = r["metrics"]
            for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
                s = m.get(key)
                if s is None:
                    log(f"{mode:<12}{key[:-3].upper():<6}{'n/a (not observable with batched generate)':>40}")
                    continue
                log(f"{mode:<12}{key[:-3].upper():<6}{fmt(s['mean']):>10}{fmt(s['median']):>10}"
                    f"{fmt(s['p90']):>10}{fmt(s['p99']):>10}")
            if m.get("itl_zero_fraction") is not None:
                log(f"{mode:<12}ITL gaps that are 0 (same host sync): {m['itl_zero_fraction']:.1%}")


def roofline(model, rows: int, offline: dict, output_tokens: int) -> dict:
    """The workload's matmul roofline: every output token costs one decode row of the model's
    dense matmuls, at the machine's measured GEMM rate for that batch (bench_common.matmul_ceiling
    at `rows` rows, in the model's dtype and in bf16 in / f32 out, XLA's fastest CPU dot); each
    system's throughput as a share of it."""
    own = bench_common.matmul_ceiling(model, rows)
    bf16 = bench_common.matmul_ceiling(model, rows, "bfloat16")
    best = max(own["gflops"], bf16["gflops"])
    per_token_flops = own["flops"] / rows
    tok_s = best * 1e9 / per_token_flops
    return {**own, "best_gflops": best, "tok_per_s": tok_s, "flops_per_token": per_token_flops,
            "output_tokens": output_tokens,
            "percent_of_best": {m: r["metrics"]["output_throughput"] / tok_s for m, r in offline.items()}}


def save_preset(model, name: str) -> Path:
    """A random-weight preset as an HF checkpoint (for the llama.cpp converter), in benchmarks/tmp."""
    import jaxinfer

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tmp" / "presets" / name.split()[0]
    if not (path / "model.safetensors").exists():
        jaxinfer.save_model(model, path)
    return path


# ---------------------------------------------------------------------------- main
def save(out: dict, args, log, plots: bool = True) -> None:
    if args.json:
        bench_common.write_json(args.json, out)
        log(f"wrote {args.json}")
    if args.plots and plots:
        files = bench_plots.plot_all(out, Path(args.plots))
        log(f"wrote {', '.join(str(Path(args.plots) / f) for f in files)}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_model_args(ap, "llama-20m, tiny, llama-3.2-1b, ...")
    ap.add_argument("--dtype", default="float32", help="weight dtype for jaxinfer (HF always runs float32)")
    ap.add_argument("--compute-dtype", default=None,
                    help="jaxinfer activations and KV cache (default: --dtype; on CPU bfloat16 weights run fastest "
                         "with float32 compute)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=parse_dist, default="sharegpt", help="fixed:L | uniform:LO:HI | sharegpt")
    ap.add_argument("--output-len", type=parse_dist, default="sharegpt", help="fixed:L | uniform:LO:HI | sharegpt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="Poisson arrival rate (req/s) of the online run; inf (default): offline only")
    ap.add_argument("--modes", default="continuous,static", help="comma list of continuous, static")
    ap.add_argument("--baseline", default="none",
                    help="comma list of peers run on the same workload: hf, llamacpp (f32), llamacpp-bf16 "
                         "(llama.cpp through llama-cpp-python), onnxruntime (the exported decode step on ORT's CPU "
                         "EP; see scripts/bench_peers.py); none")
    ap.add_argument("--hf-batch-size", type=int, default=0, help="HF generate batch size (default: --slots)")
    ap.add_argument("--threads", default=str(os.cpu_count()),
                    help="torch thread counts for the HF baseline, comma list (e.g. 1,2): each is run and the "
                         "fastest (by median output tok/s) is reported as hf, the others are kept in the JSON")
    ap.add_argument("--sweep-repeat", type=int, default=1, help="timed runs per point of --sweep-slots (median)")
    ap.add_argument("--slots", type=int, default=32, help="engine max_slots")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=0, help="0: enough for every slot's worst case")
    ap.add_argument("--max-seq-len", type=int, default=512, help="capped at the model's max_position_embeddings")
    ap.add_argument("--decode-steps", type=int, default=8, help="decode steps per host sync")
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "bfloat16", "float32", "int8", "fp8_e4m3"],
                    help="the KV pool's element type (the results record KV bytes per token)")
    ap.add_argument("--max-prefill-batch", type=int, default=0, help="0: --slots")
    ap.add_argument("--sweep-slots", default="", help="comma list, e.g. 1,2,4,8,16: offline throughput vs slots")
    ap.add_argument("--json", help="write every result (incl. per-request token timestamps) here")
    ap.add_argument("--plots", help="write PNG plots into this directory")
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed runs per mode (interleaved across modes); the median run by output tok/s is reported")
    ap.add_argument("--profile", action="store_true",
                    help="one extra, instrumented continuous offline run: time in admit / prefill / decode_steps / evict "
                         "(each blocked on) and on the host")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    ap.add_argument("--replot", metavar="JSON", help="only redraw --plots from an earlier --json file")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.replot:
        out = json.loads(Path(args.replot).read_text())
        files = bench_plots.plot_all(out, Path(args.plots or Path(args.replot).parent))
        print(f"wrote {', '.join(files)}")
        return out
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("continuous", "static"):
            raise SystemExit(f"error: unknown mode {m!r}; use continuous and/or static")
    sweep = [int(s) for s in args.sweep_slots.split(",") if s]
    progress = not args.no_progress

    import jax

    model, name, model_dir = load_model_arg(args)
    mc = model.config
    max_seq_len = min(args.max_seq_len, mc.max_position_embeddings)
    wl = make_workload(args, mc.vocab_size, max_seq_len)
    kw = engine_kwargs(args, args.slots, max_seq_len)
    log(bench_common.model_banner(name, mc, args.dtype))
    log(f"workload: {len(wl.prompts)} requests, prompt len mean {np.mean(wl.input_lens):.0f} "
        f"(max {max(wl.input_lens)}), output len mean {np.mean(wl.output_lens):.0f} (max {max(wl.output_lens)}), "
        f"EOS ignored, greedy; request rate {args.request_rate} req/s")
    log(f"engine: {kw}")

    out: dict = {
        **bench_common.run_header(args, name, model_dir, mc, kw),
        "command": " ".join(["python", "scripts/benchmark.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "workload": {"num_requests": len(wl.prompts), "input_lens": wl.input_lens, "output_lens": wl.output_lens,
                     "arrivals_s": wl.arrivals, "total_input_tokens": sum(wl.input_lens),
                     "total_output_tokens": sum(wl.output_lens), "sharegpt_params": SHAREGPT},
        "notes": [
            "offline: all requests submitted at t=0; throughput over the makespan (t=0 to the last token)",
            "token timestamps are StreamDelta.time (perf_counter when the tokens reached the host)",
            f"ITL keeps the 0 gaps between tokens delivered in one host sync ({args.decode_steps} decode steps)",
            "hf: TTFT/TPOT/ITL not observable with batched generate (null); E2E = batch completion time",
            "JAX compilation excluded by a warm-up over every bucket the workload can use",
        ],
    }
    out["warmup"] = warm_up(model, kw, max(wl.input_lens), log)

    offline_wl = dataclasses.replace(wl, arrivals=[0.0] * len(wl.prompts))
    online = None if math.isinf(args.request_rate) else f"online ({args.request_rate:g} req/s Poisson)"
    peers = [b for b in args.baseline.split(",") if b and b != "none"]
    unknown = set(peers) - {"hf", "llamacpp", "llamacpp-bf16", "onnxruntime"}
    if unknown:
        raise SystemExit(f"error: unknown --baseline {sorted(unknown)}; use hf, llamacpp, llamacpp-bf16, onnxruntime "
                         "or none")
    hf_model = load_hf(model, model_dir) if "hf" in peers else None
    llamacpp = [p for p in peers if p.startswith("llamacpp")]
    if llamacpp and (reason := bench_peers.llamacpp_available()):
        raise SystemExit(f"error: --baseline {','.join(llamacpp)}: {reason}")
    peer_dir = model_dir or (str(save_preset(model, name)) if llamacpp or "onnxruntime" in peers else None)
    threads = [int(t) for t in str(args.threads).split(",") if t]
    hf_batch = args.hf_batch_size or args.slots
    runs: dict = {"offline": collections.defaultdict(list)}
    if online:
        runs[online] = collections.defaultdict(list)
    cache0 = jit_cache_sizes()
    def timed(phase: str, key: str, run: dict) -> None:
        runs[phase][key].append(run)
        m = run["metrics"]
        log(f"  run {len(runs[phase][key])}/{args.repeat} {phase} {key}: {m['duration_s']:.2f} s, "
            f"{m['output_throughput']:.1f} output tok/s")

    for rep in range(args.repeat):  # interleaved, so slow phases of a noisy machine hit every mode
        tag = f" #{rep + 1}" if args.repeat > 1 else ""
        for mode in modes:
            timed("offline", mode, run_engine(model, kw, mode, offline_wl, progress, f"{mode} offline{tag}"))
        for th in threads if hf_model is not None else ():
            timed("offline", f"hf@{th}", run_hf(hf_model, offline_wl, hf_batch, th, progress, f"hf@{th} offline{tag}"))
        for peer in llamacpp:
            for th in threads:
                timed("offline", f"{peer}@{th}", run_llamacpp(peer_dir, offline_wl, args.slots, th,
                                                               "bf16" if peer.endswith("bf16") else "f32"))
        for th in threads if "onnxruntime" in peers else ():
            timed("offline", f"onnxruntime@{th}", run_onnxruntime(peer_dir, offline_wl, hf_batch, th))
        if online:
            for mode in modes:
                timed(online, mode, run_engine(model, kw, mode, wl, progress, f"{mode} online{tag}"))
    cache1 = jit_cache_sizes()
    out["compilations_during_timed_runs"] = bench_common.cache_growth(cache0, cache1)
    results = {phase: {mode: median_run(rs) for mode, rs in by_mode.items()} for phase, by_mode in runs.items()}
    pick_best_hf(results["offline"])
    out["results"] = results
    if args.profile:
        out["profile"] = profile_run(model, kw, offline_wl)
        print_profile(out["profile"], log)

    toks = {m: r["tokens"] for m, r in results["offline"].items()}
    out["agreement"] = {f"{a} vs {b}": agreement(toks[a], toks[b])
                        for i, a in enumerate(toks) for b in list(toks)[i + 1:]}
    off = {m: r["metrics"]["output_throughput"] for m, r in results["offline"].items()}
    out["ratios"] = {f"{a} / {b}": off[a] / off[b] for a in off for b in off
                     if a != b and a in modes and (b in peers or (a, b) == ("continuous", "static"))}
    out["roofline"] = roofline(model, kw["max_slots"], results["offline"], sum(wl.output_lens))

    for by_mode in results.values():
        for r in by_mode.values():
            r.pop("tokens")
    print_tables(results, log)
    log("\nratios (offline output tok/s): " + ", ".join(f"{k} = {v:.2f}x" for k, v in out["ratios"].items()))
    rf = out["roofline"]
    log(f"matmul roofline ({rf['rows']} rows, {rf['dtype']}, XLA {rf['gflops']:.0f} GFLOP/s; the best of f32 and "
        f"bf16 in / f32 out: {rf['best_gflops']:.0f}): {rf['tok_per_s']:.0f} tok/s; "
        + ", ".join(f"{m} {pct:.0%}" for m, pct in rf["percent_of_best"].items()) + " of the best")
    log("agreement of greedy outputs: " + ", ".join(
        f"{k}: {v['identical_requests']:.0%} identical" for k, v in out["agreement"].items()))
    comp = out["compilations_during_timed_runs"]
    log(f"JAX compilations during timed runs: {sum(comp.values())} (warm-up excluded compilation from timing)")
    save(out, args, log)  # the main results are safe before the (long) sweep starts

    if sweep:
        out["sweep"] = []
        # hf in the sweep runs with the thread count that won the main comparison
        sweep_threads = [results["offline"]["hf"]["metrics"]["threads"]] if hf_model is not None else []
        for s in sweep:
            # XLA:CPU keeps ~400 memory mappings per compiled executable; one process compiling
            # every bucket of several engine shapes exceeds vm.max_map_count (65530) and aborts
            # ("LLVM ERROR: Unable to allocate section memory"), so drop the compiled code first.
            jax.clear_caches()
            row: dict = {"slots": s, "output_throughput": {}}
            skw = engine_kwargs(args, s, max_seq_len)
            warm_up(model, skw, max(wl.input_lens), lambda m: log(f"[sweep slots={s}] {m}"))
            c0 = jit_cache_sizes()
            point: dict = collections.defaultdict(list)
            for rep in range(args.sweep_repeat):
                for mode in modes:
                    point[mode].append(run_engine(model, skw, mode, offline_wl, progress, f"slots={s} {mode}"))
                for th in sweep_threads:
                    point[f"hf@{th}"].append(run_hf(hf_model, offline_wl, s, th, progress, f"slots={s} hf@{th}"))
            row["compilations"] = sum(jit_cache_sizes().values()) - sum(c0.values())
            med = {mode: median_run(rs) for mode, rs in point.items()}
            pick_best_hf(med)
            row["output_throughput"] = {mode: r["metrics"]["output_throughput"] for mode, r in med.items()}
            row["repeats_output_throughput"] = {mode: r["metrics"]["repeats_output_throughput"] for mode, r in med.items()}
            if "hf" in med:
                row["hf_threads"] = med["hf"]["metrics"]["threads"]
            log(f"[sweep slots={s}] output tok/s: " + ", ".join(f"{k} {v:.1f}" for k, v in row["output_throughput"].items()))
            out["sweep"].append(row)
            save(out, args, log, plots=False)
        save(out, args, log)
    return out


if __name__ == "__main__":
    main()
