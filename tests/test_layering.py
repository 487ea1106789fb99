"""The folders import downwards only (docs/architecture.md), and no module imports itself
back through a cycle: read from the source, so a stray import fails here by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shards", "models", "metrics", "trainer", "inference")
# what each package may import of ours (itself always)
ALLOWED = {"shards": set(), "models": {"shards"}, "metrics": {"models", "shards"},
           "trainer": {"metrics", "models", "shards"},
           "inference": {"metrics", "models", "shards"}}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports, at any depth of the file (function-level too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_every_import_points_down(graph):
    wrong = [f"{name} imports {dep}" for name, deps in graph.items() for dep in sorted(deps)
             if (top := dep.split(".")[0]) != name.split(".")[0]
             and top not in ALLOWED[name.split(".")[0]]]
    assert not wrong, wrong


def test_no_import_cycles(graph):
    # a package's __init__ re-exports its modules: only cycles between other modules count
    def edges(name):
        return {d for d in graph[name] if not (d == name.rpartition(".")[0] or
                                               name == d.rpartition(".")[0])}

    state: dict[str, int] = {}
    cycles = []

    def visit(name, path):
        state[name] = 1
        for dep in sorted(edges(name)):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_checker_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from trainer.data.samples import scan_split\n")
    assert imports(bad, {"trainer", "trainer.data", "trainer.data.samples"}) == {
        "trainer.data.samples"}
