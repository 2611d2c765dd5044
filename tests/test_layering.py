"""The shape of the code (docs/design.md §4): imports flow one way, shared names are public, functions stay short.

Read from the source with ``ast``, so every import counts, at the top of a
module or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# selopt/ is the package selopt, kernels/ is installed as selopt.kernels (pyproject.toml).
SOURCES = {"selopt": ROOT / "selopt", "selopt.kernels": ROOT / "kernels"}
# Each layer may import the layers after it, never one before: optim -> functional -> implementations ->
# (bucket, selection, options). Modules not listed (hft, cofi, hf, check, ...) sit beside them.
LAYERS = [
    {"selopt.optim"},
    {"selopt.functional"},
    {"selopt.reference", "selopt.fused", "selopt.distributed", "selopt.kernels.adamw"},
    {"selopt.bucket", "selopt.selection", "selopt.options"},
]


def modules() -> dict[str, ast.Module]:
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The selopt modules ``tree`` imports (a package's own ``__init__`` counts only when named)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selopt"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("selopt")}
    return names & known


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: imported(tree, set(trees)) - {name} for name, tree in trees.items()}


def test_no_import_cycle(graph):
    packages = {"selopt", "selopt.kernels"}  # their __init__ re-exports submodules; a submodule never needs it

    def cycle_from(start: str, path: list[str]):
        for nxt in sorted(graph[start] - packages):
            if nxt == path[0]:
                return path
            if nxt not in path:
                found = cycle_from(nxt, path + [nxt])
                if found:
                    return found
        return None

    for name in graph:
        assert cycle_from(name, [name]) is None, " -> ".join(cycle_from(name, [name]) + [name])


def test_imports_flow_from_the_optimizer_down(graph):
    for i, layer in enumerate(LAYERS):
        above = set().union(*LAYERS[:i])
        for name in layer:
            assert not graph[name] & above, f"{name} imports {sorted(graph[name] & above)}, a layer above it"


def test_no_private_name_is_imported_across_modules():
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selopt"):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{name} imports {private} from {node.module}"


def test_functions_fit_on_a_screen():
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{name}.{node.name} is {length} lines"


def test_the_optimizer_module_stays_small():
    assert len((ROOT / "selopt" / "optim.py").read_text().splitlines()) <= 300
