"""The package's shape, checked on its import graph (every import, at module level or inside a function), against the
one declaration of the tiers (saescope.TIERS): a module imports only its own tier and the tiers below it; an
application imports no other application; nothing outside the CLI imports the CLI; the SAE maths imports no model,
data or file code; and no two parts import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import saescope

ROOT = Path(saescope.__file__).parent


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of a relative import (`from .x import y` in saescope.api.rules)."""
    base = module.split(".")[: len(module.split(".")) - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> dict[str, set[str]]:
    """{module: saescope modules it imports (names imported from a package count as modules of it)}."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = name.endswith(".__init__")
        name = name.removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                mod = _resolve(name if is_package else name.rsplit(".", 1)[0] + ".x", node) if node.level else node.module
                if mod and (mod == "saescope" or mod.startswith("saescope.")):
                    deps |= {f"{mod}.{a.name}" if mod == "saescope" else mod for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("saescope.")}
        graph[name] = deps
    return graph


def tier(module: str) -> str | None:
    """The tier of saescope.TIER.rest, or None for the package root and __main__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in saescope.TIERS else None


def part(module: str) -> str:
    """The unit the rules speak of: core.sae, api.scope, apps.toxicity, cli."""
    parts = module.split(".")
    return ".".join(parts[1:3]) if tier(module) in ("core", "api", "apps") and len(parts) > 2 else ".".join(parts[1:2])


def violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {t: i for i, t in enumerate(saescope.TIERS)}
    bad = []
    for module, deps in graph.items():
        t = tier(module)
        for dep in deps:
            d = tier(dep)
            if d == "cli" and t != "cli" and module != "saescope.__main__":
                bad.append(f"{module} imports the CLI ({dep})")
            if t is None or d is None:
                continue
            if rank[d] > rank[t] and d != "cli":  # the CLI is said above
                bad.append(f"{module} ({t}) imports {dep} ({d}), a higher tier")
            if t == d == "apps" and part(module) != part(dep):
                bad.append(f"{module} imports another application ({dep})")
            if part(module) == "core.sae" and part(dep) != "core.sae" and part(dep) not in saescope.SAE_MATHS_MAY_IMPORT:
                bad.append(f"{module}: the SAE maths imports {dep}")
    return sorted(bad)


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
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


def part_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, deps in graph.items():
        for dep in deps:
            if tier(module) and tier(dep) and part(module) != part(dep):
                edges.setdefault(part(module), set()).add(part(dep))
    return edges


def test_every_module_sits_in_a_tier():
    loose = sorted(m for m in _imports() if tier(m) is None and m not in ("saescope", "saescope.__main__"))
    assert not loose, f"modules outside the tiers {saescope.TIERS}: {loose}"


def test_imports_follow_the_tiers():
    assert violations(_imports()) == []


def test_no_import_cycle_between_parts():
    assert cycle(part_graph(_imports())) is None


def test_the_checks_can_fail():  # each rule on a graph that breaks it
    graph = {"saescope.core.io.formats": {"saescope.api.scope"}, "saescope.apps.toxicity.run": {"saescope.apps.synthesis.coverage"},
             "saescope.api.store": {"saescope.cli.flags"}, "saescope.core.sae.topk": {"saescope.core.models.hooks"},
             "saescope.apps.rl.grpo": {"saescope.api.behaviour", "saescope.core.errors", "saescope.apps.rl.tasks"}}
    assert violations(graph) == [
        "saescope.api.store imports the CLI (saescope.cli.flags)",
        "saescope.apps.toxicity.run imports another application (saescope.apps.synthesis.coverage)",
        "saescope.core.io.formats (core) imports saescope.api.scope (api), a higher tier",
        "saescope.core.sae.topk: the SAE maths imports saescope.core.models.hooks",
    ]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}}) is None
