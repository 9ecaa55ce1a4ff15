"""The package's shape: layers import one way, nothing imports in a circle, and the public API resolves.

The walk reads every module's source (function-level and ``TYPE_CHECKING`` imports included: a lazy import is
still a dependency), so it needs no import of the package and catches what a runtime graph would hide.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import microstructure

PACKAGE = Path(microstructure.__file__).resolve().parent
# Lowest first. A module may import its own package or a lower one, never a higher one. The installed extras
# (transforms: the SQL, data only; feature_repo: Feast's catalogue, which reads the contract; flows: Prefect, which
# orchestrates jobs and is started by the CLI's `run --prefect`) take their place in the same order.
LAYERS = ["transforms", "contract", "feature_repo", "sources", "recorded", "lake", "features", "checks", "store",
          "jobs", "trading", "research", "flows", "cli"]
TOP = len(LAYERS)  # microstructure/__init__.py (the public API) and __main__ sit above everything


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package, by dotted name (the installed extras under their installed names)."""
    found = {}
    repo = root.parent
    trees = [(root, "microstructure")]
    for extra in ("transforms", "feature_repo", "flows"):
        where = root / extra if (root / extra).is_dir() else repo / extra
        if where.is_dir():
            trees.append((where, f"microstructure.{extra}"))
    for base, prefix in trees:
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("").parts
            if prefix == "microstructure" and rel[0] in ("transforms", "feature_repo", "flows"):
                continue
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            found[".".join((prefix, *parts))] = f
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*parent, *([base] if base else [])])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            # importlib.import_module("microstructure.x") and package_dir("microstructure.x") import by name
            arg = node.args[0].value
            if isinstance(arg, str) and arg.startswith("microstructure."):
                targets = [arg]
        for t in targets:
            # `from microstructure.lake import paths` names a module; `from x import y` a name in x
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP
    return LAYERS.index(parts[1])


def problems(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports and circles in a module graph."""
    found = [f"{a} (layer {rank(a)}) imports {b} (layer {rank(b)}, higher)"
             for a, deps in sorted(graph.items()) for b in sorted(deps) if rank(b) > rank(a) and rank(a) != TOP]
    state: dict[str, int] = {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                found.append("circle: " + " -> ".join([*stack[stack.index(v):], v]))
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    return found


def package_graph() -> dict[str, set[str]]:
    mods = modules(PACKAGE)
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_belongs_to_a_layer():
    for m in package_graph():
        parts = m.split(".")
        assert len(parts) == 1 or parts[1] in (*LAYERS, "__main__"), f"{m} is in no layer"


def test_layers_import_one_way_and_nothing_imports_in_a_circle():
    assert problems(package_graph()) == []


def test_the_walk_sees_lazy_imports():
    # cli.main imports the scrubber inside main(): a walk of top-level imports only would miss it.
    graph = package_graph()
    assert "microstructure.sources.secrets" in graph["microstructure.cli.main"]
    assert "microstructure.jobs.runner" in graph["microstructure.flows.pipeline"]
    # ...and imports by name: the SQL package is located through importlib
    assert "microstructure.transforms" in graph["microstructure.contract.schemas"]


def test_the_check_reports_an_upward_import_and_a_circle(tmp_path):
    pkg = tmp_path / "microstructure"
    for d in ("contract", "lake", "cli"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "contract" / "a.py").write_text("def f():\n    from microstructure.lake import b\n")
    (pkg / "lake" / "b.py").write_text("from microstructure.contract.a import f\n")
    (pkg / "cli" / "c.py").write_text("from microstructure.lake.b import f\n")
    mods = modules(pkg)
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    found = problems(graph)
    assert "microstructure.contract.a (layer 1) imports microstructure.lake.b (layer 5, higher)" in found
    assert any(p.startswith("circle: ") and "microstructure.lake.b" in p for p in found)
    assert not any("cli.c" in p for p in found)  # a higher layer importing a lower one is the rule


def test_public_api_resolves_to_its_layers():
    assert sorted(microstructure.__all__) == sorted(microstructure._API)
    for name, where in microstructure._API.items():
        obj = getattr(microstructure, name)
        assert obj is getattr(importlib.import_module(where), name)
