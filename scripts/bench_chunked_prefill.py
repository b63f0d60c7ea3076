"""Chunked-prefill acceptance benchmark: inter-token latency (ITL) of short, decoding requests
while one long prompt arrives, with and without chunked prefill (`Engine(prefill_chunk=...)`).

    python scripts/bench_chunked_prefill.py --json benchmarks/results/cpu-chunked-prefill/results.json
    python scripts/bench_chunked_prefill.py --preset llama-20m --max-seq-len 2048 --long-len 1900
    python scripts/bench_chunked_prefill.py --quick          # CPU smoke run (~30 s on 2 cores, mostly compilation)

Model: `--model DIR` (HF checkpoint) or `--preset NAME` (random weights); default stories260K
(../shared/assets/stories260K) when found, else the llama-20m preset. stories260K has
max_position_embeddings 512, so max_seq_len is 512 and the long prompt ~500 tokens.

Scenario (one "run", seeded by --seed; every run uses the same prompts):
1. `--num-short` short requests (random token-id prompts, lengths uniform in --short-len,
   ignore_eos, greedy, `--short-max-tokens` tokens each) are added at t=0 and the engine steps
   until EVERY short request has produced at least `--long-after` tokens (all are decoding);
2. then one long prompt (`--long-len` random ids, `--long-max-tokens`) is added with
   `engine.add_request` (its arrival time = perf_counter just before that call) and the engine
   keeps stepping until everything has finished.
This runs for every `--chunks` entry ("none" = prefill_chunk=None, whole prompt in one step;
an integer = at most that many prompt tokens per slot per step), `--repeat` times, interleaved
(rep 1: none, 32, 64, ...; rep 2: ...) so slow phases of a shared machine hit every
configuration; every reported statistic is the MEDIAN over the repeats of that statistic.

Metrics (short requests only; timestamps are StreamDelta.time, perf_counter when the tokens
reached the host; every token of one host sync shares its delta's timestamp):
- per-sync gaps ("sync_gap"): time between successive deltas of the same short request. One
  delta = one host sync, so this is the latency a streaming client sees between updates. The
  first delta (TTFT) is not a gap.
- per-token ITL ("itl"): a delta of k tokens after a gap g contributes g for its first token
  and 0 for each of the other k - 1 (the convention of scripts/bench_metrics.py). With the
  default --decode-steps 1 each delta carries one token and both distributions coincide.
Both are reported over the whole run ("all") and over the gaps that END inside the long
request's prefill window ("window": after the long request was added, up to and including the
host sync that delivered its first token) -- the window is where a long prefill stalls decoding.
p50/p90/p99 use linear interpolation (numpy's default). Also reported: the long request's TTFT
(first token time - arrival), its number of engine steps to the first token (>= ceil((long_len
- 1) / chunk) with chunking: the last prompt token is fed by the first decode step, not by
prefill) and engine.stats()["prefill_tokens"].

Compilation: with `--warmup full` (default) every (batch bucket, length bucket) admit/prefill
shape plus decode/fork/evict is compiled first by scripts/bench_common.py's warm_up (all chunk sizes
share the same EngineConfig, so the same compiled code). Then, in both warm-up modes, one
unmeasured run of the scenario per configuration: the scheduling is deterministic (the long
prompt arrives after a token count, not a time), so this alone compiles every shape the measured
runs use -- `--warmup scenario` (what --quick uses) skips the full warm-up, which takes minutes
of compilation on a small CPU. The jit cache sizes are checked around every measured run and a
run that compiled anything is an error (RuntimeError).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import numpy as np

import bench_common
from bench_common import cache_growth, jit_cache_sizes, load_model_arg, log, warm_up
from bench_metrics import percentile

STATS = ("p50", "p90", "p99", "max")


def parse_chunks(spec: str) -> list[int | None]:
    out: list[int | None] = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("none", "0"):
            out.append(None)
            continue
        try:
            v = int(part)
        except ValueError:
            v = -1
        if v < 1:
            raise argparse.ArgumentTypeError(f"bad chunk {part!r}: use 'none' or a positive integer")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("--chunks is empty")
    return out


def parse_range(spec: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in spec.split(":")) if ":" in spec else (int(spec),) * 2
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"bad length range {spec!r}: use LO:HI or L (>= 1)")
    return lo, hi


def chunk_name(c: int | None) -> str:
    return "unchunked" if c is None else f"chunk={c}"


def summarize(xs: list[float]) -> dict:
    """n and p50/p90/p99/max in milliseconds (None when empty)."""
    if not xs:
        return {"n": 0, **dict.fromkeys(STATS)}
    ms = [1000.0 * x for x in xs]
    return {"n": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "max": max(ms)}


# ---------------------------------------------------------------------------- one run
def run_once(model, kw: dict, chunk: int | None, short_prompts: list[list[int]], long_prompt: list[int],
             args) -> dict:
    import jaxinfer

    engine = jaxinfer.Engine(model, mode="continuous", seed=0, prefill_chunk=chunk, **kw)
    sp_short = jaxinfer.SamplingParams(max_tokens=args.short_max_tokens, temperature=0.0, ignore_eos=True)
    sp_long = jaxinfer.SamplingParams(max_tokens=args.long_max_tokens, temperature=0.0, ignore_eos=True)
    deltas: dict[int, list[tuple[float, int]]] = {}  # request id -> [(time, tokens in the delta)]
    finished: set[int] = set()
    short_ids = [engine.add_request(p, sp_short) for p in short_prompts]
    for r in short_ids:
        deltas[r] = []
    counts = dict.fromkeys(short_ids, 0)
    long_id = None
    long_arrival = None
    long_added_step = None
    long_first_step = None
    steps = 0
    step_times: list[float] = []  # end of every step (perf_counter)
    gc.collect()
    t0 = time.perf_counter()
    while engine.has_unfinished() or long_id is None:
        if long_id is None and min(counts.values()) >= args.long_after:
            long_arrival = time.perf_counter()
            long_id = engine.add_request(long_prompt, sp_long)
            long_added_step = steps
            deltas[long_id] = []
        if not engine.has_unfinished():  # cannot happen unless long_after > short_max_tokens
            raise RuntimeError("the short requests finished before the long prompt was added; "
                               "lower --long-after or raise --short-max-tokens")
        out = engine.step()
        steps += 1
        step_times.append(time.perf_counter())
        for d in out:
            if d.token_ids:
                deltas[d.request_id].append((d.time, len(d.token_ids)))
                if d.request_id in counts:
                    counts[d.request_id] += len(d.token_ids)
                if d.request_id == long_id and long_first_step is None:
                    long_first_step = steps
            if d.finish_reason is not None:
                finished.add(d.request_id)
    t_end = time.perf_counter()
    stats = engine.stats()

    long_times = deltas[long_id]
    long_first = long_times[0][0] if long_times else None
    long_tokens = sum(k for _, k in long_times)
    # window: gaps ending after the long request arrived, up to the sync of its first token
    in_window = (lambda t: long_arrival < t <= long_first) if long_first is not None else (lambda t: False)
    sync_all, sync_win, itl_all, itl_win = [], [], [], []
    short_tokens = []
    for r in short_ids:
        ds = deltas[r]
        short_tokens.append(sum(k for _, k in ds))
        for (ta, _), (tb, k) in zip(ds, ds[1:]):
            g = tb - ta
            sync_all.append(g)
            itl_all.extend([g] + [0.0] * (k - 1))
            if in_window(tb):
                sync_win.append(g)
                itl_win.extend([g] + [0.0] * (k - 1))
        if ds and ds[0][1] > 1:  # the first delta's extra tokens: gaps of 0 within that sync
            itl_all.extend([0.0] * (ds[0][1] - 1))
            if in_window(ds[0][0]):
                itl_win.extend([0.0] * (ds[0][1] - 1))
    return {
        "prefill_chunk": chunk,
        "duration_s": t_end - t0,
        "engine_steps": steps,
        "long": {
            "prompt_len": len(long_prompt), "arrival_s": long_arrival - t0,
            "ttft_ms": None if long_first is None else 1000.0 * (long_first - long_arrival),
            "added_at_step": long_added_step,
            "steps_to_first_token": None if long_first_step is None else long_first_step - long_added_step,
            "output_tokens": long_tokens, "finished": long_id in finished,
        },
        "short": {
            "num": len(short_ids), "output_tokens": short_tokens,
            "all_finished": all(r in finished for r in short_ids),
            "sync_gap_ms": {"all": summarize(sync_all), "window": summarize(sync_win)},
            "itl_ms": {"all": summarize(itl_all), "window": summarize(itl_win)},
        },
        "stats": stats,
        "step_ms": [1000.0 * (b - a) for a, b in zip([t0] + step_times, step_times)],
    }


def median_of(runs: list[dict]) -> dict:
    """Per statistic, the median over the repeats (and every repeat's value)."""
    def med(get):
        vals = [get(r) for r in runs]
        vals = [v for v in vals if v is not None]
        return (float(np.median(vals)) if vals else None), vals

    out: dict = {"repeats": len(runs)}
    for dist in ("sync_gap_ms", "itl_ms"):
        out[dist] = {}
        for scope in ("all", "window"):
            out[dist][scope] = {}
            for s in STATS:
                m, vals = med(lambda r: r["short"][dist][scope][s])
                out[dist][scope][s] = m
                out[dist][scope][f"{s}_repeats"] = vals
    for key in ("ttft_ms", "steps_to_first_token"):
        m, vals = med(lambda r: r["long"][key])
        out[f"long_{key}"] = m
        out[f"long_{key}_repeats"] = vals
    m, vals = med(lambda r: r["duration_s"])
    out["duration_s"], out["duration_s_repeats"] = m, vals
    return out


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_model_args(ap, "llama-20m, tiny, ...")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-seq-len", type=int, default=512, help="capped at the model's max_position_embeddings")
    ap.add_argument("--num-short", type=int, default=8, help="short requests decoding when the long prompt arrives")
    ap.add_argument("--short-len", type=parse_range, default="16:32", help="short prompt lengths, uniform LO:HI")
    ap.add_argument("--short-max-tokens", type=int, default=128)
    ap.add_argument("--long-len", type=int, default=0,
                    help="long prompt length; 0: max_seq_len - --long-max-tokens")
    ap.add_argument("--long-max-tokens", type=int, default=16)
    ap.add_argument("--long-after", type=int, default=4,
                    help="add the long prompt once every short request has produced this many tokens")
    ap.add_argument("--chunks", type=parse_chunks, default="none,32,64,128",
                    help="comma list of prefill_chunk values; 'none' = unchunked")
    ap.add_argument("--decode-steps", type=int, default=1, help="decode steps per host sync")
    ap.add_argument("--slots", type=int, default=0, help="engine max_slots; 0: --num-short + 1")
    ap.add_argument("--max-prefill-batch", type=int, default=0, help="0: --num-short")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration, interleaved; medians reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", choices=("full", "scenario"), default=None,
                    help="full (default): every bucket pair + one unmeasured run per configuration; scenario "
                         "(default with --quick): only the unmeasured runs")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: max_seq_len <= 128, 4 short requests x 24 tokens (added after 2), "
                         "long prompt max_seq_len - 8 with 8 tokens, chunks none,32, one repeat, --warmup "
                         "scenario (explicit flags win, except that max_seq_len is capped)")
    ap.add_argument("--json", help="write args, per-run and median results here")
    return ap


def main(argv=None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        args.max_seq_len = min(args.max_seq_len, 128)
        quick = {"num_short": 4, "short_max_tokens": 24, "long_after": 2, "long_max_tokens": 8,
                 "chunks": [None, 32], "repeat": 1}
        for k, v in quick.items():  # explicit flags win
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    if args.warmup is None:
        args.warmup = "scenario" if args.quick else "full"

    model, name, model_dir = load_model_arg(args)
    mc = model.config
    max_seq_len = min(args.max_seq_len, mc.max_position_embeddings)
    long_len = args.long_len or max_seq_len - args.long_max_tokens
    lo, hi = args.short_len
    if long_len + 1 > max_seq_len:
        raise SystemExit(f"error: long prompt {long_len} + 1 > max_seq_len {max_seq_len}")
    if hi + args.short_max_tokens > max_seq_len:
        raise SystemExit(f"error: short prompt {hi} + {args.short_max_tokens} tokens > max_seq_len {max_seq_len}")
    if args.long_after >= args.short_max_tokens:
        raise SystemExit("error: --long-after must be < --short-max-tokens")
    slots = args.slots or args.num_short + 1
    if slots < args.num_short + 1:
        raise SystemExit(f"error: --slots {slots} < --num-short + 1: the long request needs a free slot")
    kw = bench_common.engine_kwargs(slots, max_seq_len, args.page_size, args.decode_steps,
                                    args.max_prefill_batch or args.num_short)
    kw["prefix_caching"] = not args.no_prefix_caching

    rng = np.random.default_rng(args.seed)
    short_prompts = [bench_common.random_prompt(rng, mc.vocab_size, int(n))
                     for n in rng.integers(lo, hi + 1, args.num_short)]
    long_prompt = bench_common.random_prompt(rng, mc.vocab_size, long_len)

    log(bench_common.model_banner(name, mc, args.dtype))
    log(f"scenario: {args.num_short} short requests (prompts {lo}-{hi} tokens, {args.short_max_tokens} output "
        f"tokens, EOS ignored, greedy) decoding; after each produced {args.long_after} tokens one long prompt of "
        f"{long_len} tokens ({args.long_max_tokens} output tokens) arrives")
    log(f"engine: {kw}; prefill_chunk in {[chunk_name(c) for c in args.chunks]}; {args.repeat} repeats interleaved")

    out: dict = {
        **bench_common.run_header(args, name, model_dir, mc, kw),
        "workload": {"short_prompt_lens": [len(p) for p in short_prompts], "long_prompt_len": long_len},
        "notes": [
            "timestamps: StreamDelta.time (perf_counter when the tokens reached the host)",
            "sync_gap: time between successive deltas (host syncs) of one short request",
            "itl: per token; a delta of k tokens after a gap g gives g for its first token and 0 for the other k-1",
            "all: every gap of the short requests over the run; window: gaps ending after the long request "
            "arrived, up to and including the host sync that delivered its first token",
            "long_ttft_ms: first token time of the long request - the time just before add_request",
            "every reported statistic is the median over the repeats (each repeat's value is kept)",
            "compilation excluded: warm-up over every bucket; jit cache sizes checked around every run",
        ],
    }
    out["warmup"] = {"mode": args.warmup}
    if args.warmup == "full":
        out["warmup"].update(warm_up(model, kw, max(long_len, hi), log, seed=args.seed))
    t = time.perf_counter()
    before = jit_cache_sizes()
    for c in args.chunks:  # one unmeasured run per configuration: exactly the measured runs' shapes
        run_once(model, kw, c, short_prompts, long_prompt, args)
    after = jit_cache_sizes()
    out["warmup"]["scenario_seconds"] = time.perf_counter() - t
    out["warmup"]["scenario_new_compilations"] = cache_growth(before, after)
    log(f"warm-up: one unmeasured run per configuration in {out['warmup']['scenario_seconds']:.1f} s, "
        f"{sum(after.values()) - sum(before.values())} new compilations")

    runs: dict[str, list[dict]] = {chunk_name(c): [] for c in args.chunks}
    for rep in range(args.repeat):
        for c in args.chunks:
            before = jit_cache_sizes()
            r = run_once(model, kw, c, short_prompts, long_prompt, args)
            after = jit_cache_sizes()
            grew = {k: after[k] - before[k] for k in after if after[k] != before[k]}
            if grew:
                raise RuntimeError(f"JAX compiled during the measured run {chunk_name(c)} #{rep + 1}: {grew}")
            runs[chunk_name(c)].append(r)
            s = r["short"]["sync_gap_ms"]
            log(f"  run {rep + 1}/{args.repeat} {chunk_name(c):<10} {r['duration_s']:.2f} s, {r['engine_steps']} steps; "
                f"short sync gap p99 {s['all']['p99']:.2f} ms max {s['all']['max']:.2f} ms; long TTFT "
                f"{r['long']['ttft_ms']:.1f} ms in {r['long']['steps_to_first_token']} steps")
    out["compilations_during_measured_runs"] = 0
    out["runs"] = runs
    out["results"] = {k: median_of(v) for k, v in runs.items()}
    print_table(out["results"], args, log)
    if args.json:
        bench_common.write_json(args.json, out)
        log(f"wrote {args.json}")
    return out


def print_table(results: dict, args, log) -> None:
    f = lambda v, w=8, p=2: f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
    same = args.decode_steps == 1
    log(f"\n== short requests' inter-token latency (ms), medians over {args.repeat} repeats ==")
    log("   sync gap = time between successive deltas of one request; "
        + ("with decode_steps=1 each delta is one token, so per-token ITL is identical"
           if same else f"per-token ITL (0 within a {args.decode_steps}-step sync) is in the JSON"))
    log(f"{'config':<11}| {'all gaps':^35} | {'during the long prefill':^35} | {'long request':^18}")
    log(f"{'':<11}| {'p50':>8}{'p90':>9}{'p99':>9}{'max':>9} | {'p50':>8}{'p90':>9}{'p99':>9}{'max':>9} | "
        f"{'TTFT ms':>9}{'steps':>8}")
    for k, r in results.items():
        a, w = r["sync_gap_ms"]["all"], r["sync_gap_ms"]["window"]
        log(f"{k:<11}| {f(a['p50'])} {f(a['p90'])} {f(a['p99'])} {f(a['max'])} | "
            f"{f(w['p50'])} {f(w['p90'])} {f(w['p99'])} {f(w['max'])} | {f(r['long_ttft_ms'], 9, 1)}"
            f"{f(r['long_steps_to_first_token'], 8, 0)}")
    if not same:
        log("\nper-token ITL (ms; 0 for the later tokens of a sync):")
        for k, r in results.items():
            a, w = r["itl_ms"]["all"], r["itl_ms"]["window"]
            log(f"{k:<11}| {f(a['p50'])} {f(a['p90'])} {f(a['p99'])} {f(a['max'])} | "
                f"{f(w['p50'])} {f(w['p90'])} {f(w['p99'])} {f(w['max'])}")


if __name__ == "__main__":
    main()
