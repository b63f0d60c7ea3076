"""Sharded serving on a fake 8-device CPU mesh: overheads only (docs/scaling.md has the GPU paper
numbers). The 8 "devices" share this machine's cores, so a mesh cannot be faster here; what it
shows is what sharding costs in collectives and per-device dispatch at each layout.

    python scripts/bench_sharding.py --out benchmarks/results/sharding/cpu.json

Runs the same greedy workload (prompts, max_tokens) on: one device, tp = 2, 4, 8, and tp = 4 x dp
= 2; reports generated tokens per second (after a warm-up run that compiles everything) and
checks that every layout produces the one-device tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-20m")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAXINFER_CACHE_DIR", "0")
    import jax  # noqa: E402  (after XLA_FLAGS)
    import numpy as np

    import jaxinfer

    config = jaxinfer.get_preset(args.preset)
    model = jaxinfer.dummy_model(config, seed=0)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, config.vocab_size, int(rng.integers(8, 64))))) for _ in range(args.requests)]
    sp = jaxinfer.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    kw = dict(max_slots=args.slots, page_size=16, num_pages=256, max_seq_len=256, attention_backend="xla",
              precompile=False)
    rows, ref = [], None
    for tp, dp in [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2)]:
        mesh = None if tp * dp == 1 else jaxinfer.make_mesh(tp=tp, dp=dp)
        slots = args.slots // dp  # the same total slots
        engine = jaxinfer.Engine(model, mesh=mesh, **{**kw, "max_slots": slots})
        engine.generate(prompts, sp)  # warm-up: compiles every program the workload needs
        t = time.perf_counter()
        outs = engine.generate(prompts, sp)
        dt = time.perf_counter() - t
        tokens = [o.samples[0].token_ids for o in outs]
        ref = tokens if ref is None else ref
        n = sum(map(len, tokens))
        rows.append(dict(tp=tp, dp=dp, slots_per_replica=slots, seconds=dt, tokens=n, tok_per_s=n / dt,
                         same_tokens_as_one_device=tokens == ref))
        print(f"tp {tp} dp {dp}: {n / dt:8.1f} tok/s  ({dt:.2f} s)  same tokens: {tokens == ref}", flush=True)
    base = rows[0]["tok_per_s"]
    for r in rows:
        r["vs_one_device"] = r["tok_per_s"] / base
    record = dict(preset=args.preset, requests=args.requests, max_tokens=args.max_tokens, total_slots=args.slots,
                  cpu_cores=os.cpu_count(), jax=jax.__version__, rows=rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(r["same_tokens_as_one_device"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
