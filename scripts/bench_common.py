"""What the benchmark / evaluation scripts in scripts/ share: the --model / --preset arguments and
the model they name, the engine shape, the jit cache check and the compile warm-up of
jaxinfer.Engine, random prompts, the run header of a result JSON and writing it.

Not a CLI: imported by the scripts as `import bench_common` (`python scripts/X.py` makes
scripts/ the first import directory). jax / jaxinfer are imported inside the functions, so a
script's `--help` does not pay for them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

# the steps jaxinfer.Engine runs (jaxinfer/engine.py Engine._STEPS)
STEP_NAMES = ("admit", "prefill", "decode_steps", "fork", "evict", "num_free_pages", "permute_slots")


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- model
def add_model_args(ap, preset_examples: str = "llama-20m, tiny, ...") -> None:
    """The mutually exclusive --model DIR / --preset NAME pair read by `load_model_arg`."""
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF checkpoint dir (default: stories260K when found, else --preset llama-20m)")
    src.add_argument("--preset", help=f"random weights of a preset ({preset_examples})")


def load_model_arg(args):
    """The model named by --preset (random weights) or --model DIR; neither: stories260K when the
    shared assets are found, else the llama-20m preset (args.preset is then set). Returns
    (model, display name, model dir or None)."""
    import jaxinfer

    compute = getattr(args, "compute_dtype", None)  # only scripts that offer --compute-dtype
    if args.preset:
        return (jaxinfer.dummy_model(jaxinfer.get_preset(args.preset), dtype=args.dtype, compute_dtype=compute),
                f"{args.preset} (random weights)", args.model)
    path = Path(args.model) if args.model else jaxinfer.default_model_dir()
    if path is None:
        args.preset = "llama-20m"
        return (jaxinfer.dummy_model(jaxinfer.get_preset("llama-20m"), dtype=args.dtype, compute_dtype=compute),
                "llama-20m (random weights)", None)
    return jaxinfer.load_model(path, dtype=args.dtype, compute_dtype=compute), path.name, str(path)


def random_prompt(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    """n random token ids, clear of the usual special ids 0..2."""
    low = min(3, vocab - 1)
    return rng.integers(low, vocab, n).tolist()


# ---------------------------------------------------------------------------- engine
def engine_kwargs(slots: int, max_seq_len: int, page_size: int, decode_steps: int, max_prefill_batch: int,
                  num_pages: int = 0) -> dict:
    """jaxinfer.Engine shape; num_pages 0: enough for every slot's worst case."""
    pages_per_seq = -(-max_seq_len // page_size)
    return dict(max_slots=slots, page_size=page_size, num_pages=num_pages or slots * pages_per_seq + 1,
                max_seq_len=max_seq_len, decode_steps=decode_steps, max_prefill_batch=min(max_prefill_batch, slots))


def jit_cache_sizes() -> dict:
    """Programs compiled so far in this process per step jaxinfer.Engine runs (its StepCache,
    jaxinfer/aot.py; a program loaded from the disk cache is not a compilation)."""
    import jaxinfer

    compiled = jaxinfer.aot.steps().compiled_by_step
    return {name: compiled.get(name, 0) for name in STEP_NAMES}


def cache_growth(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def warm_up(model, kwargs: dict, max_prompt: int, log, seed: int = 0) -> dict:
    """Compile (and run once) admit and prefill for every (batch bucket, length bucket) pair the
    workload can use, plus decode_steps, fork, evict and the free-page count. Both modes (and
    every `prefill_chunk`) share the compiled code: they use the same EngineConfig, and a chunked
    prefill only uses length buckets up to the chunk's, all of which are compiled here.

    Every row gets a DISTINCT random prompt: identical prompts share their first page in the
    prefix cache, so the engine would admit them one per step (batch bucket 1 only) and later
    rows would hit the cache and prefill fewer tokens (a smaller length bucket). Random prompts
    of fresh ids never hit the cache of earlier warm-up rows either."""
    import jaxinfer

    kwargs = {k: v for k, v in kwargs.items() if k != "prefill_chunk"}  # whole prompts: every bucket
    engine = jaxinfer.Engine(model, mode="continuous", seed=0, **kwargs)
    cfg = engine.cfg
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed + 12345)
    top = cfg.prefill_bucket(min(max_prompt, cfg.max_seq_len - 1))
    lengths = [t for t in cfg.prefill_buckets if t <= top]
    before = jit_cache_sizes()
    t0 = time.perf_counter()
    plan = engine.precompile()  # every program the engine can run (or load them from the disk cache)
    # One run through the engine as well, so first-call costs other than compiling are paid.
    engine.generate([random_prompt(rng, vocab, min(lengths[0], cfg.max_seq_len - 1))],
                    jaxinfer.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, n=min(2, cfg.max_slots)))
    seconds = time.perf_counter() - t0
    after = jit_cache_sizes()
    log(f"warm-up: compiled or loaded the {sum(map(len, plan.values()))} programs of the bucket plan "
        f"(prefill {cfg.batch_buckets} x {cfg.prefill_buckets}, decode {cfg.decode_slot_buckets} x "
        f"{cfg.decode_span_buckets}, admit, fork, evict, ...) in {seconds:.1f} s (excluded from timing)")
    return {"seconds": seconds, "batch_buckets": list(cfg.batch_buckets), "length_buckets": lengths,
            "plan": {k: [list(x) if x else x for x in v] for k, v in plan.items()},
            "new_compilations": cache_growth(before, after)}


# ---------------------------------------------------------------------------- roofline
def matmul_shapes(model) -> dict[tuple[int, int], int]:
    """The dense matmuls of one decode step, {(K, N): count}: every layer's linear weights and
    the LM head. A mixture-of-experts layer (jaxinfer/moe.py) counts as its router plus top_k
    expert MLPs at every row: the ideal FLOPs of routing (every row through k experts)."""
    cfg = model.config
    shapes: dict[tuple[int, int], int] = {}
    d, f, fm = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size
    n_moe = len(cfg.moe_layers)
    for spec, count in (((d, cfg.q_size), cfg.num_layers), ((d, cfg.kv_size), cfg.num_layers),
                        ((d, cfg.kv_size), cfg.num_layers), ((cfg.q_size, d), cfg.num_layers),
                        ((d, f), cfg.num_layers - n_moe), ((d, f), cfg.num_layers - n_moe),
                        ((f, d), cfg.num_layers - n_moe), ((d, cfg.num_experts), n_moe),
                        ((d, fm), n_moe * cfg.num_experts_per_tok), ((d, fm), n_moe * cfg.num_experts_per_tok),
                        ((fm, d), n_moe * cfg.num_experts_per_tok)):
        if count:
            shapes[spec] = shapes.get(spec, 0) + count
    head = (cfg.hidden_size, cfg.vocab_size)
    shapes[head] = shapes.get(head, 0) + 1
    return shapes


def matmul_ceiling(model, rows: int, dtype=None, repeat: int = 20) -> dict:
    """Time of one decode step's dense matmuls at `rows` rows alone: all of them in one XLA
    program, each weight its own buffer (as the engine runs them), inputs in `dtype` (default:
    the model's weight dtype), float32 accumulation; best of `repeat`. Returns seconds, FLOPs and
    GFLOP/s: the machine's matmul roofline for this model at this batch."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype or model.weight_dtype)
    shapes = matmul_shapes(model)
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02, dtype)
               for (k, n), c in shapes.items() for _ in range(c)]
    inputs = {k: jnp.asarray(rng.standard_normal((rows, k), np.float32), dtype) for k, _ in shapes}

    @jax.jit
    def step(ws, xs):
        acc = jnp.zeros((), jnp.float32)
        for w in ws:
            acc += jnp.einsum("mk,kn->mn", xs[w.shape[0]], w, preferred_element_type=jnp.float32)[0, 0]
        return acc

    step(weights, inputs).block_until_ready()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        step(weights, inputs).block_until_ready()
        best = min(best, time.perf_counter() - t)
    flops = sum(2 * rows * k * n * c for (k, n), c in shapes.items())
    return {"rows": rows, "dtype": dtype.name, "seconds": best, "flops": flops, "gflops": flops / best / 1e9}


# ---------------------------------------------------------------------------- report
def model_banner(name: str, mc, dtype: str) -> str:
    import jax

    return (f"model: {name}, {mc.num_params() / 1e6:.2f}M params, {dtype}; jax {jax.__version__} "
            f"on {jax.default_backend()} ({os.cpu_count()} CPUs)")


def run_header(args, name: str, model_dir: str | None, mc, engine: dict) -> dict:
    """The "model", "machine", "args" and "engine" entries that open a serving benchmark's JSON."""
    import jax

    return {
        "model": {"name": name, "dir": model_dir, "preset": args.preset, "params": mc.num_params(),
                  "dtype": args.dtype, "config": dataclasses.asdict(mc)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]},
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "engine": engine,
    }


def write_json(path, obj, indent: int = 1, **dumps_kw) -> None:
    """Write `obj` as JSON to `path`, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, **dumps_kw))
