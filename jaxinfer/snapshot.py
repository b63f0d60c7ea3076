"""Snapshot and resume: an engine written to disk between steps and continued elsewhere,
bit-identically.

Two halves, as the engine has two:
- the device state (`EngineState`: KV pool, allocator and prefix cache, slot table, per-slot
  RNG) is one PyTree of arrays: `save_state` / `load_state` write and read it with orbax, and
  work without an Engine (research code);
- the host side (requests, their partial outputs, detokenizer and stop-string progress, the
  waiting queue and slot occupancy, preemption order, counters, the seed generator) is plain
  data, written as versioned JSON by `host_to_json` / `host_from_json`.

On-disk layout of `Engine.snapshot(path)`, made for a crash at any moment to leave the previous
snapshot valid: `path/snapshot-<k>/` holds `state/` (orbax), `host.json` and `manifest.json`
(format version, fingerprints of the engine config and the model, a SHA-256 of every file);
`path/LATEST` names the newest complete one. A snapshot is written into `snapshot-<k>.partial`,
renamed when complete, and only then does LATEST move (an atomic `os.replace`); the previous
snapshot is deleted after that. Restoring verifies the manifest (a truncated or edited file is
named), the config fingerprint (the fields that differ are named) and the model fingerprint
(config plus a checksum of every weight), so a snapshot never resumes on the wrong engine.

Streams and `generate` calls do not survive a process: after a restore every request is
delivered like an `add_request` one (`step()`, `outputs()`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.allocator import PageAllocator
from jaxinfer.config import config_to_hf
from jaxinfer.errors import JaxinferError
from jaxinfer.request import Request, RequestOutput, SampleOutput, Sequence, StreamDelta
from jaxinfer.sampling import SamplingParams
from jaxinfer.state import EngineState
from jaxinfer.tokenizer import IncrementalDetokenizer

FORMAT, VERSION = "jaxinfer-snapshot", 1


class SnapshotError(JaxinferError, ValueError):
    """A snapshot that cannot be restored here: missing, partial, corrupt, or taken with another
    engine configuration or model."""


# ----------------------------------------------------------------------------- device state
def save_state(state: EngineState, path: str | Path) -> None:
    """Write an EngineState to directory `path` (orbax; `path` must not exist)."""
    import orbax.checkpoint as ocp  # ~0.2 s and hundreds of modules: keep `import jaxinfer` lean

    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), jax.device_get(flax.serialization.to_state_dict(state)))


def load_state(path: str | Path, like: EngineState | None = None) -> EngineState:
    """The EngineState saved at `path`, on the default device. With `like`, every leaf must have
    its shape and dtype (a SnapshotError names the first that does not)."""
    import orbax.checkpoint as ocp  # ~0.2 s and hundreds of modules: keep `import jaxinfer` lean

    path = Path(path).absolute()
    if not path.is_dir():
        raise SnapshotError(f"no saved state at {path}")
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            raw = ckptr.restore(path)
        arrays = jax.device_put(jax.tree.map(np.asarray, raw))
        alloc = PageAllocator(**arrays.pop("alloc"))
        state = EngineState(alloc=alloc, **arrays)
    except SnapshotError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
        raise SnapshotError(f"the saved state at {path} cannot be read ({type(e).__name__}: {e})") from e
    if like is not None:
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(like), strict=True):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise SnapshotError(f"saved state leaf {jax.tree_util.keystr(p)} is {a.dtype}{list(a.shape)}, this "
                                    f"engine's is {b.dtype}{list(b.shape)}")
    return state


# ----------------------------------------------------------------------------- fingerprints
def config_fingerprint(engine) -> dict:
    """What must match for the saved state and host data to mean the same thing here."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(engine.cfg).items()}
    return {"engine_config": cfg, "mode": engine.mode, "add_bos": engine.add_bos,
            "prefill_chunk": engine.prefill_chunk, "batch_invariant": engine.batch_invariant,
            "pool_dtype": str(engine.state.k_pages.dtype), "eos_ids": list(engine.eos_ids)}


@jax.jit
def _checksums(leaves):
    # Two sums per weight, in float32 over the raw values: any changed weight moves them.
    return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x.astype(jnp.float32)))]) for x in leaves]


def model_fingerprint(model) -> str:
    """Config plus two checksums per weight, in the layout the engine holds (stacked or not: the
    config fingerprint already pins which)."""
    leaves = jax.tree_util.tree_leaves_with_path(model.params)
    sums = np.asarray(jax.device_get(_checksums([a for _, a in leaves])))
    h = hashlib.sha256(json.dumps(config_to_hf(model.config), sort_keys=True).encode())
    for (p, a), s in zip(leaves, sums):
        h.update(f"{jax.tree_util.keystr(p)}:{a.dtype}:{list(a.shape)}:{s[0]!r}:{s[1]!r};".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- host side
def _sample_to_json(s: SampleOutput) -> dict:
    d = dataclasses.asdict(s)
    if s.logprobs is not None:
        d["logprobs"] = [[[k, v] for k, v in e.items()] for e in s.logprobs]
    return d


def _sample_from_json(d: dict) -> SampleOutput:
    if d["logprobs"] is not None:
        d["logprobs"] = [{int(k): v for k, v in e} for e in d["logprobs"]]
    return SampleOutput(**d)


def _output_to_json(o: RequestOutput) -> dict:
    plp = None if o.prompt_logprobs is None else [None if e is None else [[k, v] for k, v in e.items()]
                                                   for e in o.prompt_logprobs]
    return {"request_id": o.request_id, "prompt_token_ids": list(o.prompt_token_ids),
            "samples": [_sample_to_json(s) for s in o.samples], "prompt_logprobs": plp}


def _output_from_json(d: dict) -> RequestOutput:
    plp = None if d["prompt_logprobs"] is None else [None if e is None else {int(k): v for k, v in e}
                                                     for e in d["prompt_logprobs"]]
    return RequestOutput(d["request_id"], d["prompt_token_ids"], [_sample_from_json(s) for s in d["samples"]], plp)


_DETOK_FIELDS = ("_ids", "_chunks", "_prefix", "_read", "_prefix_text", "_prompt_end", "_prompt_text")
_SEQ_FIELDS = ("slot", "order", "prefill_pos", "tokens", "forked", "pending", "stopped", "sent")


def _seq_to_json(q: Sequence) -> dict:
    d = {f: getattr(q, f) for f in _SEQ_FIELDS}
    d["forks"] = [f.index for f in q.forks]
    d["pending_logprobs"] = [[[k, v] for k, v in e.items()] for e in q.pending_logprobs]
    d["detok"] = None if q.detok is None else {f: getattr(q.detok, f) for f in _DETOK_FIELDS}
    return d


def host_to_json(engine) -> dict:
    """Everything the engine's host side holds, as JSON-able data."""
    sched = engine.scheduler
    order = next(sched._order)  # read the admission counter without moving it
    sched._order = itertools.count(order)
    live = {}  # every request some sequence still refers to: live ones and aborted ones due a delta
    for seq in [*sched.waiting, *(s for s in sched.slots if s is not None), *engine._aborted]:
        live[seq.req.rid] = seq.req
    live.update(engine._live)

    def ref(q: Sequence) -> list[int]:
        return [q.req.rid, q.index]

    return {
        "requests": [{"rid": r.rid, "prompt": r.prompt, "params": dataclasses.asdict(r.params),
                      "output": _output_to_json(r.out), "seqs": [_seq_to_json(q) for q in r.seqs],
                      "live": r.rid in engine._live} for r in sorted(live.values(), key=lambda r: r.rid)],
        "finished_outputs": [_output_to_json(o) for rid, o in sorted(engine._outputs.items()) if rid not in live],
        "kept_outputs": sorted(engine._outputs),
        "waiting": [ref(q) for q in sched.waiting],
        "slots": [None if q is None else ref(q) for q in sched.slots],
        "order": order,
        "prefilled_keys": [list(k) for k in sched._prefilled_keys],
        "aborted": [ref(q) for q in engine._aborted],
        "unowned": [dataclasses.asdict(d) | {"logprobs": None if d.logprobs is None else [
            [[k, v] for k, v in e.items()] for e in d.logprobs]} for d in engine._unowned],
        "next_id": engine._next_id,
        "counters": dict(engine._counters),
        "seed_generator": engine._seeds.bit_generator.state,
    }


def host_from_json(engine, data: dict) -> None:
    """Rebuild the host side of a freshly constructed `engine` from `host_to_json` data."""
    tok = engine.tokenizer
    reqs: dict[int, Request] = {}
    for r in data["requests"]:
        out = _output_from_json(r["output"])
        req = Request(r["rid"], r["prompt"], SamplingParams(**r["params"]), out)
        for i, q in enumerate(r["seqs"]):
            detok = None
            if q["detok"] is not None:
                if tok is None:
                    raise SnapshotError("the snapshot's requests were detokenized; restore it with the tokenizer")
                detok = object.__new__(IncrementalDetokenizer)
                detok._tok = tok
                for f in _DETOK_FIELDS:
                    setattr(detok, f, q["detok"][f])
            seq = Sequence(req, i, out.samples[i], detok, **{f: q[f] for f in _SEQ_FIELDS})
            seq.pending_logprobs = [{int(k): v for k, v in e} for e in q["pending_logprobs"]]
            req.seqs.append(seq)
        for seq, q in zip(req.seqs, r["seqs"]):
            seq.forks = [req.seqs[i] for i in q["forks"]]
        reqs[req.rid] = req
        if r["live"]:
            engine._live[req.rid] = req

    def seq(ref) -> Sequence:
        return reqs[ref[0]].seqs[ref[1]]

    sched = engine.scheduler
    sched.waiting.extend(seq(x) for x in data["waiting"])
    sched.slots = [None if x is None else seq(x) for x in data["slots"]]
    sched._order = itertools.count(data["order"])
    sched._prefilled_keys.update((tuple(k), None) for k in data["prefilled_keys"])
    engine._aborted = [seq(x) for x in data["aborted"]]
    for d in data["unowned"]:
        if d["logprobs"] is not None:
            d["logprobs"] = [{int(k): v for k, v in e} for e in d["logprobs"]]
        engine._unowned.append(StreamDelta(**d))
    # After a restore every request is the engine's to report (its stream or generate call is gone).
    outputs = {o["request_id"]: _output_from_json(o) for o in data["finished_outputs"]}
    outputs.update({rid: r.out for rid, r in reqs.items()})
    engine._outputs = dict(sorted(outputs.items()))
    engine._next_id = data["next_id"]
    engine._counters.update(data["counters"])
    engine._seeds.bit_generator.state = data["seed_generator"]


# ----------------------------------------------------------------------------- on disk
def _digest(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "manifest.json"}


def write(engine, path: str | Path) -> Path:
    """Write a snapshot of `engine` under directory `path`; returns the snapshot's directory."""
    root = Path(path).absolute()
    root.mkdir(parents=True, exist_ok=True)
    k = 1 + max([int(p.name.split("-")[1].split(".")[0]) for p in root.glob("snapshot-*")] or [0])
    partial, final = root / f"snapshot-{k}.partial", root / f"snapshot-{k}"
    save_state(engine.state, partial / "state")
    (partial / "host.json").write_text(json.dumps(host_to_json(engine)))
    manifest = {"format": FORMAT, "version": VERSION, "config": config_fingerprint(engine),
                "model": model_fingerprint(engine.model), "engine_kwargs": engine._init_kwargs,
                "files": _files(partial)}
    _write_synced(partial / "manifest.json", json.dumps(manifest, indent=1))
    os.replace(partial, final)
    _write_synced(root / "LATEST.tmp", final.name)
    os.replace(root / "LATEST.tmp", root / "LATEST")  # the commit point
    for old in root.glob("snapshot-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_synced(file: Path, text: str) -> None:
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _latest(root: Path) -> Path | None:
    latest = root / "LATEST"
    if not latest.is_file():
        return None
    return root / latest.read_text().strip()


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    """The newest complete snapshot under `path` and its verified manifest."""
    root = Path(path).absolute()
    snap = _latest(root)
    if snap is None:
        raise SnapshotError(f"no snapshot at {root} (no LATEST file: nothing was written, or the first write "
                            "did not complete)")
    try:
        manifest = json.loads((snap / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{snap / 'manifest.json'} is missing or corrupt ({e})") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise SnapshotError(f"{snap} is not a {FORMAT} version {VERSION} snapshot "
                            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    found = _files(snap)
    for name, digest in manifest["files"].items():
        if name not in found:
            raise SnapshotError(f"snapshot {snap} is incomplete: {name} is missing")
        if found[name] != digest:
            raise SnapshotError(f"snapshot {snap} is corrupt: {name} does not match its checksum")
    return snap, manifest


def check_compatible(engine, manifest: dict) -> None:
    """Refuse a snapshot from another configuration or model, naming what differs."""
    mine, theirs = config_fingerprint(engine), manifest["config"]
    if mine != theirs:
        diff = []
        for key in sorted(set(mine) | set(theirs)):
            a, b = mine.get(key), theirs.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                diff += [f"{key}.{k}: snapshot {b.get(k)!r}, here {a.get(k)!r}" for k in sorted(set(a) | set(b))
                         if a.get(k) != b.get(k)]
            elif a != b:
                diff.append(f"{key}: snapshot {b!r}, here {a!r}")
        raise SnapshotError("the snapshot was taken with another engine configuration: " + "; ".join(diff))
    if model_fingerprint(engine.model) != manifest["model"]:
        raise SnapshotError("the snapshot was taken with another model (its config or weights differ from the "
                            "model given to restore)")


def restore_into(engine, snap: Path, manifest: dict) -> None:
    check_compatible(engine, manifest)
    state = load_state(snap / "state", like=engine.state)
    try:
        data = json.loads((snap / "host.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{snap / 'host.json'} cannot be read ({e})") from e
    engine.state = state
    host_from_json(engine, data)
