"""The collectives of our own sharded decode step, read off its compiled HLO (docs/scaling.md).

Compiles `decode_steps` (one step) of a real model shape sharded over --tp fake CPU devices,
without allocating weights (the parameters are ShapeDtypeStructs with their NamedShardings;
only a small KV pool is real), and lists every collective in the optimised HLO: kind, result
shape, bytes, and whether it sits in the layer scan's body (executed once per layer) or not.
Writes a JSON record.

    python scripts/scaling_hlo.py --model llama-3-8b --tp 8 --out benchmarks/results/scaling/llama-3-8b-tp8.json
    python scripts/scaling_hlo.py --model llama-3-70b --tp 16 --devices 16 --out ...

CPU devices stand in for GPUs: the partitioning (what is split, what is reduced) is the same
program, the collectives are the same ops; only their implementation (NCCL vs gloo) differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b", choices=["llama-3-8b", "llama-3-70b"])
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--devices", type=int, default=None, help="fake CPU devices (default: tp)")
    p.add_argument("--slots", type=int, default=8, help="decode batch")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices or args.tp}"
    os.environ.setdefault("JAXINFER_CACHE_DIR", "0")
    import jax  # noqa: E402  (after XLA_FLAGS)
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    import jaxinfer
    from jaxinfer.decode import decode_steps
    from jaxinfer.sharding import TPLayout, make_mesh, param_specs
    from jaxinfer.state import EngineConfig, init_state
    from jaxinfer.weights import _random_params

    config = jaxinfer.get_preset("llama-3-8b")
    if args.model == "llama-3-70b":
        config = dataclasses.replace(config, hidden_size=8192, intermediate_size=28672, num_layers=80,
                                     num_heads=64, num_kv_heads=8)
    mesh = make_mesh(tp=args.tp)
    layout = TPLayout.plan(config, args.tp)
    sharded = layout.sharded_config(config)
    dtype = jnp.dtype(args.dtype)
    shapes = jax.eval_shape(lambda: _random_params(sharded, dtype, jax.random.key(0)))
    # The vocabulary padded to a multiple of tp, as load_model lays it out.
    shapes["embed"] = jax.ShapeDtypeStruct((layout.vocab_padded, config.hidden_size), dtype)
    if "lm_head" in shapes:
        shapes["lm_head"] = jax.ShapeDtypeStruct((config.hidden_size, layout.vocab_padded), dtype)
    leaves, treedef = jax.tree.flatten(shapes)
    specs = param_specs(shapes, args.tp)
    params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s))
                                          for x, s in zip(leaves, specs)])
    model = jaxinfer.Model(config=sharded, params=params, mesh=mesh)
    cfg = EngineConfig(max_slots=args.slots, page_size=16, num_pages=8, max_seq_len=128, attention_backend="reference")
    state = init_state(cfg, sharded, dtype, mesh)
    lowered = jax.jit(decode_steps, static_argnums=(0, 3, 4, 5)).lower(cfg, model, state, 1, args.slots, 128)
    hlo = lowered.compile().as_text()

    # Computations, and which one holds the per-layer body (the scan over layers is a while
    # loop whose body holds the layer's collectives).
    comps = re.split(r"\n(?=\S.*\{\n)", hlo)
    ops = []
    for comp in comps:
        name = comp.split(" ", 1)[0].lstrip("%")
        for m in re.finditer(r"= (\w+)\[([\d,]*)\][^ ]* (all-reduce|all-gather|reduce-scatter|all-to-all|"
                             r"collective-permute)(?:-start)?\(", comp):
            dims = [int(d) for d in m.group(2).split(",") if d]
            itemsize = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1}.get(m.group(1), 4)
            n = 1
            for d in dims:
                n *= d
            ops.append(dict(kind=m.group(3), dtype=m.group(1), shape=dims, bytes=n * itemsize, computation=name))
    # The layer body: the computation with all-reduces and no all-gather (the step's own body
    # holds the embedding's all-reduce and the logits' all-gather).
    per_layer_comps = {o["computation"] for o in ops if o["kind"] == "all-reduce"} - {
        o["computation"] for o in ops if o["kind"] == "all-gather"}
    for o in ops:
        o["per_layer"] = o["computation"] in per_layer_comps
        o["executions_per_step"] = config.num_layers if o["per_layer"] else 1
    record = dict(
        model=args.model, tp=args.tp, slots=args.slots, dtype=args.dtype, devices=len(jax.devices()),
        kv_replicas=layout.kv_replicas, vocab_padded=layout.vocab_padded,
        collectives=ops,
        per_step=dict(
            count=sum(o["executions_per_step"] for o in ops),
            bytes=sum(o["bytes"] * o["executions_per_step"] for o in ops),
            by_kind={k: sum(o["executions_per_step"] for o in ops if o["kind"] == k) for k in {o["kind"] for o in ops}},
        ),
        weight_bytes_per_device=sum(
            x.size * x.dtype.itemsize // (args.tp if "model" in s else 1) for x, s in zip(leaves, specs)),
        kv_bytes_per_token_per_device=2 * config.num_layers * (sharded.num_kv_heads // args.tp) * config.head_dim
        * dtype.itemsize,
        jax=jax.__version__,
    )
    text = json.dumps(record, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "collectives"}, indent=2))
    for o in ops:
        print(f"  {o['kind']:14s} {o['dtype']}{o['shape']} {o['bytes']} B  x{o['executions_per_step']}  ({o['computation']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
