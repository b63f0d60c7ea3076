"""Shared fixtures for the whole test tree.

- `assets_dir`: the shared test assets (tokenizers, small checkpoints) that live next to the
  repository, at <repo>/../shared/assets. Tests that need them skip, with the path in the
  reason, when they are absent (e.g. a fresh clone without the assets).
- `tiny_model`: the "tiny" preset (vocab 258, 4 layers, hidden 64) with deterministic random
  weights (seed 0), built once per session so every test reuses the same jit cache entries.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
