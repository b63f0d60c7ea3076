"""Command line: `python -m jaxinfer generate [--model DIR] --prompt TEXT ...` streams text.

Without --model the built-in default is used: the real pretrained stories260K checkpoint when
the shared test assets are next to the repository (../shared/assets/stories260K, or the
JAXINFER_DEFAULT_MODEL directory), otherwise the random-weight `tiny` preset with a byte
tokenizer (its text is gibberish, but it runs the whole pipeline with no files at all).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jaxinfer

DEFAULT_PROMPT = "Once upon a time"


def load(model_dir: str | None, preset: str | None, dtype: str, compute_dtype: str | None = None):
    """Returns (model, tokenizer, description)."""
    if preset:
        model = jaxinfer.dummy_model(jaxinfer.get_preset(preset), dtype=dtype, compute_dtype=compute_dtype)
        tok = jaxinfer.ByteTokenizer() if model.config.vocab_size >= 258 else None
        return model, tok, f"preset {preset!r} with random weights"
    path = Path(model_dir) if model_dir else jaxinfer.default_model_dir()
    if path is None:
        return load(None, "tiny", dtype, compute_dtype)[:2] + (
            "built-in default: random-weight 'tiny' preset + byte tokenizer (stories260K not found)",)
    model = jaxinfer.load_model(path, dtype=dtype, compute_dtype=compute_dtype)
    what = str(path) if model_dir else f"built-in default: stories260K at {path}"
    return model, jaxinfer.load_tokenizer(path), what


def cmd_generate(args) -> int:
    model, tok, what = load(args.model, args.preset, args.dtype, args.compute_dtype)
    print(f"[jaxinfer] model: {what} ({model.config.num_params() / 1e6:.2f}M params)", file=sys.stderr)
    engine = jaxinfer.Engine(model, max_slots=args.slots, page_size=args.page_size, num_pages=args.num_pages,
                             max_seq_len=args.max_seq_len, tokenizer=tok)
    if args.verbose:
        plan = engine.bucket_plan()
        print(f"[jaxinfer] bucket plan ({sum(map(len, plan.values()))} programs at most): "
              + "; ".join(f"{k} {v}" if v != [None] else k for k, v in plan.items()), file=sys.stderr)
        print(f"[jaxinfer] compiled-step cache: {jaxinfer.aot.cache_dir() or 'off (memory only)'}", file=sys.stderr)
    if args.precompile:
        t = time.perf_counter()
        engine.precompile()
        print(f"[jaxinfer] precompiled the plan in {time.perf_counter() - t:.2f}s", file=sys.stderr)
    params = jaxinfer.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, min_p=args.min_p, seed=args.seed)
    prompts = args.prompt or [DEFAULT_PROMPT]
    if tok is None:
        prompts = [[int(t) for t in p.split()] for p in prompts]
    start, n_tokens = time.perf_counter(), 0
    texts: dict[int, str] = {}
    if len(prompts) == 1 and tok is not None:
        print(prompts[0], end="", flush=True)
    try:
        for d in engine.stream(prompts, params):
            n_tokens += len(d.token_ids)
            text = d.text if tok is not None else "".join(f" {t}" for t in d.token_ids)
            if len(prompts) == 1:  # one prompt: stream it live
                print(text, end="", flush=True)
                continue
            texts[d.index] = texts.get(d.index, "") + text
            if d.finish_reason is not None:  # several: print each as it finishes
                print(f"--- [{d.index}] {prompts[d.index]!r} ({d.finish_reason})\n{texts[d.index]}", flush=True)
    except jaxinfer.InvalidRequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(f"\n[jaxinfer] {n_tokens} tokens in {elapsed:.2f}s (including compilation)", file=sys.stderr)
    if args.verbose:
        st = jaxinfer.aot.steps().stats
        print(f"[jaxinfer] programs: {st['compiled']} compiled ({st['compile_seconds']:.2f}s), "
              f"{st['loaded']} loaded from the cache", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxinfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text, streamed to stdout")
    g.add_argument("--model", help="Hugging Face checkpoint directory (default: built-in, see above)")
    g.add_argument("--preset", help="random weights with a named preset's shapes instead of --model")
    g.add_argument("--prompt", action="append", help=f"prompt text; repeat for several (default {DEFAULT_PROMPT!r})")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights")
    g.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="activations and KV cache (default: --dtype; on CPU, bfloat16 weights run fastest "
                        "with float32 compute)")
    g.add_argument("--slots", type=int, default=4)
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--num-pages", type=int, default=256)
    g.add_argument("--max-seq-len", type=int, default=512)
    g.add_argument("--verbose", action="store_true", help="print the bucket plan and what was compiled")
    g.add_argument("--precompile", action="store_true", help="compile every program of the bucket plan first")
    g.set_defaults(func=cmd_generate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
