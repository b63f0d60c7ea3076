"""Soak test: sustained, hostile random traffic against one Engine, with its invariants checked
all along. Nothing may be lost, leaked or answered twice.

    python scripts/soak.py --requests 10000 --minutes 30
    python scripts/soak.py --requests 2000 --minutes 3 --json out.json      # the CI size

Traffic (seeded by --seed): prompts of 1..--max-prompt tokens, most starting with one of a few
shared prefixes (prefix-cache hits), as text or token ids; n 1..4; random stop strings and stop
ids, penalties, logprobs, greedy or sampled; a pool small enough that requests are preempted
constantly; random aborts of running requests; malformed requests interleaved (each must be
refused with InvalidRequestError); every --snapshot-every steps the engine is snapshotted and
replaced by `Engine.restore` of that snapshot; every --update-every steps the weights are
swapped (between the model and a perturbed copy, with on_update "recompute" or "keep").

Invariants, checked every --check-every steps and at the end (each failure is a violation):
- every accepted request finishes exactly once per sample (one final delta per sample, never
  a delta after it), with its n samples; an aborted one finishes with "abort" where unfinished;
  a sample never exceeds max_tokens;
- the allocator: refcounts >= 0, the null page pinned (refcount 1, never cached, never handed
  out), and when the engine is idle no page is in use;
- greedy requests that lived under one set of weights (a random --verify share of them) equal a
  solo run of the request on a fresh engine with those weights. A mismatch at a near-tie (top-2
  logprob margin < --tie-margin in the solo run, where batch shape decides the argmax) is
  reported as a near-tie, not a violation.
Prints a summary (requests, tokens, preemptions, aborts, rejected bad requests, snapshots,
weight updates, violations) and exits 1 if any invariant was violated.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_common


@dataclasses.dataclass
class Tracked:
    prompt: object
    params: object
    epoch: int  # weight epoch at submission
    finals: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tokens: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    reasons: dict = dataclasses.field(default_factory=dict)
    aborted: bool = False
    mixed: bool = False  # a weight update happened while it was in flight


def random_params(rng, jaxinfer, vocab: int, stops: list[str]):
    greedy = rng.random() < 0.5
    kw = dict(max_tokens=int(rng.integers(1, 33)), n=int(rng.integers(1, 5)) if rng.random() < 0.3 else 1,
              temperature=0.0 if greedy else float(rng.uniform(0.3, 1.5)), seed=int(rng.integers(0, 2**31)))
    if rng.random() < 0.3:
        kw["stop"] = [stops[int(rng.integers(len(stops)))]]
    if rng.random() < 0.2:
        kw["stop_token_ids"] = [int(rng.integers(3, vocab))]
    if rng.random() < 0.3:
        kw.update(repetition_penalty=float(rng.uniform(1.0, 1.5)), presence_penalty=float(rng.uniform(-1, 1)),
                  frequency_penalty=float(rng.uniform(-1, 1)))
    if rng.random() < 0.3:
        kw["logprobs"] = int(rng.integers(0, 4))
    if not greedy and rng.random() < 0.5:
        kw.update(top_k=int(rng.integers(0, 20)), top_p=float(rng.uniform(0.5, 1.0)))
    if rng.random() < 0.1:
        kw["min_tokens"] = min(kw["max_tokens"], int(rng.integers(0, 8)))
    return jaxinfer.SamplingParams(**kw)


def bad_request(rng, vocab: int, max_seq_len: int):
    """A malformed (prompt, params-kwargs) pair: every one must be refused."""
    return [
        lambda: ([1, vocab + 5], {}), lambda: ([1, 2, True], {}), lambda: (b"bytes", {}),
        lambda: ([1] * (max_seq_len + 3), {}), lambda: ([1, 2], {"temperature": -1.0}),
        lambda: ([1, 2], {"n": 0}), lambda: ([1, 2], {"top_p": 0.0}), lambda: ([], {}),
        lambda: ([1, 2], {"max_tokens": 2**40}), lambda: ({"a": 1}, {}),
    ][int(rng.integers(10))]()


def check_allocator(engine, idle: bool) -> list[str]:
    import jax

    # Field by field: device_get of the struct would rebuild a PageAllocator around NumPy arrays.
    alloc = engine.state.alloc
    refcount, cached, gen = jax.device_get((alloc.refcount, alloc.cached, alloc.gen))
    out = []
    if (refcount < 0).any():
        out.append(f"negative refcount at pages {np.nonzero(refcount < 0)[0][:5].tolist()}")
    if refcount[0] != 1 or cached[0] or gen[0] != 0:
        out.append(f"null page touched: refcount {refcount[0]}, cached {cached[0]}, handed out {gen[0]} times")
    if idle and (refcount[1:] != 0).any():
        out.append(f"idle engine holds {int((refcount[1:] != 0).sum())} pages (leak)")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_model_args(ap, "tiny, llama-20m, ...")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=2000, help="requests to submit (malformed ones not counted)")
    ap.add_argument("--minutes", type=float, default=3.0, help="stop submitting after this long")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=8)
    ap.add_argument("--num-pages", type=int, default=48, help="small: requests are preempted constantly")
    ap.add_argument("--max-seq-len", type=int, default=96)
    ap.add_argument("--max-prompt", type=int, default=40)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--prefill-chunk", type=int, default=16)
    ap.add_argument("--queue", type=int, default=24, help="keep about this many requests waiting or running")
    ap.add_argument("--abort-prob", type=float, default=0.02, help="per step: abort a random running request")
    ap.add_argument("--bad-prob", type=float, default=0.05, help="per submission: send a malformed one too")
    ap.add_argument("--snapshot-every", type=int, default=150, help="steps between snapshot + restore (0: never)")
    ap.add_argument("--update-every", type=int, default=200, help="steps between weight updates (0: never)")
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--verify", type=float, default=0.05, help="share of single-epoch greedy requests re-run solo")
    ap.add_argument("--tie-margin", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import jax
    import jaxinfer

    rng = np.random.default_rng(args.seed)
    model, name, model_dir = bench_common.load_model_arg(args)
    tok = jaxinfer.load_tokenizer(model_dir) if model_dir else (
        jaxinfer.ByteTokenizer() if model.config.vocab_size >= 258 else None)
    vocab = model.config.vocab_size
    # The second set of weights: every matrix scaled by 1 + 2% noise (same shapes, dtypes).
    keys = iter(jax.random.split(jax.random.PRNGKey(args.seed), 4096))
    other = model.replace(params=jax.tree.map(
        lambda x: x * (1 + 0.02 * jax.random.normal(next(keys), x.shape, x.dtype)) if x.ndim > 1 else x, model.params))
    weights = [model, other]
    kwargs = dict(max_slots=args.slots, page_size=args.page_size, num_pages=args.num_pages,
                  max_seq_len=args.max_seq_len, decode_steps=args.decode_steps, prefill_chunk=args.prefill_chunk,
                  max_logprobs=4, seed=args.seed)
    engine = jaxinfer.Engine(model, tokenizer=tok, **kwargs)
    prefixes = [bench_common.random_prompt(rng, vocab, int(rng.integers(8, args.max_prompt - 4))) for _ in range(6)]
    stops = ["e", "the", ".", "and", "\n"] if tok is not None else ["x"]
    tracked: dict[int, Tracked] = {}
    live: set[int] = set()
    counts = collections.Counter()
    violations: list[str] = []
    epoch, step = 0, 0
    snap_root = Path(tempfile.mkdtemp(prefix="jaxinfer-soak-"))
    t0 = time.perf_counter()

    def violate(msg: str) -> None:
        if len(violations) < 50:
            print(f"VIOLATION (step {step}): {msg}", flush=True)
        violations.append(msg)

    def submit_one() -> None:
        if rng.random() < args.bad_prob:
            prompt, bad = bad_request(rng, vocab, args.max_seq_len)
            try:
                engine.add_request(prompt, jaxinfer.SamplingParams(**{"max_tokens": 4, **bad}))
                violate(f"malformed request accepted: prompt {str(prompt)[:40]}, params {bad}")
            except jaxinfer.InvalidRequestError:
                counts["rejected_bad_requests"] += 1
        n_prompt = int(rng.integers(1, args.max_prompt + 1))
        if rng.random() < 0.7:
            pre = prefixes[int(rng.integers(len(prefixes)))]
            prompt = (pre + bench_common.random_prompt(rng, vocab, args.max_prompt))[:max(n_prompt, len(pre) // 2)]
        else:
            prompt = bench_common.random_prompt(rng, vocab, n_prompt)
        if tok is not None and rng.random() < 0.2:
            prompt = tok.decode(prompt) or "Once"
        params = random_params(rng, jaxinfer, vocab, stops)
        try:
            rid = engine.add_request(prompt, params)
        except jaxinfer.InvalidRequestError:  # e.g. a text prompt that encodes too long: fine, refused
            counts["refused_valid_looking"] += 1
            return
        tracked[rid] = Tracked(prompt, params, epoch)
        live.add(rid)
        counts["requests"] += 1

    def take(deltas) -> None:
        for d in deltas:
            t = tracked.get(d.request_id)
            if t is None:
                violate(f"delta for unknown request {d.request_id}")
                continue
            if t.finals[d.sample]:
                violate(f"request {d.request_id} sample {d.sample}: delta after its final one")
            t.tokens[d.sample].extend(d.token_ids)
            counts["tokens"] += len(d.token_ids)
            if d.finish_reason is not None:
                t.finals[d.sample] += 1
                t.reasons[d.sample] = d.finish_reason
                if len(t.finals) == t.params.n:
                    live.discard(d.request_id)

    while True:
        submitting = counts["requests"] < args.requests and time.perf_counter() - t0 < args.minutes * 60
        while submitting and len(live) < args.queue:
            submit_one()
            submitting = counts["requests"] < args.requests
        if not engine.has_unfinished():
            if not submitting:
                break
            continue
        take(engine.step())
        step += 1
        if live and rng.random() < args.abort_prob:
            rid = sorted(live)[int(rng.integers(len(live)))]
            if engine.abort(rid):
                tracked[rid].aborted = True
                counts["aborts"] += 1
        if args.update_every and step % args.update_every == 0:
            epoch += 1
            policy = "recompute" if rng.random() < 0.7 else "keep"
            engine.update_params(weights[epoch % 2].params, on_update=policy)
            for rid in live:
                tracked[rid].mixed = True
            counts[f"weight_updates_{policy}"] += 1
        if args.snapshot_every and step % args.snapshot_every == 0:
            engine.snapshot(snap_root)
            engine = jaxinfer.Engine.restore(snap_root, weights[epoch % 2], tok)
            counts["snapshots"] += 1
        if step % args.check_every == 0:
            for v in check_allocator(engine, idle=False):
                violate(v)
    take(engine.step() if engine.has_unfinished() else [])
    for v in check_allocator(engine, idle=True):
        violate(v)
    stats = engine.stats()
    if stats["pages_used"] or stats["running"] or stats["waiting"]:
        violate(f"idle engine stats not empty: {stats}")
    for rid, t in tracked.items():
        n = t.params.n
        if sorted(t.finals) != list(range(n)) or any(c != 1 for c in t.finals.values()):
            violate(f"request {rid}: final deltas per sample {dict(t.finals)}, expected one for each of {n}")
        for s, toks in t.tokens.items():
            if len(toks) > t.params.max_tokens:
                violate(f"request {rid} sample {s}: {len(toks)} tokens > max_tokens {t.params.max_tokens}")
        if not t.aborted and "abort" in t.reasons.values():
            violate(f"request {rid} finished with abort but was never aborted")
    # Greedy requests that ran under one set of weights: equal to a solo run with those weights.
    eligible = [rid for rid, t in tracked.items() if t.params.temperature == 0 and not t.aborted and not t.mixed]
    chosen = [rid for rid in eligible if rng.random() < args.verify]
    solo = {}
    for rid in chosen:
        t = tracked[rid]
        w = t.epoch % 2
        if w not in solo:
            solo[w] = jaxinfer.Engine(weights[w], tokenizer=tok, **{**kwargs, "num_pages": 4 * args.num_pages})
        ref = solo[w].generate([t.prompt], dataclasses.replace(t.params, logprobs=2))[0]
        for s in range(t.params.n):
            got, want = t.tokens[s], ref.samples[s].token_ids
            if got == want and t.reasons[s] == ref.samples[s].finish_reason:
                counts["verified"] += 1
                continue
            i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            lps = ref.samples[s].logprobs
            top = sorted(lps[i].values(), reverse=True) if i < len(lps) else []
            if len(top) >= 2 and top[0] - top[1] < args.tie_margin:
                counts["near_ties"] += 1
            else:
                violate(f"request {rid} sample {s} differs from its solo run at token {i}: {got[:i + 3]} vs "
                        f"{want[:i + 3]}")
    shutil.rmtree(snap_root, ignore_errors=True)
    out = {"model": name, "steps": step, "seconds": round(time.perf_counter() - t0, 1), **counts,
           "preemptions": stats["preemptions"], "violations": len(violations), "violation_examples": violations[:20],
           "args": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps({k: v for k, v in out.items() if k not in ("args", "violation_examples")}, indent=1), flush=True)
    if args.json:
        bench_common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    sys.exit(1 if main()["violations"] else 0)
