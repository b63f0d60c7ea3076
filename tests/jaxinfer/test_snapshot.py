"""Snapshot / resume (jaxinfer/snapshot.py), live weight updates (Engine.update_params) and
admission under memory pressure.

The resume test snapshots one workload at several moments chosen so that, at the snapshot,
a chunked prefill is half done, a preempted request waits with output already generated, a
request with n > 1 runs and pages come from the prefix cache; a new Python process restores each
snapshot and finishes it; every request's tokens, logprobs, texts and finish reasons must be
bitwise those of the uninterrupted run (same process, same settings), greedy and seeded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer import SamplingParams as SP
from jaxinfer.snapshot import SnapshotError, load_state, save_state

ROOT = Path(__file__).resolve().parents[2]
KW = dict(max_slots=4, page_size=8, num_pages=16, max_seq_len=128, prefill_chunk=8, seed=3, max_logprobs=3,
          decode_steps=4)
SHARED = "Once upon a time, there was a little girl named Lily."
PROMPTS = [SHARED, SHARED + " She liked", "The dog " * 6, "Lily", SHARED + " One day", [1, 400, 500, 300],
           "Ben and Lily went to the park"]
PARAMS = [dict(max_tokens=40, temperature=0.0, logprobs=2), dict(max_tokens=30, temperature=1.0, n=3),
          dict(max_tokens=50, temperature=0.8, stop=["."]), dict(max_tokens=20, temperature=0.0),
          dict(max_tokens=64, temperature=1.0, top_k=5, presence_penalty=0.5), dict(max_tokens=33, temperature=0.0, n=2),
          dict(max_tokens=45, temperature=0.7, seed=11, logprobs=1, repetition_penalty=1.2)]


def summary(engine) -> list:
    return [[o.request_id, o.prompt_token_ids, o.prompt_logprobs,
             [[s.token_ids, s.text, s.finish_reason, s.logprobs] for s in o.samples]] for o in engine.outputs()]


# The child: restores each snapshot directory given on the command line, finishes it, prints JSON.
CHILD = r"""
import json, sys
import jaxinfer
path = jaxinfer.default_model_dir()
model, tok = jaxinfer.load_model(path), jaxinfer.load_tokenizer(path)
out = []
for snap in sys.argv[1:]:
    engine = jaxinfer.Engine.restore(snap, model, tok)
    engine.run_until_idle()
    out.append([[o.request_id, o.prompt_token_ids, o.prompt_logprobs,
                 [[s.token_ids, s.text, s.finish_reason, s.logprobs] for s in o.samples]] for o in engine.outputs()])
print(json.dumps(out))
"""


def _jsonable(x):
    return json.loads(json.dumps(x))  # int dict keys become strings, as in the child's output


@pytest.fixture(scope="module")
def stories(assets_dir):
    path = assets_dir / "stories260K"
    return jaxinfer.load_model(path), jaxinfer.load_tokenizer(path)


def _engine(stories, **kw):
    model, tok = stories
    engine = jaxinfer.Engine(model, tokenizer=tok, **{**KW, **kw})
    for p, sp in zip(PROMPTS, PARAMS):
        engine.add_request(p, SP(**sp))
    return engine


def _moment(engine) -> set[str]:
    """What is going on right now (between steps)."""
    sched, what = engine.scheduler, set()
    running = [s for s in sched.slots if s is not None and s.slot is not None]
    if any(0 < s.prefill_pos < s.prefill_len for s in running):
        what.add("chunked-prefill")
    if any(s.out.token_ids for s in sched.waiting):
        what.add("preempted-waiting")
    if any(s.req.params.n > 1 for s in running):
        what.add("n>1")
    if engine.stats()["prefix_cache_hit_tokens"]:
        what.add("cache-hit")
    return what


def test_snapshot_restored_in_a_new_process_continues_bitwise(stories, tmp_path):
    engine, moments = _engine(stories), []
    while engine.has_unfinished():
        moments.append(_moment(engine))
        engine.step()
    reference = _jsonable(summary(engine))
    assert engine.stats()["preemptions"] > 0 and engine.stats()["prefix_cache_hit_tokens"] > 0
    wanted = ["chunked-prefill", "preempted-waiting", "n>1"]
    ks = sorted({next(k for k, m in enumerate(moments) if w in m) for w in wanted} | {len(moments) // 2, 1})
    snaps = []
    for k in ks:
        engine = _engine(stories)
        for _ in range(k):
            engine.step()
        snaps.append(str(engine.snapshot(tmp_path / f"at-{k}")))
    covered = set().union(*(moments[k] for k in ks))
    assert {"chunked-prefill", "preempted-waiting", "n>1", "cache-hit"} <= covered, covered
    res = subprocess.run([sys.executable, "-c", CHILD, *(str(tmp_path / f"at-{k}") for k in ks)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAXINFER_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    for k, restored in zip(ks, json.loads(res.stdout.strip().splitlines()[-1])):
        assert restored == reference, f"restored at step {k} ({sorted(moments[k])}) differs"


def test_restore_refuses_another_model_config_or_damaged_snapshot(stories, tmp_path):
    model, tok = stories
    engine = _engine(stories)
    for _ in range(3):
        engine.step()
    snap = Path(engine.snapshot(tmp_path / "s"))
    other = model.replace(params=jax.tree.map(lambda x: x * 1.01, model.params))
    with pytest.raises(SnapshotError, match="another model"):
        jaxinfer.Engine.restore(tmp_path / "s", other, tok)
    with pytest.raises(SnapshotError, match=r"max_slots: snapshot 4, here 8"):
        jaxinfer.Engine.restore(tmp_path / "s", model, tok, max_slots=8)
    with pytest.raises(SnapshotError, match="no snapshot"):
        jaxinfer.Engine.restore(tmp_path / "nothing", model, tok)
    host = snap / "host.json"
    text = host.read_text()
    host.write_text(text.replace('"next_id": 7', '"next_id": 8'))
    with pytest.raises(SnapshotError, match="host.json does not match its checksum"):
        jaxinfer.Engine.restore(tmp_path / "s", model, tok)
    host.unlink()
    with pytest.raises(SnapshotError, match="incomplete: host.json is missing"):
        jaxinfer.Engine.restore(tmp_path / "s", model, tok)
    state_file = next(p for p in sorted((snap / "state").rglob("*")) if p.is_file() and p.stat().st_size > 64)
    host.write_text(text)
    state_file.write_bytes(state_file.read_bytes()[:-16])
    with pytest.raises(SnapshotError, match="does not match its checksum"):
        jaxinfer.Engine.restore(tmp_path / "s", model, tok)


# The writer: a first snapshot completes, the second is killed (SIGKILL) while its files are written.
KILLED = r"""
import os, signal, sys, json
import jaxinfer
from jaxinfer import snapshot
path = jaxinfer.default_model_dir()
model, tok = jaxinfer.load_model(path), jaxinfer.load_tokenizer(path)
engine = jaxinfer.Engine(model, tokenizer=tok, max_slots=2, page_size=8, num_pages=40, max_seq_len=128)
for p in ["Once upon a time", "Lily and Ben"]:
    engine.add_request(p, jaxinfer.SamplingParams(max_tokens=30, temperature=0.0))
for _ in range(3):
    engine.step()
engine.snapshot(sys.argv[1])
print(json.dumps([o.token_ids for o in engine.outputs()]), flush=True)
engine.step()
real = snapshot.host_to_json
def die(engine):  # the state is on disk, host.json is not: the writer dies mid-snapshot
    os.kill(os.getpid(), signal.SIGKILL)
snapshot.host_to_json = die
engine.snapshot(sys.argv[1])
"""


def test_a_writer_killed_mid_snapshot_leaves_the_previous_one_restorable(stories, tmp_path):
    model, tok = stories
    res = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "JAXINFER_CACHE_DIR": "0"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    at_first = json.loads(res.stdout.strip().splitlines()[-1])
    assert list((tmp_path / "s").glob("*.partial")), "the killed write should have left its partial directory"
    engine = jaxinfer.Engine.restore(tmp_path / "s", model, tok)
    assert [o.token_ids for o in engine.outputs()] == at_first
    engine.run_until_idle()
    fresh = jaxinfer.Engine(model, tokenizer=tok, max_slots=2, page_size=8, num_pages=40, max_seq_len=128)
    want = fresh.generate(["Once upon a time", "Lily and Ben"], SP(max_tokens=30, temperature=0.0))
    assert [o.token_ids for o in engine.outputs()] == [o.token_ids for o in want]


def test_save_and_load_state_without_an_engine(tiny_model, tmp_path):
    cfg = jaxinfer.EngineConfig(max_slots=2, page_size=4, num_pages=16, max_seq_len=32)
    state = jaxinfer.init_state(cfg, tiny_model.config, np.float32)
    state = state.replace(length=state.length + 3, k_pages=state.k_pages + 0.5)
    save_state(state, tmp_path / "st")
    back = load_state(tmp_path / "st", like=state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bigger = jaxinfer.init_state(jaxinfer.EngineConfig(max_slots=3, page_size=4, num_pages=16, max_seq_len=32),
                                 tiny_model.config, np.float32)
    with pytest.raises(SnapshotError, match=r"saved state leaf .* is .*this engine's is"):
        load_state(tmp_path / "st", like=bigger)


# ----------------------------------------------------------------------------- weight updates
def _count_compiles():
    events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda e, d, **kw: events.append(e) if e == "/jax/core/compile/backend_compile_duration" else None)
    return events


@pytest.mark.parametrize("policy", ["recompute", "keep"])
def test_update_params_compiles_nothing_and_equals_a_fresh_engine(stories, policy):
    model, tok = stories
    new = model.replace(params=jax.tree.map(lambda x: x * 1.05 if x.ndim > 1 else x, model.params))
    kw = dict(max_slots=4, page_size=8, num_pages=64, max_seq_len=128)
    prompts = ["Once upon a time", "The dog", "Lily and Ben", "One day", "Tom had a ball"]
    sp = SP(max_tokens=30, temperature=0.0)
    engine = jaxinfer.Engine(model, tokenizer=tok, **kw)
    old_ref = engine.generate(prompts, sp)
    ids = [engine.add_request(p, sp) for p in prompts]
    engine.step(), engine.step()
    before = {o.request_id: list(o.token_ids) for o in engine.outputs()}
    compiles = _count_compiles()
    engine.update_params(new.params, on_update=policy)
    engine.run_until_idle()
    after = engine.generate(prompts, sp)
    assert compiles == [], f"update_params + generate compiled {len(compiles)} programs"
    fresh = jaxinfer.Engine(new, tokenizer=tok, **kw).generate(prompts, sp)
    assert [o.token_ids for o in after] == [o.token_ids for o in fresh]
    outs = {o.request_id: o for o in engine.outputs()}
    for rid, ref in zip(ids, old_ref):  # nothing lost: each in-flight request finished, its early tokens kept
        assert outs[rid].finish_reason in ("length", "stop") and outs[rid].token_ids[:len(before[rid])] == before[rid]
        assert before[rid] == ref.token_ids[:len(before[rid])]
    assert engine.stats()["pages_used"] == 0


def test_update_params_refuses_a_different_tree(stories):
    model, tok = stories
    engine = jaxinfer.Engine(model, tokenizer=tok, max_slots=2, page_size=8, num_pages=32, max_seq_len=64)
    p = model.params
    with pytest.raises(ValueError, match=r"\['embed'\] is float32\[10, .*expected float32\[512"):
        engine.update_params({**p, "embed": p["embed"][:10]})
    with pytest.raises(ValueError, match=r"\['final_norm'\].* is bfloat16"):
        engine.update_params({**p, "final_norm": p["final_norm"].astype("bfloat16")})
    with pytest.raises(ValueError, match=r"lack \['final_norm'\]"):
        engine.update_params({k: v for k, v in p.items() if k != "final_norm"})
    with pytest.raises(ValueError, match="on_update must be one of"):
        engine.update_params(p, on_update="sometimes")
    assert engine.generate(["Once"], SP(max_tokens=4, temperature=0.0))[0].token_ids  # still serves


# ----------------------------------------------------------------------------- memory pressure
def test_a_request_that_can_never_fit_is_refused_at_submission(tiny_model):
    engine = jaxinfer.Engine(tiny_model, max_slots=2, page_size=4, num_pages=9, max_seq_len=64)
    with pytest.raises(jaxinfer.InvalidRequestError, match="pages"):
        engine.add_request(list(range(3, 40)), SP(max_tokens=20))
    assert engine.stats()["waiting"] == 0


def test_a_pool_full_of_cached_pages_never_deadlocks_admission(tiny_model):
    """Fill the prefix cache with distinct prompts (all of their pages stay cached and free),
    then send many long prompts that each need nearly the whole pool: all must finish."""
    engine = jaxinfer.Engine(tiny_model, max_slots=4, page_size=4, num_pages=33, max_seq_len=120, decode_steps=4)
    rng = np.random.default_rng(0)
    fill = [rng.integers(3, 250, 16).tolist() for _ in range(16)]
    engine.generate(fill, SP(max_tokens=1, temperature=0.0))
    assert engine.stats()["pages_cached_free"] >= 24
    long = [rng.integers(3, 250, int(rng.integers(85, 101))).tolist() for _ in range(10)]
    sp = SP(max_tokens=16, temperature=0.0, ignore_eos=True)
    for p in long:
        engine.add_request(p, sp)
    for steps in range(2000):
        engine.step()
        if not engine.has_unfinished():
            break
    assert not engine.has_unfinished(), f"stuck after {steps} steps: {engine.stats()}"
    assert all(o.finish_reason == "length" and len(o.token_ids) == 16 for o in engine.outputs())
