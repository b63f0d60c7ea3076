"""What XLA's optimisation passes do to jaxinfer's own jitted steps: op counts before and after,
the fusions formed, constants folded, dead code removed, and the compiled memory footprint.

    python scripts/inspect_hlo.py                                   # stories260K (shared assets)
    python scripts/inspect_hlo.py --model DIR --slots 4 --max-seq-len 256 --json out.json
    python scripts/inspect_hlo.py --steps prefill --dump /tmp/hlo   # also write the HLO texts

The steps are the Engine's own programs, built the way `Engine.precompile` builds them: `prefill`
(one chunk of --prefill-batch x --prefill-len prompt tokens; the engine's smallest bucket by
default) and `decode_steps` (the engine's `decode_steps` greedy/sampled decode steps of every slot
in one `lax.while_loop`, attention over --max-seq-len positions), each lowered with
`jax.jit(...).lower(...)` on the engine's model and state, then compiled for this backend.

"Before" is the HLO module JAX hands to XLA (`Lowered.as_text(dialect="hlo")`), "after" the
optimised module of the compiled executable (`Compiled.as_text()`). Both are parsed from their
text (see `parse_hlo`), and counted the same way:

- ops: instructions of the computations that run as programs (the entry, `while` bodies and
  conditions, `conditional` branches, `call` targets), `parameter`s excluded. The scalar
  reducers of reduce / scatter / sort (`to_apply`) are not counted (they are part of their op).
  After optimisation a `fusion` counts as one op (one loop nest / kernel); the ops it absorbed
  are reported as "fused". So `ops after < ops before` is the fusion win (plus DCE, CSE,
  algebraic simplification and folding, minus the copies / bitcasts layout assignment adds).
- dead code: instructions of the "before" module from which the computation's ROOT is not
  reachable (their results are never used; XLA's HloDCE deletes them).
- constant-foldable: instructions (not `constant` / `parameter`) whose every input is, transitively,
  a constant or an `iota`: what XLA's HloConstantFolding may evaluate at compile time. XLA keeps
  some on purpose (a broadcast or iota of a large shape would become a large literal), so the
  "after" count is not zero.
- fusions: each `fusion` of the optimised module with its kind (kLoop: elementwise loop; kInput:
  a reduction with its producers; kOutput: an op with its consumers; kCustom: a backend fusion,
  e.g. XLA:CPU's YNNPACK `__ynn_fusion` around dots), the ops inside, and a label from the ops
  it holds (`fusion_label`): RMSNorm (rsqrt), rotary (sin / cos), SiLU gate (x / (1 + exp(-x))),
  softmax (exp; attention's or sampling's by its JAX op name), matmul (dot) + epilogue, sampling
  (sort / top-k), other (elementwise, gather, layout).
- memory: `Compiled.memory_analysis()` (argument, output, alias, temp bytes; the state is donated,
  so its buffers alias the outputs) and `Compiled.cost_analysis()` flops / bytes accessed.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

import jaxinfer
from bench_common import write_json
from jaxinfer.steps import make_chunk

# ------------------------------------------------------------------------------ HLO text parsing
_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
_INST = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation|select|scatter)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_NO_OPERANDS = {"constant", "parameter", "iota", "rng-get-and-update-state", "after-all", "partition-id",
                "replica-id"}
_NOT_FOLDABLE = {"parameter", "rng", "rng-bit-generator", "custom-call", "while", "call", "conditional",
                 "infeed", "outfeed", "send", "recv", "after-all", "fusion"}


def _balanced(s: str, i: int) -> int:
    """Index just past the parenthesis group that opens at s[i] == '('."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "(":
            depth += 1
        elif s[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def parse_hlo(text: str) -> dict:
    """{computation name: {"entry": bool, "insts": {name: inst}, "root": name}} with each inst
    {"op", "operands" (instruction names of the same computation), "calls" [(attr, computation)],
    "attrs" (the rest of the line)}. Handles both the `%name` text of compiled modules and the
    bare names of lowered ones."""
    comps: dict = {}
    cur = None
    for line in text.splitlines():
        if cur is None:
            m = _COMP.match(line)
            if m and not line.startswith("HloModule"):
                cur = comps[m.group(2)] = {"entry": bool(m.group(1)), "insts": {}, "root": None}
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = _INST.match(line)
        if not m:
            continue
        root, name, rest = m.groups()
        i = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")  # skip the result shape
        rest = rest[i:].lstrip()
        om = re.match(r"([\w\-]+)\(", rest)
        if not om:
            continue
        op = om.group(1)
        end = _balanced(rest, om.end() - 1)
        args, attrs = rest[om.end():end - 1], rest[end:]
        operands = []
        if op not in _NO_OPERANDS:
            depth, tok = 0, ""
            for ch in args + ",":
                if ch in "({[":
                    depth += 1
                elif ch in ")}]":
                    depth -= 1
                if ch == "," and depth == 0:
                    nm = re.search(r"%?([\w.\-]+)\s*$", tok.strip())
                    if nm:
                        operands.append(nm.group(1))
                    tok = ""
                else:
                    tok += ch
        calls = [(a, c) for a, c in _CALLED.findall(attrs)]
        for b in _BRANCHES.findall(attrs):
            calls += [("branch", c.strip().lstrip("%")) for c in b.split(",") if c.strip()]
        cur["insts"][name] = {"op": op, "operands": operands, "calls": calls, "attrs": attrs}
        if root:
            cur["root"] = name
    for c in comps.values():  # operands that are not instructions here (literals) are dropped
        for inst in c["insts"].values():
            inst["operands"] = [o for o in inst["operands"] if o in c["insts"]]
    return comps


def computation_roles(comps: dict) -> dict[str, str]:
    """name -> "program" (entry, while body / condition, conditional branch, call target), "fusion"
    (a fusion body, or a computation called from one) or "reducer" (a to_apply / select /
    scatter scalar computation of some other op)."""
    roles: dict[str, str] = {}
    todo = [(n, "program") for n, c in comps.items() if c["entry"]]
    while todo:
        name, role = todo.pop()
        if name not in comps or roles.get(name) == role or roles.get(name) == "program":
            continue
        roles[name] = role
        for inst in comps[name]["insts"].values():
            for attr, callee in inst["calls"]:
                if role == "fusion" or inst["op"] == "fusion":
                    todo.append((callee, "fusion" if attr == "calls" or role == "fusion" else "reducer"))
                elif attr in ("body", "condition", "branch", "true_computation", "false_computation") or (
                        inst["op"] == "call" and attr == "to_apply"):
                    todo.append((callee, "program"))
                else:
                    todo.append((callee, "reducer"))
    return roles


def fused_ops(comps: dict, name: str, seen=None) -> collections.Counter:
    """Op counts inside a fusion computation, nested fusions expanded, parameters excluded."""
    out: collections.Counter = collections.Counter()
    for inst in comps[name]["insts"].values():
        if inst["op"] == "parameter":
            continue
        callees = [c for a, c in inst["calls"] if a == "calls" and c in comps]
        if inst["op"] == "fusion" and callees:
            out += fused_ops(comps, callees[0])
        else:
            out[inst["op"]] += 1
    return out


SAMPLING_NAMES = re.compile(r"log_softmax|gumbel|sampl|top_k|top_p|argmax|sort|penalt")


def fusion_label(ops: collections.Counter, op_name: str = "") -> str:
    """What a fusion computes, from the ops it holds (first match wins) and, for a softmax, the
    JAX op name XLA keeps in its metadata (sampling's log_softmax vs attention's)."""
    if ops["rsqrt"]:
        return "RMSNorm"
    if ops["sine"] or ops["cosine"]:
        return "rotary"
    if ops["logistic"] or (ops["exponential"] and ops["negate"] and ops["divide"] and not ops["reduce"]):
        return "SiLU gate (x * sigmoid(x))"
    if ops["exponential"]:
        return "softmax (sampling)" if SAMPLING_NAMES.search(op_name) else "softmax (attention)"
    if ops["dot"] or ops["convolution"]:
        return "matmul (+ epilogue)"
    if ops["sort"] or ops["custom-call"]:
        return "sampling / top-k"
    return "other (elementwise, gather, layout)"


def _reachable(comp: dict) -> set[str]:
    seen, todo = set(), [comp["root"]] if comp["root"] else []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo += comp["insts"][n]["operands"]
    return seen


def _const_derived(comp: dict) -> set[str]:
    """Names whose value depends only on constants / iotas (fixed point over the operands)."""
    insts, const = comp["insts"], set()
    changed = True
    while changed:
        changed = False
        for n, inst in insts.items():
            if n in const:
                continue
            if inst["op"] in ("constant", "iota") or (
                    inst["op"] not in _NOT_FOLDABLE and inst["operands"]
                    and all(o in const for o in inst["operands"])):
                const.add(n)
                changed = True
    return const


def analyse(text: str) -> dict:
    """The counts described in the module docstring, for one HLO module's text."""
    comps = parse_hlo(text)
    roles = computation_roles(comps)
    ops: collections.Counter = collections.Counter()
    fused: collections.Counter = collections.Counter()
    dead = foldable = constants = 0
    fusions = []
    for name, comp in comps.items():
        if roles.get(name) != "program":
            continue
        live, const = _reachable(comp), _const_derived(comp)
        for n, inst in comp["insts"].items():
            if inst["op"] == "parameter":
                continue
            ops[inst["op"]] += 1
            dead += n not in live
            constants += inst["op"] == "constant"
            foldable += n in const and inst["op"] not in ("constant", "iota")
            if inst["op"] == "fusion":
                callee = next((c for a, c in inst["calls"] if a == "calls"), None)
                inner = fused_ops(comps, callee) if callee in comps else collections.Counter()
                fused += inner
                kind = re.search(r"kind=(k\w+)", inst["attrs"])
                custom = re.search(r'"kind":"(\w+)"', inst["attrs"])
                op_name = (re.search(r'op_name="([^"]*)"', inst["attrs"]) or [None, ""])[1]
                fusions.append({"name": n, "kind": (kind.group(1) if kind else "?")
                                + (f" {custom.group(1)}" if custom else ""),
                                "ops": sum(inner.values()), "label": fusion_label(inner, op_name), "op_name": op_name})
    by_label: dict = {}
    for f in fusions:
        e = by_label.setdefault(f["label"], {"fusions": 0, "ops": 0})
        e["fusions"] += 1
        e["ops"] += f["ops"]
    kinds = collections.Counter(f["kind"] for f in fusions)
    return {"ops": sum(ops.values()), "op_counts": dict(ops.most_common()), "computations": sum(
                r == "program" for r in roles.values()), "fusions": len(fusions), "fused_ops": sum(fused.values()),
            "fused_op_counts": dict(fused.most_common()), "fusion_kinds": dict(kinds.most_common()),
            "fusions_by_label": dict(sorted(by_label.items(), key=lambda kv: -kv[1]["ops"])),
            "largest_fusions": sorted(fusions, key=lambda f: -f["ops"])[:8], "dead_instructions": dead,
            "constant_foldable": foldable, "constants": constants}


# ------------------------------------------------------------------------------ the steps
def step_args(engine, step: str, prefill_batch: int | None, prefill_len: int | None):
    """(function, static args, dynamic args, donated dynamic positions) of one engine step, as
    Engine.precompile builds them."""
    cfg, model, state = engine.cfg, engine.model, engine.state
    fn, _, _ = engine._STEPS[step]
    if step == "prefill":
        b = prefill_batch or cfg.batch_buckets[0]
        t = prefill_len or cfg.prefill_buckets[0]
        return fn, (cfg,), (model, state, make_chunk(cfg, [], b, t)), (1,), {"batch": b, "seq": t}
    b, t = cfg.decode_slot_buckets[-1], cfg.decode_span_buckets[-1]
    return (lambda cfg_, m, s: fn(cfg_, m, s, cfg.decode_steps, b, t)), (cfg,), (model, state), (1,), {
        "slots": b, "span": t, "num_steps": cfg.decode_steps}


def lower_and_compile(fn, static: tuple, dynamic: tuple, donated: tuple):
    """jit over the flat leaves of the dynamic arguments (as jaxinfer/aot.py does), donating the
    state's; returns (Lowered, Compiled, compile seconds)."""
    flat = [jax.tree.flatten(a) for a in dynamic]
    sizes = [len(ls) for ls, _ in flat]
    starts = np.cumsum([0] + sizes).tolist()

    def flat_fn(*xs):
        return fn(*static, *(jax.tree.unflatten(t, xs[s:s + n]) for (_, t), s, n in zip(flat, starts, sizes)))

    donate = tuple(j for k in donated for j in range(starts[k], starts[k] + sizes[k]))
    avals = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for ls, _ in flat for x in ls]
    lowered = jax.jit(flat_fn, donate_argnums=donate).lower(*avals)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return lowered, compiled, time.perf_counter() - t0


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                          "temp_size_in_bytes", "generated_code_size_in_bytes")} if m else {}
    if out:
        out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                              - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if cost:
        out.update(flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)))
    return out


def inspect_step(engine, step: str, prefill_batch=None, prefill_len=None, dump: Path | None = None) -> dict:
    fn, static, dynamic, donated, shape = step_args(engine, step, prefill_batch, prefill_len)
    lowered, compiled, seconds = lower_and_compile(fn, static, dynamic, donated)
    before_text, after_text = lowered.as_text(dialect="hlo"), compiled.as_text()
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{step}.before.hlo").write_text(before_text)
        (dump / f"{step}.after.hlo").write_text(after_text)
    before, after = analyse(before_text), analyse(after_text)
    return {"shape": shape, "compile_seconds": round(seconds, 3), "before": before, "after": after,
            "memory": memory(compiled)}


# ------------------------------------------------------------------------------ report
def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def report(step: str, r: dict, top: int = 12) -> None:
    b, a, m = r["before"], r["after"], r["memory"]
    shape = ", ".join(f"{k} {v}" for k, v in r["shape"].items())
    print(f"\n== {step} ({shape}; compiled in {r['compile_seconds']:.1f} s)")
    print(f"ops: {b['ops']} before XLA's passes -> {a['ops']} after ({a['fusions']} fusions holding "
          f"{a['fused_ops']} ops; {a['ops'] - a['fusions']} ops left unfused)")
    print(f"program computations (entry, loop bodies, branches, calls): {b['computations']} -> {a['computations']}")
    print(f"dead instructions (result never used): {b['dead_instructions']} before -> {a['dead_instructions']} after")
    print(f"constant-foldable instructions: {b['constant_foldable']} before -> {a['constant_foldable']} after; "
          f"constants {b['constants']} -> {a['constants']}")
    print("top ops before: " + ", ".join(f"{k} {v}" for k, v in list(b["op_counts"].items())[:top]))
    print("top ops after:  " + ", ".join(f"{k} {v}" for k, v in list(a["op_counts"].items())[:top]))
    print("fusion kinds: " + ", ".join(f"{k} {v}" for k, v in a["fusion_kinds"].items()))
    print("fusions by what they compute (fusions / ops inside):")
    for label, e in a["fusions_by_label"].items():
        print(f"  {label:38s} {e['fusions']:5d} {e['ops']:7d}")
    print("largest fusions:")
    for f in a["largest_fusions"][:5]:
        print(f"  {f['name']:28s} {f['kind']:22s} {f['ops']:4d} ops  {f['label']:20s} {f['op_name'][:60]}")
    if m:
        print(f"memory: arguments {_mib(m['argument_size_in_bytes'])}, outputs {_mib(m['output_size_in_bytes'])} "
              f"(aliased with donated arguments {_mib(m['alias_size_in_bytes'])}), temporaries "
              f"{_mib(m['temp_size_in_bytes'])}, total {_mib(m['total_bytes'])}; "
              f"{m.get('flops', 0) / 1e6:.1f} MFLOP, {_mib(m.get('bytes_accessed', 0))} accessed")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF-format checkpoint dir (default: jaxinfer.default_model_dir(), stories260K)")
    ap.add_argument("--steps", default="prefill,decode_steps", help="comma list of prefill, decode_steps")
    ap.add_argument("--slots", type=int, default=4, help="Engine max_slots (default 4)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=8, help="decode steps per decode_steps call (default 8)")
    ap.add_argument("--prefill-batch", type=int, help="prefill chunk rows (default: the smallest batch bucket)")
    ap.add_argument("--prefill-len", type=int, help="prefill chunk length (default: the smallest length bucket)")
    ap.add_argument("--dump", help="write <step>.before.hlo / <step>.after.hlo here")
    ap.add_argument("--json", help="write the results here")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    model_dir = args.model or jaxinfer.default_model_dir()
    if model_dir is None:
        raise SystemExit("inspect_hlo: no --model and no default checkpoint (../shared/assets/stories260K)")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if bad := set(steps) - {"prefill", "decode_steps"}:
        raise SystemExit(f"inspect_hlo: unknown --steps {sorted(bad)}; use prefill, decode_steps")
    model = jaxinfer.load_model(model_dir, dtype="float32")
    pages = args.slots * -(-args.max_seq_len // args.page_size) + 1
    engine = jaxinfer.Engine(model, max_slots=args.slots, page_size=args.page_size, num_pages=pages,
                             max_seq_len=args.max_seq_len, decode_steps=args.decode_steps, precompile=False)
    print(f"model {model_dir} ({model.config.num_layers} layers, hidden {model.config.hidden_size}); "
          f"backend {jax.default_backend()}, jax {jax.__version__}", file=sys.stderr)
    results = {}
    for step in steps:
        results[step] = inspect_step(engine, step, args.prefill_batch, args.prefill_len,
                                     Path(args.dump) if args.dump else None)
        report(step, results[step])
    out = {"model": str(model_dir), "backend": jax.default_backend(), "jax": jax.__version__,
           "engine": {"max_slots": args.slots, "page_size": args.page_size, "max_seq_len": args.max_seq_len,
                      "decode_steps": args.decode_steps},
           "command": "python scripts/inspect_hlo.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "steps": results}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
