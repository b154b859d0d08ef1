"""The source tree's shape: lorafit's modules import one another without a circle (also
through imports inside functions), and no function is longer than a screen."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorafit"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for p in SRC.rglob("*.py"):
        name = ("lorafit." + ".".join(p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = ast.parse(p.read_text())
    return out


def _imports(tree: ast.Module, names: set[str]) -> set[str]:
    """The lorafit modules `tree` imports anywhere; `from lorafit import x` counts as lorafit.x
    where x is a module, and as the package itself otherwise."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorafit"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & names
            out |= subs if len(subs) == len(node.names) else subs | {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in names}
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                found.append(sorted([v, *comp]))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    mods = _modules()
    names = set(mods)
    edges = {m: _imports(tree, names) - {m} - ({"lorafit"} if m != "lorafit" else set()) for m, tree in mods.items()}
    # a submodule's `from lorafit import distributed` names a module, not the package's API
    assert _cycles(edges) == []


def test_the_circle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_80_lines():
    long = [f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80]
    assert long == []
