"""The package's shape: imports point one way (engine -> steps -> model -> attention ->
pallas_kernels), no import cycle among jaxinfer modules, pallas_kernels stands alone, and no
function-local import without a comment saying why. Read off the source with `ast`, so a
violation is caught whether or not the offending line runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("jaxinfer", "pallas_kernels")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(f): f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_pkg = _modules()[module].name == "__init__.py"
    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported module, node, inside a function) for every import of the two packages."""
    tree = ast.parse(path.read_text())
    local = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
             for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
    known = _modules()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            # `from pkg import sub` imports the submodule when there is one.
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                # an import of a.b.c also runs a and a.b
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                out.append((name, node, id(node) in local))
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in _modules().items():
        # (Importing a submodule also runs its parent package's __init__ first; that edge is left
        # out: a package __init__ that re-exports its submodules is fine as long as no submodule
        # imports the package itself, which the edges kept here catch.)
        graph[module] = {m for m, _, _ in _imports(module, path) if m != module}
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def _reaches(graph, src: str, dst: str) -> bool:
    seen, todo = set(), [src]
    while todo:
        m = todo.pop()
        if m == dst:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return False


# The runtime's chain, top to bottom: each reaches the next, none reaches one above it.
CHAIN = ("jaxinfer.engine", "jaxinfer.steps", "jaxinfer.model", "jaxinfer.attention", "pallas_kernels")


def test_imports_point_one_way():
    graph = _graph()
    for upper, lower in zip(CHAIN, CHAIN[1:]):
        assert _reaches(graph, upper, lower), f"{upper} should build on {lower}"
    for i, lower in enumerate(CHAIN):
        for upper in CHAIN[:i]:
            assert not _reaches(graph, lower, upper), f"{lower} imports {upper}: imports must point down the chain"


def test_pallas_kernels_import_nothing_of_jaxinfer():
    for module, path in _modules().items():
        if module.startswith("pallas_kernels"):
            assert "jaxinfer" not in path.read_text(), f"{path} mentions jaxinfer"
    # And at run time: importing the kernels loads no jaxinfer module.
    code = ("import sys, pallas_kernels.flash_attention, pallas_kernels.paged_attention, pallas_kernels.quant_matmul; "
            "print([m for m in sys.modules if m.startswith('jaxinfer')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_function_local_imports_say_why():
    bad = []
    for module, path in _modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(fn):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    line = lines[sub.lineno - 1]
                    above = [x.strip() for x in lines[max(0, sub.lineno - 3): sub.lineno - 1]]
                    if "#" not in line and not any("#" in x for x in above):
                        bad.append(f"{path.relative_to(ROOT)}:{sub.lineno}: {line.strip()}")
    assert not bad, "function-local imports need a comment saying why:\n" + "\n".join(bad)
