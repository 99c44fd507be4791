"""The package's shape, checked on its import graph (every import, at module level or inside a function): no cycle
between packages, nothing outside `cli` imports `cli`, and the core never imports an application."""

from __future__ import annotations

import ast
from pathlib import Path

import saescope

ROOT = Path(saescope.__file__).parent
CORE = {"sae", "models", "data", "train", "io", "files", "schema", "errors", "cache", "system", "activations", "finetune"}
APPLICATIONS = {"inspect", "redundancy", "trust", "toxicity", "synthesis", "sasft", "rl", "behaviour", "report", "steer", "scope",
                "evaluate", "control_sets", "probing", "absorption", "quality", "cli"}


def _part(module: str) -> str:
    """The package (or top-level module) a module belongs to: saescope.io.formats -> io."""
    return module.split(".")[1] if "." in module else module


def _imports() -> dict[str, set[str]]:
    """{module: saescope modules it imports}."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saescope."):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("saescope.")}
        graph[name] = deps
    return graph


def _package_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, deps in _imports().items():
        for dep in deps:
            if _part(module) != _part(dep):
                edges.setdefault(_part(module), set()).add(_part(dep))
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None."""
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_between_packages():
    assert _cycle(_package_graph()) is None, _cycle(_package_graph())


def test_the_cycle_finder_finds_one():  # the check above must be able to fail
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_only_the_command_line_imports_the_command_line():
    importers = {m for m, deps in _imports().items() if any(_part(d) == "cli" for d in deps) and _part(m) not in ("cli", "__main__")}
    assert not importers


def test_the_core_imports_no_application():
    graph = _package_graph()
    assert CORE | APPLICATIONS >= set(graph) - {"__main__", "saescope"}, "a new package: say whether it is core or an application"
    bad = {(p, d) for p in CORE for d in graph.get(p, ()) if d in APPLICATIONS}
    assert not bad
