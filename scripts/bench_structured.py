"""Structured output benchmark (issue 17): decode tokens/s of the same workload with and
without a JSON-schema constraint (the cost of the on-device mask + automaton step), and the
time to compile a schema for a tokenizer (outlines-core Index + our device layout).

Workload: `--requests` prompts sampled at temperature 1 with fixed seeds, each generating
`--tokens` tokens, unconstrained (ignore_eos) vs constrained by SCHEMA (one string with a
minLength no run reaches: the mask is applied at every step and both runs decode exactly
requests x tokens).

    python scripts/bench_structured.py --model stories260K --out benchmarks/results/structured/cpu-stories260k.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax

import jaxinfer
from jaxinfer import Engine, SamplingParams, structured

# An object with one long string: every step of the constrained run is a real mask (most of the
# vocabulary allowed inside the string), and minLength keeps the string open for the whole
# token budget, so both runs decode exactly requests x tokens (the automaton has ~1000 states:
# the engine's table is sized for it with grammar_states).
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 1000}}, "required": ["story"]}
# For the compile-time measurement: the kind of schema an extraction request sends.
COMPILE_SCHEMAS = {
    "small": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"]},
    "medium": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 100000},
        "title": {"type": "string", "maxLength": 32},
        "tags": {"type": "array", "items": {"enum": ["news", "sport", "tech", "art"]}, "minItems": 1, "maxItems": 4},
        "author": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                    "verified": {"type": "boolean"}},
                   "required": ["name", "verified"]}}, "required": ["id", "title", "tags", "author"]},
}


def run(engine, params, prompts) -> tuple[float, int]:
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    dt = time.perf_counter() - t
    return dt, sum(len(o.token_ids) for o in outs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="stories260K", help="stories260K, or a HF model directory")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/structured/cpu-stories260k.json")
    a = ap.parse_args()
    path = jaxinfer.default_model_dir() if a.model == "stories260K" else a.model
    model, tok = jaxinfer.load_model(path), jaxinfer.load_tokenizer(path)
    engine = Engine(model, tokenizer=tok, max_slots=a.requests, max_seq_len=256, num_pages=a.requests * 20,
                    decode_steps=8, precompile=True, grammar_states=1024 + 64)
    prompts = ["Once upon a time"] * a.requests
    plain = [SamplingParams(max_tokens=a.tokens, temperature=1.0, seed=i, ignore_eos=True) for i in range(a.requests)]
    constrained = [SamplingParams(max_tokens=a.tokens, temperature=1.0, seed=i, json_schema=SCHEMA)
                   for i in range(a.requests)]
    run(engine, plain, prompts)  # warm-up: compiles, and loads the schema into the device table
    run(engine, constrained, prompts)
    results = {}
    for name, params in (("unconstrained", plain), ("json_schema", constrained)):
        rates = []
        for _ in range(a.repeats):
            dt, n = run(engine, params, prompts)
            rates.append(n / dt)
        results[name] = {"tokens_per_s": sorted(rates)[len(rates) // 2], "all_tokens_per_s": rates, "tokens": n}
    results["constrained_over_unconstrained"] = results["json_schema"]["tokens_per_s"] / results["unconstrained"]["tokens_per_s"]
    compile_times = {}
    for name, schema in COMPILE_SCHEMAS.items():
        structured._cache.clear()
        t = time.perf_counter()
        auto = structured.compile_constraint("json", schema, tok, model.config.vocab_size, engine.eos_ids)
        compile_times[name] = {"seconds": time.perf_counter() - t, "states": auto.num_states,
                               "classes": auto.num_classes}
        t = time.perf_counter()
        structured.compile_constraint("json", schema, tok, model.config.vocab_size, engine.eos_ids)
        compile_times[name]["cached_seconds"] = time.perf_counter() - t
    out = {"model": a.model, "vocab": model.config.vocab_size, "requests": a.requests, "tokens_per_request": a.tokens,
           "decode_steps": 8, "device": str(jax.devices()[0]), "machine": platform.machine(),
           "decode": results, "schema_compile": compile_times}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
