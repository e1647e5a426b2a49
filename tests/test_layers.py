"""The package's layering, checked on its import graph (issue 19).

The graph is built with ``ast`` from every module under ``photowatch/``:
every ``import photowatch.x`` / ``from photowatch.x import y`` /
relative import, at module level or inside a function, is an edge.

Rules:
- no import cycles between modules;
- ``stages/`` and ``calib/`` import only ``core/`` (and the package's
  ``__version__``) and each other: I/O and state belong to their callers;
- nothing outside ``run/`` and ``cli.py`` imports ``run/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import photowatch

PACKAGE = Path(photowatch.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The module a dotted import name lands in (``a.b.func`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its body)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    root = ".".join(base + ([node.module] if node.module else []))
                else:
                    root = node.module or ""
                names = [f"{root}.{a.name}" for a in node.names] + [root]
            for name in names:
                if name == "photowatch" or name.startswith("photowatch."):
                    target = _resolve(name, modules)
                    if target and target != mod:
                        edges.add(target)
        # ``from photowatch.x import y`` gives an edge to photowatch.x and, when y
        # is a submodule, to photowatch.x.y: both are real dependencies.
        graph[mod] = edges
    return graph


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_the_package():
    graph = import_graph()
    # A sanity check that the walker finds edges at all (a test that
    # cannot fail is a defect): the chain imports its stages.
    assert "photowatch.stages.chain" in graph
    assert any(t.startswith("photowatch.stages.") for t in graph["photowatch.stages.chain"])
    assert "photowatch.core.frame" in graph["photowatch.stages.sources"]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_and_calib_import_only_core_and_each_other():
    bad = []
    for mod, targets in import_graph().items():
        if _layer(mod) not in ("stages", "calib"):
            continue
        for t in sorted(targets):
            if t == "photowatch":  # photowatch.__version__
                continue
            if _layer(t) not in ("core", "stages", "calib"):
                bad.append(f"{mod} -> {t}")
    assert bad == []


def test_only_run_and_cli_import_run():
    bad = []
    for mod, targets in import_graph().items():
        if _layer(mod) == "run" or mod == "photowatch.cli":
            continue
        for t in sorted(targets):
            if _layer(t) == "run":
                bad.append(f"{mod} -> {t}")
    assert bad == []
