"""The compiled-step cache (jaxinfer/aot.py): a second process compiles nothing, a corrupt
entry is recompiled, and the cache is keyed by everything the executable depends on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxinfer
from jaxinfer import aot

ROOT = Path(__file__).resolve().parents[2]

# A child process: a small engine generates; prints what it compiled: our StepCache's count, and
# JAX's persistent-cache misses, which count every other compilation too (eager ops, the random
# weights' jit, anything outside the engine's steps).
CHILD = r"""
import json, sys
import jax
misses = []
jax.monitoring.register_event_listener(
    lambda e, **kw: misses.append(e) if e == "/jax/compilation_cache/cache_misses" else None)
import jaxinfer
from jaxinfer import aot
model = jaxinfer.dummy_model(jaxinfer.get_preset("tiny"), seed=0)
engine = jaxinfer.Engine(model, max_slots=2, page_size=4, num_pages=32, max_seq_len=32, decode_steps=4)
prompts = [[5, 6, 7], list(range(10, 30)), [9] * 7]
outs = engine.generate(prompts, [jaxinfer.SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
                                 for m in (6, 9, 3)])
print(json.dumps({"tokens": [o.token_ids for o in outs], "jax_cache_misses": len(misses),
                  "stats": aot.steps().stats}))
"""


def _run_child(cache: Path | str) -> dict:
    env = {**os.environ, "JAXINFER_CACHE_DIR": str(cache)}
    res = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing(tmp_path):
    first = _run_child(tmp_path)
    assert first["stats"]["compiled"] >= 4 and first["stats"]["loaded"] == 0
    assert first["jax_cache_misses"] >= 1  # at least the random weights' program
    second = _run_child(tmp_path)
    # Every step came from the disk cache, and nothing else missed JAX's cache either.
    assert second["stats"]["compiled"] == 0, second
    assert second["stats"]["loaded"] == first["stats"]["compiled"], second
    assert second["jax_cache_misses"] == 0, second
    assert second["tokens"] == first["tokens"]


def test_cache_off_keeps_nothing(tmp_path):
    out = _run_child("0")
    assert out["stats"]["loaded"] == 0 and out["stats"]["compiled"] >= 4
    assert not any(tmp_path.iterdir())


def test_corrupt_entry_is_recompiled(tmp_path):
    first = _run_child(tmp_path)
    entries = sorted((tmp_path / "steps").glob("*.bin"))
    assert len(entries) == first["stats"]["compiled"]
    entries[0].write_bytes(b"not an executable")
    again = _run_child(tmp_path)
    assert again["stats"]["compiled"] == 1 and again["stats"]["loaded"] == len(entries) - 1
    assert again["tokens"] == first["tokens"]


def test_key_separates_shapes_and_models(tmp_path, tiny_model):
    """Two engines that differ only in their model's dtype, or in a static shape, must not share
    an executable; two identical ones must."""
    cache = aot.StepCache(tmp_path)

    def run(model, max_seq_len):
        engine = jaxinfer.Engine(model, max_slots=2, page_size=4, num_pages=32, max_seq_len=max_seq_len, decode_steps=4)
        engine._steps = cache  # this test's cache instead of the process's
        return engine.generate([[1, 2, 3]], jaxinfer.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))

    run(tiny_model, 32)
    n = cache.stats["compiled"]
    run(tiny_model, 32)
    assert cache.stats["compiled"] == n  # same engine shape: everything reused
    run(tiny_model, 64)
    m = cache.stats["compiled"]
    assert m > n  # another max_seq_len: new programs
    bf16 = jaxinfer.dummy_model(tiny_model.config, dtype="bfloat16", seed=0)
    run(bf16, 64)
    assert cache.stats["compiled"] > m  # another dtype: new programs
    assert len(list((tmp_path / "steps").glob("*.bin"))) == cache.stats["compiled"]


def test_signature_key_sees_static_fields(tiny_model):
    a = aot.signature_key(tiny_model)
    assert a == aot.signature_key(jaxinfer.dummy_model(tiny_model.config, seed=1))  # same shapes
    assert a != aot.signature_key(tiny_model.replace(compute_dtype="bfloat16"))  # a static field
    assert a != aot.signature_key(tiny_model.unstacked())  # another tree structure


def test_background_compile_is_used(tmp_path, tiny_model):
    engine = jaxinfer.Engine(tiny_model, max_slots=2, page_size=4, num_pages=32, max_seq_len=32, decode_steps=4)
    engine._steps = aot.StepCache(tmp_path)
    plan = engine.precompile(background=True)
    engine._steps.wait()
    compiled = engine._steps.stats["compiled"]
    assert compiled == sum(len(v) for v in plan.values())
    engine.generate([list(range(1, 12))], jaxinfer.SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True))
    assert engine._steps.stats["compiled"] == compiled  # the run used only precompiled programs
    assert np.isfinite(engine._steps.stats["compile_seconds"])


def test_program_served_by_jax_cache_is_not_stored_broken(tmp_path):
    """With our entries gone but JAX's persistent cache (same directory, xla/) still holding the
    programs, the StepCache's compilations are JAX cache hits, whose executables serialize
    without their code: none of them may be stored, and a later process must still run."""
    import shutil

    first = _run_child(tmp_path)
    shutil.rmtree(tmp_path / "steps")
    second = _run_child(tmp_path)
    assert second["tokens"] == first["tokens"]
    assert not list((tmp_path / "steps").glob("*.bin")), "executables from JAX's cache were stored"
    third = _run_child(tmp_path)
    assert third["tokens"] == first["tokens"]
