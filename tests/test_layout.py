"""The layout's rules, checked on the source: no import circle anywhere in batchcls/ or train/, and imports
point down the data path (the runtime never imports training or an engine builder; backends sit below the
pipeline). Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import
still ties two modules together.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("batchcls", "train")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports (``from pkg import mod`` counts as pkg.mod when that is a module)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import batchcls.x.y` of a non-module attribute: the nearest module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_batchcls_or_train():
    g = graph()
    assert len(g) > 40 and "batchcls.backends.onnxruntime" in g["batchcls.backends"]
    assert cycles(g) == []


@pytest.mark.parametrize("low, high", [
    ("batchcls", "train"),  # the runtime never imports training
    ("batchcls.backends", "batchcls.builders"),  # running a model never imports a builder
    ("batchcls.backends", "batchcls.pipeline"),  # backends sit below the stages that call them
    ("batchcls.backends", "batchcls.infer"),
    ("batchcls.backends", "batchcls.decode_stage"),
    ("batchcls.decode_stage", "batchcls.infer"),  # decode comes before infer on the data path
    ("batchcls.decode_stage", "batchcls.pipeline"),
    ("batchcls.infer", "batchcls.pipeline"),
    ("batchcls.gpu", "batchcls.pipeline"),
])
def test_imports_point_down(low, high):
    g = graph()
    wrong = sorted(f"{m} -> {t}" for m, ts in g.items() if m == low or m.startswith(low + ".")
                   for t in ts if t == high or t.startswith(high + "."))
    assert wrong == []


def test_no_module_needs_a_400_line_class():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 >= 400:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
