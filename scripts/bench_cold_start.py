"""Cold start: how long a fresh process takes before (and until) its work is done.

    python scripts/bench_cold_start.py [--model DIR | --preset NAME] [--json PATH]

Measures, each in a fresh Python process and a fresh compiled-step cache directory
(JAXINFER_CACHE_DIR, see jaxinfer/aot.py):
1. the README Quickstart command (`python -m jaxinfer generate --prompt "Once upon a time"`),
   wall time of the whole process, cold (empty cache) and warm (second run);
2. the 48-request workload (prompts 8-96 tokens, outputs 8-160, greedy, EOS ignored, seed 0;
   16 slots, 8 decode steps per sync): the first run in a cold process, the first run in a
   warm process, and a second run inside that same process (everything compiled), plus
   `import jaxinfer` alone.
Prints a table; `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common

ROOT = Path(__file__).resolve().parents[1]

WORKLOAD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import jaxinfer
t_import = time.perf_counter() - t0
args = json.loads(sys.argv[1])
if args["preset"]:
    model = jaxinfer.dummy_model(jaxinfer.get_preset(args["preset"]), dtype=args["dtype"], compute_dtype=args["compute_dtype"])
else:
    model = jaxinfer.load_model(args["model"], dtype=args["dtype"], compute_dtype=args["compute_dtype"])
rng = np.random.default_rng(0)
vocab = model.config.vocab_size
prompts = [rng.integers(3, vocab, int(n)).tolist() for n in rng.integers(8, 97, 48)]
params = [jaxinfer.SamplingParams(max_tokens=int(m), temperature=0.0, ignore_eos=True) for m in rng.integers(8, 161, 48)]
runs = []
for _ in range(2):
    engine = jaxinfer.Engine(model, max_slots=16, page_size=16, num_pages=16 * 32 + 1, max_seq_len=512, decode_steps=8)
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    runs.append(time.perf_counter() - t)
print(json.dumps({"import_s": t_import, "process_s": time.perf_counter() - t0, "first_run_s": runs[0],
                  "second_run_s": runs[1], "tokens": sum(len(o.token_ids) for o in outs),
                  "stats": jaxinfer.aot.steps().stats, "compiled_by_step": jaxinfer.aot.steps().compiled_by_step,
                  "plan": {k: len(v) for k, v in engine.bucket_plan().items()}}))
"""


def _run(cmd: list[str], cache: str) -> tuple[float, str]:
    env = {**os.environ, "JAXINFER_CACHE_DIR": cache}
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t, res.stdout


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_model_args(ap)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compute-dtype", default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import jaxinfer

    model_dir = args.model or (None if args.preset else str(jaxinfer.default_model_dir()))
    out: dict = {"model": args.preset or model_dir}
    with tempfile.TemporaryDirectory() as cache:
        quick = [sys.executable, "-m", "jaxinfer", "generate", "--prompt", "Once upon a time"]
        out["quickstart_cold_s"], _ = _run(quick, cache)
        out["quickstart_warm_s"], _ = _run(quick, cache)
    spec = json.dumps({"model": model_dir, "preset": args.preset, "dtype": args.dtype,
                       "compute_dtype": args.compute_dtype})
    with tempfile.TemporaryDirectory() as cache:
        _, cold = _run([sys.executable, "-c", WORKLOAD, spec], cache)
        _, warm = _run([sys.executable, "-c", WORKLOAD, spec], cache)
    out["workload_cold"], out["workload_warm"] = json.loads(cold), json.loads(warm)
    w, c = out["workload_warm"], out["workload_cold"]
    print(f"Quickstart process: cold {out['quickstart_cold_s']:.2f} s, warm cache {out['quickstart_warm_s']:.2f} s")
    print(f"import jaxinfer: {w['import_s']:.2f} s")
    print(f"48-request workload, cold process: first run {c['first_run_s']:.2f} s "
          f"({c['stats']['compiled']} programs compiled in {c['stats']['compile_seconds']:.1f} s: "
          f"{c['compiled_by_step']}; the bucket plan has {sum(c['plan'].values())}), "
          f"second run {c['second_run_s']:.2f} s")
    print(f"48-request workload, warm process: first run {w['first_run_s']:.2f} s "
          f"({w['stats']['loaded']} programs loaded, {w['stats']['compiled']} compiled), second run "
          f"{w['second_run_s']:.2f} s: first / second = {w['first_run_s'] / w['second_run_s']:.2f}x")
    if args.json:
        bench_common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
