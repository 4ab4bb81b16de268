"""The packages' imports point one way (deploy -> models -> lakehouse | streams -> features) and no
module reaches itself through others, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("features", "streams", "lakehouse", "models", "deploy")
# What each package may import besides itself.
ALLOWED = {
    "features": set(),
    "streams": {"features"},
    "lakehouse": {"features"},
    "models": {"features", "streams", "lakehouse"},
    "deploy": {"features", "streams", "lakehouse", "models"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The eddy modules a file imports anywhere in it (top level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def graph() -> dict[str, set[str]]:
    """module -> the eddy modules it imports (a name that is an attribute, not a module, resolves to
    its module)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    out = {}
    for name, path in files.items():
        targets = set()
        for imported in imports_of(path):
            while imported not in files and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in files and imported != name:
                targets.add(imported)
        out[name] = targets
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_import_points_down_the_layers():
    upward = [f"{src} imports {dst}" for src, targets in graph().items() for dst in sorted(targets)
              if dst.split(".")[0] != src.split(".")[0]
              and dst.split(".")[0] not in ALLOWED[src.split(".")[0]]]
    assert upward == []


def test_no_module_imports_itself_through_others():
    assert cycles(graph()) == []


def test_the_checks_see_an_upward_import_and_a_circle():
    edges = {"features.a": {"streams.b"}, "streams.b": {"streams.c"}, "streams.c": {"streams.b"}}
    assert cycles(edges) == [["streams.b", "streams.c"]]
    assert "streams" not in ALLOWED["features"]
    assert graph()["deploy.cli"]  # the real graph is read (the CLI imports eddy's modules)
