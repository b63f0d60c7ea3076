"""Continuous vs static batching throughput on one workload (CPU or GPU, whatever JAX runs on).

    python scripts/bench_batching.py                       # stories260K if found, else llama-20m preset
    python scripts/bench_batching.py --preset llama-20m --requests 64 --json out.json

Workload: N requests, prompt lengths uniform in [--min-prompt, --max-prompt], output lengths
uniform in [--min-out, --max-out] (EOS ignored so lengths are exactly as drawn), greedy,
seeded. Both modes run the same requests on the same engine shape after a warm-up that
compiles every bucket, so the timed runs contain no compilation.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxinfer  # noqa: E402
from jaxinfer.__main__ import _default_model_dir  # noqa: E402


def workload(args, vocab):
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, vocab, int(n)).tolist()
               for n in rng.integers(args.min_prompt, args.max_prompt + 1, args.requests)]
    outs = rng.integers(args.min_out, args.max_out + 1, args.requests)
    params = [jaxinfer.SamplingParams(max_tokens=int(m), temperature=0.0, ignore_eos=True) for m in outs]
    return prompts, params


def run(model, args, mode, prompts, params):
    engine = jaxinfer.Engine(model, max_slots=args.slots, page_size=args.page_size, num_pages=args.num_pages,
                             max_seq_len=args.max_seq_len, decode_steps=args.decode_steps, mode=mode)
    cfg = engine.cfg
    for b in cfg.batch_buckets:  # warm-up: compile every (batch, length) bucket and decode
        for t in cfg.prefill_buckets:
            if t <= args.max_prompt or t == cfg.prefill_bucket(args.max_prompt):
                engine.generate([[3] * min(t, cfg.max_seq_len - 1)] * b,
                                jaxinfer.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.token_ids) for o in outs)
    n_in = sum(len(p) for p in prompts)
    return {"mode": mode, "seconds": elapsed, "requests_per_s": len(prompts) / elapsed,
            "output_tokens_per_s": n_out / elapsed, "total_tokens_per_s": (n_in + n_out) / elapsed,
            "output_tokens": n_out, "input_tokens": n_in}, [o.token_ids for o in outs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir (default: stories260K if found)")
    ap.add_argument("--preset", help="random weights of a preset instead (e.g. llama-20m)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=512)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--min-prompt", type=int, default=4)
    ap.add_argument("--max-prompt", type=int, default=64)
    ap.add_argument("--min-out", type=int, default=8)
    ap.add_argument("--max-out", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    if args.preset:
        model, what = jaxinfer.dummy_model(jaxinfer.get_preset(args.preset)), f"preset {args.preset} (random)"
    else:
        path = Path(args.model) if args.model else _default_model_dir()
        if path is None:
            model, what = jaxinfer.dummy_model(jaxinfer.get_preset("llama-20m")), "preset llama-20m (random)"
        else:
            model, what = jaxinfer.load_model(path), str(path)
    prompts, params = workload(args, model.config.vocab_size)
    results, tokens = [], {}
    for mode in ("continuous", "static"):
        r, tokens[mode] = run(model, args, mode, prompts, params)
        results.append(r)
    same = tokens["continuous"] == tokens["static"]
    print(f"model: {what}; {args.requests} requests, {args.slots} slots, backend {jax.default_backend()}")
    print(f"{'mode':<12}{'seconds':>9}{'req/s':>9}{'out tok/s':>11}{'total tok/s':>13}")
    for r in results:
        print(f"{r['mode']:<12}{r['seconds']:>9.2f}{r['requests_per_s']:>9.2f}{r['output_tokens_per_s']:>11.1f}"
              f"{r['total_tokens_per_s']:>13.1f}")
    ratio = results[0]["output_tokens_per_s"] / results[1]["output_tokens_per_s"]
    print(f"continuous / static output tokens/s: {ratio:.2f}x; identical greedy outputs: {same}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "model": what, "args": vars(args), "backend": jax.default_backend(), "machine": platform.platform(),
            "results": results, "continuous_over_static": ratio, "identical_outputs": same}, indent=2))


if __name__ == "__main__":
    main()
