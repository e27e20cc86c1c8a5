"""The bench package's imports go one way: layers import the harness, the harness imports
no layer (it loads them by name), and no module of the package is in an import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pvio.bench
from pvio.bench.harness.registry import LAYERS

ROOT = Path(pvio.bench.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every pvio.bench module `path` imports, at any depth of its code (a function-level
    import is a cycle waiting to happen too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        out |= {t for t in targets if t.startswith("pvio.bench")}
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {t for t in _imports(path, name) if t in modules and t != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_bench_package() -> None:
    graph = import_graph()
    assert "pvio.bench.harness.runner" in graph and "pvio.bench.blk" in graph
    assert cycles(graph) == []
    # The check can fail: a cycle is found when there is one.
    assert cycles({**graph, "pvio.bench.harness.figures": {"pvio.bench.harness.runner"}})


def test_the_harness_imports_no_layer() -> None:
    layers = {layer.module for layer in LAYERS.values()} | {"pvio.cli.bench"}
    for name, imported in import_graph().items():
        if name.startswith("pvio.bench.harness"):
            assert not imported & layers, f"{name} imports {imported & layers}"
