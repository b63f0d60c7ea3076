"""Shared fixtures for the whole test tree.

- `assets_dir`: the shared test assets (tokenizers, small checkpoints) that live next to the
  repository, at <repo>/../shared/assets. Tests that need them skip, with the path in the
  reason, when they are absent (e.g. a fresh clone without the assets).
- `_release_compiled_code` (autouse, per module): XLA:CPU maps memory for every compiled
  executable and keeps it while the jit caches hold the executable. The suite compiles thousands
  (every engine shape of every test), which once pushed the process past the kernel's
  vm.max_map_count (65530) and crashed XLA mid-compile (segfault / abort in
  backend_compile_and_load). Clearing the caches after each module keeps the count ~600.
- The engine's own disk cache of compiled steps (jaxinfer/aot.py) is off for the suite
  (JAXINFER_CACHE_DIR=0, set before jaxinfer is imported): thousands of test shapes would fill
  ~/.cache, and a cached executable from an earlier run would hide compilation from the tests
  that count it. Tests of the cache itself point it at a temporary directory.
- Eight fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set before jax
  starts) for the sharding tests; single-device code runs on the first one.
- `tiny_model`: the "tiny" preset (vocab 258, 4 layers, hidden 64) with deterministic random
  weights (seed 0), built once per session so every test reuses the same jit cache entries.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

os.environ["JAXINFER_CACHE_DIR"] = "0"
# Eight CPU devices for the sharding tests (tests/jaxinfer/test_sharding.py); everything else
# runs on the first one as before. Must be set before jax starts its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

ASSETS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    if not ASSETS_DIR.is_dir():
        pytest.skip(f"shared test assets not found at {ASSETS_DIR} (expected <repo>/../shared/assets)")
    return ASSETS_DIR


@pytest.fixture(scope="session")
def tiny_model():
    from jaxinfer.presets import get_preset
    from jaxinfer.weights import dummy_model

    return dummy_model(get_preset("tiny"), seed=0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    yield
    import jaxinfer.aot

    jaxinfer.aot.clear_memory()
    jax.clear_caches()
    gc.collect()
