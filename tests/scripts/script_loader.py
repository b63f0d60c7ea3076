"""Import a script from scripts/ as a module (the scripts are not a package).

The scripts import their sibling modules (bench_common, bench_metrics, ...) by plain name, as
`python scripts/X.py` allows; a script loaded from its file path needs scripts/ on the import
path for that, so it is put there (first) once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
