"""Where a decode step goes: time one engine decode burst and break it down per XLA op.

    python scripts/profile_decode.py --preset llama-20m --slots 32 --context 128 --max-seq-len 512
    python scripts/profile_decode.py --model ../shared/assets/stories260K --slots 16 --json out.json

Fills `--slots` slots with requests of `--context` prompt tokens, then times the compiled decode
burst (`decode_steps` steps per call) and traces it with `jax.profiler`: every XLA:CPU thunk of
the burst is attributed to a category by the Python function that emitted it (read off the
compiled HLO's stack frames): matmul (the linear layers and lm_head), attention, kv write,
sampling (logits processing, sampling, logprobs), allocator, norm/rope, layer slicing (the
per-layer weight slices/copies of the layer scan), and other. It also measures the matmul
ceiling: each of the step's weight shapes multiplied alone at the step's row count, in the
model's weight dtype, with XLA, in one program (bench_common.matmul_ceiling: the time the
step's matmuls take at XLA's own rate for them), and reports the step against it.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_common

# Python function (in the HLO stack frames) -> category, first match from the innermost frame.
CATEGORIES = (
    ("matmul", ("linear", "lm_head", "matmul")),
    ("attention", ("paged_attention", "_paged_attention", "paged_attention_reference", "decode_attention",
                   "masked_softmax", "view_attention", "view_write", "decode_view", "_gather_view",
                   "chunk_attention", "chunk_attention_reference", "prefill_attention")),
    ("sampling", ("sample", "process_logits", "token_logprobs", "_filter_and_draw", "penalize", "stochastic",
                  "compute", "_finish")),
    ("allocator", ("allocate", "register", "write_tokens", "release", "acquire", "lookup", "alloc")),
    ("norm/rope/residual", ("rms_norm", "apply_rope", "rope_tables", "layer")),
    ("kv write", ("attend",)),
)


def parse_hlo_frames(hlo: str) -> dict[str, list[str]]:
    """instruction name -> function names of its stack, innermost first."""
    funcs = dict(re.findall(r'^(\d+) "(.*)"$', hlo.split("FunctionNames", 1)[1].split("\n\n", 1)[0], re.M))
    locs = {i: f for i, f in re.findall(r"^(\d+) \{file_name_id=\d+ function_name_id=(\d+)", hlo, re.M)}
    frames = {i: (loc, parent) for i, loc, parent in
              re.findall(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", hlo, re.M)}
    out = {}
    for name, frame in re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?stack_frame_id=(\d+)", hlo, re.M):
        stack, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc, parent = frames[frame]
            stack.append(funcs.get(locs.get(loc, ""), "?"))
            frame = parent
        out[name] = stack
    return out


def category(name: str, frames: dict[str, list[str]], opcodes: dict[str, str]) -> str:
    stack = frames.get(name)
    if stack is None:
        return "other"
    for fn in stack:
        parts = fn.replace("<locals>.", "").split(".")
        for cat, names in CATEGORIES:
            if any(p in names for p in parts):
                return cat
    if any(fn.split(".")[0] == "decoder" or fn.endswith("decoder") for fn in stack[:2]) and \
            opcodes.get(name) in ("dynamic-slice", "copy", "fusion"):
        return "layer slicing"
    return "other"


def decode_hlo(engine) -> str:
    """The optimized HLO of the decode program the engine runs next (its slot and span buckets)."""
    from jaxinfer.steps import decode_steps_jit

    slots, span = engine.scheduler.decode_shape(np.asarray(engine.state.length), engine.cfg.decode_steps)
    return decode_steps_jit.lower(engine.cfg, engine.model, engine.state, engine.cfg.decode_steps, slots,
                                  span).compile().as_text()


def trace_breakdown(fn, calls: int) -> dict[tuple[str, str], float]:
    """CPU seconds per (HLO module, HLO op) over `calls` traced calls of fn, from XLA:CPU's
    thunk events (leaf thunks only; thunks of one program may run on both cores at once)."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(calls):
            jax.block_until_ready(fn())
        jax.profiler.stop_trace()
        trace = next(Path(d).rglob("*.trace.json.gz"))
        events = json.load(gzip.open(trace))["traceEvents"]
    thunks = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    # Control-flow thunks (while, conditional) contain the thunks of their bodies, which may run
    # on other threads: count leaves only, i.e. drop an event that encloses another of its run.
    by_run: dict[str, list[dict]] = collections.defaultdict(list)
    for e in thunks:
        by_run[e["args"].get("run_id", "")].append(e)
    spent: collections.Counter = collections.Counter()
    for run in by_run.values():
        run.sort(key=lambda e: (e["ts"], -e["dur"]))
        for i, e in enumerate(run):
            end = e["ts"] + e["dur"]
            nxt = run[i + 1] if i + 1 < len(run) else None
            if nxt is not None and nxt["ts"] < end and nxt["ts"] + nxt["dur"] <= end and nxt is not e:
                continue  # a parent
            spent[(e["args"].get("hlo_module", "?"), e["args"]["hlo_op"])] += e["dur"] * 1e-6
    return dict(spent)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_model_args(ap)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights")
    ap.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16"],
                    help="activations and KV cache (default: --dtype)")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens per slot (the live length)")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=10, help="timed bursts (median reported)")
    ap.add_argument("--trace-calls", type=int, default=3, help="bursts traced for the per-op breakdown")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra jaxinfer.Engine keyword (value parsed as JSON), repeatable")
    ap.add_argument("--json", help="write the results here")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import jax

    import jaxinfer

    model, name, _ = bench_common.load_model_arg(args)
    extra = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.engine_arg)}
    pages_per_seq = -(-args.max_seq_len // args.page_size)
    engine = jaxinfer.Engine(model, max_slots=args.slots, page_size=args.page_size,
                             num_pages=args.slots * pages_per_seq + 1, max_seq_len=args.max_seq_len,
                             decode_steps=args.decode_steps, seed=0, **extra)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    budget = args.max_seq_len - args.context - 1
    steps_needed = (args.repeat + args.trace_calls + 4) * args.decode_steps
    if budget < steps_needed:
        raise SystemExit(f"--max-seq-len {args.max_seq_len} leaves {budget} tokens after --context "
                         f"{args.context}; the run needs {steps_needed}")
    sp = jaxinfer.SamplingParams(max_tokens=budget, temperature=0.0, ignore_eos=True)
    for _ in range(args.slots):
        engine.add_request(rng.integers(3, vocab, args.context).tolist(), sp)
    while engine.scheduler.waiting or engine.scheduler.prefill_rows():
        engine.step()
    engine.step()  # every slot decoding

    def call():  # one whole engine step: schedule, the decode burst, hand-out (host included)
        return engine.step()

    ts = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t)
    step_ms = 1000 * statistics.median(ts) / args.decode_steps

    hlo = decode_hlo(engine)
    frames = parse_hlo_frames(hlo)
    opcodes = dict(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", hlo, re.M))
    spent = trace_breakdown(call, args.trace_calls)
    by_cat: collections.Counter = collections.Counter()
    by_cat_ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (module, op), sec in spent.items():
        cat = category(op, frames, opcodes) if module == "jit_decode_steps" else "other programs"
        by_cat[cat] += sec
        by_cat_ops[cat][f"{op} ({opcodes.get(op, '?')}: {'/'.join(frames.get(op, [])[:2])})"] += sec
    device_ms = 1000 * sum(by_cat.values()) / (args.trace_calls * args.decode_steps)
    by_cat["host + dispatch"] = max(0.0, step_ms - device_ms) * args.trace_calls * args.decode_steps / 1000
    total = sum(by_cat.values()) or 1.0
    ceiling = bench_common.matmul_ceiling(model, args.slots)
    ceiling_ms = 1000 * ceiling["seconds"]
    result = {
        "model": name, "params": model.config.num_params(), "dtype": str(model.weight_dtype),
        "compute_dtype": str(model.dtype), "slots": args.slots,
        "context": args.context, "max_seq_len": args.max_seq_len, "decode_steps": args.decode_steps,
        "engine_args": extra, "step_ms": step_ms, "tokens_per_s": args.slots * 1000 / step_ms,
        "breakdown_share": {k: v / total for k, v in by_cat.most_common()},
        "breakdown_ms_per_step": {k: 1000 * v / (args.trace_calls * args.decode_steps) for k, v in by_cat.most_common()},
        "top_ops_ms_per_step": {f"{m}/{op}": 1000 * sec / (args.trace_calls * args.decode_steps)
                                for (m, op), sec in sorted(spent.items(), key=lambda kv: -kv[1])[:15]},
        "top_ops_by_category_ms_per_step": {
            cat: {op: 1000 * sec / (args.trace_calls * args.decode_steps) for op, sec in ops.most_common(6)}
            for cat, ops in by_cat_ops.items()},
        "matmul_ceiling": ceiling, "matmul_ceiling_ms": ceiling_ms, "step_over_matmul_ceiling": step_ms / ceiling_ms,
        "jax": jax.__version__,
    }
    print(f"{name}: {args.slots} slots, context {args.context}, max_seq_len {args.max_seq_len}, "
          f"weights {model.weight_dtype}, compute {model.dtype}")
    print(f"decode step {step_ms:.2f} ms ({result['tokens_per_s']:.0f} tok/s); its matmuls alone at XLA's rate "
          f"{ceiling_ms:.2f} ms ({ceiling['gflops']:.0f} GFLOP/s): step / ceiling = {step_ms / ceiling_ms:.2f}x")
    print(f"{'category':<16}{'share':>8}{'ms/step':>10}")
    for k, v in by_cat.most_common():
        print(f"{k:<16}{v / total:>8.1%}{result['breakdown_ms_per_step'][k]:>10.3f}")
    for cat, ops in result["top_ops_by_category_ms_per_step"].items():
        if cat in ("attention", "matmul", "other"):
            print(f"  {cat}:", "; ".join(f"{k} {v:.3f}" for k, v in list(ops.items())[:5]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
