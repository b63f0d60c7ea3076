"""Command line: `python -m jaxinfer generate [--model DIR | --preset NAME] --prompt TEXT ...`
streams text; `python -m jaxinfer serve [--model DIR] [--port 8000]` serves the OpenAI API
(the "serve" extra).

Without --model the built-in default is used: the real pretrained stories260K checkpoint when
the shared test assets are next to the repository (../shared/assets/stories260K, or the
JAXINFER_DEFAULT_MODEL directory), otherwise the random-weight `tiny` preset with a byte
tokenizer (its text is gibberish, but it runs the whole pipeline with no files at all).

A bad flag value, a missing checkpoint or a request the engine refuses prints one
`error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jaxinfer

DEFAULT_PROMPT = "Once upon a time"


def load(model_dir: str | None, preset: str | None, dtype: str, compute_dtype: str | None = None, mesh=None):
    """Returns (model, tokenizer, description)."""
    if preset:
        model = jaxinfer.dummy_model(jaxinfer.get_preset(preset), dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)
        tok = jaxinfer.ByteTokenizer() if model.config.vocab_size >= 258 else None
        return model, tok, f"preset {preset!r} with random weights"
    path = Path(model_dir) if model_dir else jaxinfer.default_model_dir()
    if path is None:
        return load(None, "tiny", dtype, compute_dtype, mesh)[:2] + (
            "built-in default: random-weight 'tiny' preset + byte tokenizer (stories260K not found)",)
    model = jaxinfer.load_model(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh)
    what = str(path) if model_dir else f"built-in default: stories260K at {path}"
    return model, jaxinfer.load_tokenizer(path), what


def parallel_setup(args):
    """The mesh of --tp / --dp (None for one device), after joining the JAX cluster of
    --coordinator / --num-processes / --process-id (jax.distributed; CPU processes talk over
    gloo). On CPU, --cpu-devices N makes each process show N devices (XLA's host-platform
    device count: set before the backend starts). Processes other than 0 print nothing on
    stdout (gloo's own notes go to stderr): every process runs the same program on the same
    requests, process 0 reports."""
    if args.cpu_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
    if args.num_processes > 1:
        if args.coordinator is None or args.process_id is None:
            raise ValueError("--num-processes > 1 needs --coordinator HOST:PORT and --process-id I")
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
        import jax  # local: jaxinfer's import does not start a backend; distributed must come first

        # Gloo's C++ threads print connection notes straight to file descriptor 1, several at
        # once (their lines interleave mid-line). Point fd 1 at stderr so stdout carries only
        # what jaxinfer prints, through a duplicate of the original descriptor.
        sys.stdout.flush()
        ours = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = os.fdopen(ours, "w", buffering=1) if args.process_id == 0 else open(os.devnull, "w")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.tp == 1 and args.dp == 1:
        return None
    return jaxinfer.make_mesh(tp=args.tp, dp=args.dp)


def cmd_generate(args) -> int:
    mesh = parallel_setup(args)
    model, tok, what = load(args.model, args.preset, args.dtype, args.compute_dtype, mesh)
    where = "" if mesh is None else f", tp {args.tp} x dp {args.dp} over {args.num_processes} process(es)"
    print(f"[jaxinfer] model: {what} ({model.config.num_params() / 1e6:.2f}M params{where})", file=sys.stderr)
    if args.verbose:
        print(f"[jaxinfer] read {jaxinfer.checkpoint.bytes_read()} bytes of checkpoint", file=sys.stderr)
    seed = 0 if args.num_processes > 1 and args.seed is None else None  # every process draws the same seeds
    engine = jaxinfer.Engine(model, max_slots=args.slots, page_size=args.page_size, num_pages=args.num_pages,
                             max_seq_len=args.max_seq_len, tokenizer=tok, max_logprobs=max(5, args.logprobs or 0),
                             mesh=mesh, seed=seed)
    if args.verbose:
        plan = engine.bucket_plan()
        print(f"[jaxinfer] bucket plan ({sum(map(len, plan.values()))} programs at most): "
              + "; ".join(f"{k} {v}" if v != [None] else k for k, v in plan.items()), file=sys.stderr)
        print(f"[jaxinfer] compiled-step cache: {jaxinfer.aot.cache_dir() or 'off (memory only)'}", file=sys.stderr)
    if args.precompile:
        t = time.perf_counter()
        engine.precompile()
        print(f"[jaxinfer] precompiled the plan in {time.perf_counter() - t:.2f}s", file=sys.stderr)
    params = jaxinfer.SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, seed=args.seed, stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_id),
        ignore_eos=args.ignore_eos, min_tokens=args.min_tokens, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, logprobs=args.logprobs,
        n=args.n)
    prompts = args.prompt or [DEFAULT_PROMPT]
    if tok is None:
        try:
            prompts = [[int(t) for t in p.split()] for p in prompts]
        except ValueError:
            raise jaxinfer.InvalidRequestError(
                "this model has no tokenizer: --prompt must be space-separated token ids") from None
    live = len(prompts) == 1 and args.n == 1  # one sample: stream it as it comes
    start, n_tokens = time.perf_counter(), 0
    texts: dict[tuple[int, int], str] = {}
    if live and tok is not None:
        print(prompts[0], end="", flush=True)
    with engine.stream(prompts, params) as stream:
        for d in stream:
            n_tokens += len(d.token_ids)
            text = d.text if tok is not None else "".join(f" {t}" for t in d.token_ids)
            if live:
                print(text, end="", flush=True)
                continue
            key = (d.index, d.sample)
            texts[key] = texts.get(key, "") + text
            if d.finish_reason is not None:  # several: print each as it finishes
                label = f"[{d.index}]" + (f" sample {d.sample}" if args.n > 1 else "")
                print(f"--- {label} {prompts[d.index]!r} ({d.finish_reason})\n{texts[key]}", flush=True)
    outs = stream.outputs
    elapsed = time.perf_counter() - start
    print(f"\n[jaxinfer] {n_tokens} tokens in {elapsed:.2f}s (including compilation)", file=sys.stderr)
    for out in outs:
        for sample in out.samples:
            if sample.finish_reason == "length" and len(sample.token_ids) < args.max_tokens:
                print(f"[jaxinfer] note: request {out.request_id} sample {sample.index} was cut at --max-seq-len "
                      f"{args.max_seq_len} (prompt {len(out.prompt_token_ids)} + {len(sample.token_ids)} tokens, "
                      f"before --max-tokens {args.max_tokens}); raise --max-seq-len for longer output",
                      file=sys.stderr)
            if args.logprobs is not None:
                for tid, lp in zip(sample.token_ids, sample.logprobs):
                    top = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(lp.items(), key=lambda kv: -kv[1]))
                    print(f"[jaxinfer] logprobs {tid}: {lp[tid]:.4f}  (top: {top})", file=sys.stderr)
    if args.verbose:
        st = jaxinfer.aot.steps().stats
        print(f"[jaxinfer] programs: {st['compiled']} compiled ({st['compile_seconds']:.2f}s), "
              f"{st['loaded']} loaded from the cache", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    import logging  # noqa: I001 - only the server configures logging

    try:  # the optional "serve" extra (FastAPI, uvicorn) is imported only to serve
        from jaxinfer import server
    except ImportError as e:
        raise jaxinfer.ConfigError(f"serving needs the 'serve' extra: pip install -e \".[serve]\" ({e})") from e
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("jax", "absl"):  # their INFO lines are not about serving
        logging.getLogger(noisy).setLevel(logging.WARNING)
    model, tok, what = load(args.model, args.preset, args.dtype, args.compute_dtype)
    name = args.served_model_name or (args.preset if args.preset else Path(args.model or jaxinfer.default_model_dir()
                                                                          or "tiny").name)
    template = server.load_chat_template(args.model or (None if args.preset else jaxinfer.default_model_dir()),
                                         args.chat_template)
    print(f"[jaxinfer] model: {what} ({model.config.num_params() / 1e6:.2f}M params), served as {name!r}",
          file=sys.stderr)
    engine = jaxinfer.Engine(model, max_slots=args.max_slots, page_size=args.page_size, num_pages=args.num_pages,
                             max_seq_len=args.max_seq_len, tokenizer=tok, prefill_chunk=args.prefill_chunk,
                             decode_steps=args.decode_steps, max_logprobs=args.max_logprobs)
    server.run(engine, name, tok, template, host=args.host, port=args.port, log_level=args.log_level)
    return 0


# ---------------------------------------------------------------------------- argument types
def _number(kind, lo=None, hi=None, lo_open=False, what=""):
    """An argparse type: `kind` (int/float) within bounds; a bad value is argparse's one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value != value or (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


def _checkpoint_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no checkpoint directory at {text}")
    if not (Path(text) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} has no config.json (expected a Hugging Face checkpoint directory)")
    return text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text, streamed to stdout", formatter_class=_HelpFormatter,
                       description="Generate from one or more prompts; every flag shows its default.")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", type=_checkpoint_dir, help="Hugging Face checkpoint directory (default: built-in)")
    src.add_argument("--preset", choices=sorted(jaxinfer.PRESETS), help="random weights with a preset's shapes")
    g.add_argument("--prompt", action="append", help=f"prompt text; repeat for several (default {DEFAULT_PROMPT!r})")
    s = g.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=_number(int, 1, what="an integer >= 1"), default=128, help="tokens to generate at most")
    s.add_argument("--temperature", type=_number(float, 0, what="a number >= 0 (0 = greedy)"), default=0.0,
                   help="0: greedy")
    s.add_argument("--top-k", type=_number(int, what="an integer"), default=0, help="<= 0: off")
    s.add_argument("--top-p", type=_number(float, 0, 1, lo_open=True, what="a number in (0, 1]"), default=1.0,
                   help="nucleus sampling; 1: off")
    s.add_argument("--min-p", type=_number(float, 0, 1, what="a number in [0, 1]"), default=0.0,
                   help="min-p sampling; 0: off")
    s.add_argument("--seed", type=_number(int, 0, 2**32 - 1, what="an integer in [0, 2**32)"), default=None,
                   help="sampling seed (None: a fresh one)")
    s.add_argument("--n", type=_number(int, 1, what="an integer >= 1"), default=1, help="samples per prompt")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--stop-token-id", action="append", default=[], type=_number(int, 0, what="a token id >= 0"),
                   help="stop token id (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS")
    s.add_argument("--min-tokens", type=_number(int, 0, what="an integer >= 0"), default=0,
                   help="no stop before this many tokens")
    s.add_argument("--repetition-penalty", type=_number(float, 0, lo_open=True, what="a number > 0"), default=1.0,
                   help="1: off")
    s.add_argument("--presence-penalty", type=_number(float, -2, 2, what="a number in [-2, 2]"), default=0.0,
                   help="0: off")
    s.add_argument("--frequency-penalty", type=_number(float, -2, 2, what="a number in [-2, 2]"), default=0.0,
                   help="0: off")
    s.add_argument("--logprobs", type=_number(int, 0, 20, what="an integer in [0, 20]"), default=None,
                   help="print each token's logprob and the top K")
    e = g.add_argument_group("engine")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights")
    e.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="activations and KV cache (default: --dtype; on CPU, bfloat16 weights run fastest with "
                        "float32 compute)")
    e.add_argument("--slots", type=_number(int, 1, what="an integer >= 1"), default=4,
                   help="requests decoded together")
    e.add_argument("--page-size", type=_number(int, 1, what="an integer >= 1"), default=16,
                   help="tokens per KV page")
    e.add_argument("--num-pages", type=_number(int, 2, what="an integer >= 2"), default=256,
                   help="KV pages in the pool")
    e.add_argument("--max-seq-len", type=_number(int, 2, what="an integer >= 2"), default=512,
                   help="prompt + output tokens at most")
    e.add_argument("--verbose", action="store_true", help="print the bucket plan and what was compiled")
    e.add_argument("--precompile", action="store_true", help="compile every program of the bucket plan first")
    d = g.add_argument_group("parallel (docs/scaling.md)")
    d.add_argument("--tp", type=_number(int, 1, what="an integer >= 1"), default=1, help="tensor-parallel devices")
    d.add_argument("--dp", type=_number(int, 1, what="an integer >= 1"), default=1, help="data-parallel replicas")
    d.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (jax.distributed), with --num-processes")
    d.add_argument("--num-processes", type=_number(int, 1, what="an integer >= 1"), default=1,
                   help="processes in the JAX cluster")
    d.add_argument("--process-id", type=_number(int, 0, what="an integer >= 0"), default=None, help="this process")
    d.add_argument("--cpu-devices", type=_number(int, 1, what="an integer >= 1"), default=None,
                   help="CPU only: devices each process shows (XLA's host-platform device count)")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("serve", help="serve the OpenAI API over HTTP (the 'serve' extra)",
                       formatter_class=_HelpFormatter,
                       description="An OpenAI-compatible server: /v1/completions, /v1/chat/completions, "
                                   "/v1/models, /health, /metrics. Stops cleanly on SIGINT/SIGTERM.")
    src = v.add_mutually_exclusive_group()
    src.add_argument("--model", type=_checkpoint_dir, help="Hugging Face checkpoint directory (default: built-in)")
    src.add_argument("--preset", choices=sorted(jaxinfer.PRESETS), help="random weights with a preset's shapes")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=_number(int, 0, 65535, what="a port in [0, 65535]"), default=8000, help="TCP port")
    v.add_argument("--served-model-name", default=None,
                   help="the `model` clients send (default: the checkpoint directory's name or the preset)")
    v.add_argument("--chat-template", default=None, help="a jinja2 chat template file (default: the checkpoint's)")
    v.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="debug also logs one line per engine step")
    e = v.add_argument_group("engine")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights")
    e.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="activations and KV cache (default: --dtype)")
    e.add_argument("--max-slots", type=_number(int, 1, what="an integer >= 1"), default=16,
                   help="requests decoded together")
    e.add_argument("--page-size", type=_number(int, 1, what="an integer >= 1"), default=16, help="tokens per KV page")
    e.add_argument("--num-pages", type=_number(int, 2, what="an integer >= 2"), default=1024, help="KV pages in the pool")
    e.add_argument("--max-seq-len", type=_number(int, 2, what="an integer >= 2"), default=512,
                   help="prompt + output tokens at most")
    e.add_argument("--prefill-chunk", type=_number(int, 1, what="an integer >= 1"), default=None,
                   help="prompt tokens per prefill step (default: whole prompts)")
    e.add_argument("--decode-steps", type=_number(int, 1, what="an integer >= 1"), default=8,
                   help="decode steps per host sync")
    e.add_argument("--max-logprobs", type=_number(int, 0, 20, what="an integer in [0, 20]"), default=20,
                   help="the most top_logprobs a request may ask for")
    v.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (jaxinfer.JaxinferError, FileNotFoundError, ValueError) as e:
        # Everything the user can fix gets one line (the traceback is for bugs, not bad input).
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
