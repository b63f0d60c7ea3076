"""Speculative decoding benchmark: output tokens/s with and without speculation at several batch
sizes, with the acceptance rate and mean accepted length, on two setups:

- `ngram`: stories260K (or --model) with n-gram proposals, on a workload with repetition: each
  prompt is a story the model wrote itself followed by the first half of it again, so the
  continuation repeats earlier lines (prompt lookup's best case, as in summarising or editing);
- `draft`: the llama-20m preset (random weights) with an int4 copy of itself as the draft.

    python scripts/bench_speculative.py --setups ngram,draft --batch 1,4,16 --json out.json

Every timed engine has a twin that ran the same workload first (no compilation is timed); greedy,
`ignore_eos`, so both runs produce exactly the same tokens (checked). "Where it stops paying"
is the smallest batch whose speedup is below 1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bench_common


def workload(setup: str, model, tok, n: int, rng):
    import jaxinfer

    if setup == "ngram":
        seeds = ["Once upon a time", "One day", "Lily and Ben", "The little dog", "Tom had a red ball"]
        engine = jaxinfer.Engine(model, tokenizer=tok, max_slots=8, page_size=16, num_pages=256, max_seq_len=512)
        stories = engine.generate(seeds, jaxinfer.SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True))
        prompts = []
        for i in range(n):
            s = stories[i % len(stories)]
            story = s.prompt_token_ids + s.token_ids
            prompts.append((story + story[1: len(story) // 2])[:300])
        return prompts
    vocab = model.config.vocab_size
    return [bench_common.random_prompt(rng, vocab, 32) for _ in range(n)]


def run(model, tok, prompts, batch: int, max_tokens: int, spec=None, draft=None) -> dict:
    import jaxinfer

    kw = dict(max_slots=batch, page_size=16, num_pages=batch * 40 + 1, max_seq_len=min(512, model.config.max_position_embeddings), decode_steps=8)
    sp = jaxinfer.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    # The same workload once on a twin engine compiles every program (bucket) the timed run
    # uses; compiled steps are shared in-process, and a fresh engine has a cold prefix cache.
    jaxinfer.Engine(model, tokenizer=tok, speculative=spec, draft_model=draft, **kw).generate(prompts, sp)
    engine = jaxinfer.Engine(model, tokenizer=tok, speculative=spec, draft_model=draft, **kw)
    t = time.perf_counter()
    outs = engine.generate(prompts, sp)
    dt = time.perf_counter() - t
    st = engine.stats()
    return {"tokens_per_s": sum(len(o.token_ids) for o in outs) / dt, "seconds": dt,
            "acceptance_rate": st["spec_acceptance_rate"], "mean_accepted_length": st["spec_mean_accepted_length"],
            "tokens": [o.token_ids for o in outs]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="ngram,draft")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--num-tokens", type=int, default=4, help="k: proposals per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-slot", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import numpy as np

    import jaxinfer

    rng = np.random.default_rng(0)
    out = {"num_tokens": args.num_tokens, "max_tokens": args.max_tokens, "setups": {}}
    for setup in args.setups.split(","):
        if setup == "ngram":
            path = jaxinfer.default_model_dir()
            model, tok, name = jaxinfer.load_model(path), jaxinfer.load_tokenizer(path), "stories260K"
            spec, draft = jaxinfer.SpeculativeConfig(method="ngram", num_tokens=args.num_tokens), None
        else:
            model, tok, name = jaxinfer.dummy_model(jaxinfer.get_preset("llama-20m")), None, "llama-20m"
            draft = jaxinfer.quantize(model, "int4")
            spec = jaxinfer.SpeculativeConfig(method="draft", num_tokens=args.num_tokens)
        rows = []
        for b in map(int, args.batch.split(",")):
            prompts = workload(setup, model, tok, b * args.requests_per_slot, rng)
            base = run(model, tok, prompts, b, args.max_tokens)
            fast = run(model, tok, prompts, b, args.max_tokens, spec, draft)
            assert fast["tokens"] == base["tokens"], f"{setup} batch {b}: speculative output differs"
            row = {"batch": b, "plain_tokens_per_s": base["tokens_per_s"], "spec_tokens_per_s": fast["tokens_per_s"],
                   "speedup": fast["tokens_per_s"] / base["tokens_per_s"], "acceptance_rate": fast["acceptance_rate"],
                   "mean_accepted_length": fast["mean_accepted_length"]}
            rows.append(row)
            bench_common.log(f"{setup:>5} ({name}) batch {b:>3}: plain {row['plain_tokens_per_s']:8.1f} tok/s, "
                             f"speculative {row['spec_tokens_per_s']:8.1f} tok/s ({row['speedup']:.2f}x), acceptance "
                             f"{row['acceptance_rate']:.2f}, {row['mean_accepted_length']:.2f} tokens per round")
        stops = [r["batch"] for r in rows if r["speedup"] < 1]
        out["setups"][setup] = {"model": name, "rows": rows, "stops_paying_at_batch": min(stops) if stops else None}
    if args.json:
        bench_common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
