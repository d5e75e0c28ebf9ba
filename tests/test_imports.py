"""Import structure of the ``post`` package: no import cycles, and :mod:`post.corpus` never imports :mod:`post.data`.

The graph is read from the source with :mod:`ast`, so an import inside a function (the usual way to
hide a cycle) counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Cycles that exist today through function-level imports, each to be removed (then dropped from here).
# post.cli builds the service's subcommands from post.service.cli, which reuses post.cli's parser classes.
KNOWN_CYCLES: list[frozenset[str]] = []


def modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of the ``post`` package by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for p in sorted((src / "post").rglob("*.py")):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def imported_names(name: str, path: Path, *, top_level_only: bool = False) -> set[str]:
    """Dotted names a module imports anywhere in its body (functions and ``if`` blocks included, unless
    ``top_level_only``); ``from a import b`` gives both ``a`` and ``a.b``; relative imports are resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def import_graph(mods: dict[str, Path], *, top_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name is mapped to its longest module prefix)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges = set()
        for imported in imported_names(name, path, top_level_only=top_level_only):
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_corpus_never_imports_data():
    """post.data builds on post.corpus; the reverse import (even inside a function) would be a cycle."""
    names = imported_names("post.corpus", modules()["post.corpus"])
    assert not {n for n in names if n == "post.data" or n.startswith("post.data.")}, sorted(names)
    assert "post.data" not in import_graph(modules())["post.corpus"]


def test_no_new_import_cycle_in_the_package():
    found = set(cycles(import_graph(modules())))
    new = found - set(KNOWN_CYCLES)
    assert not new, f"import cycles: {[sorted(c) for c in new]}; move the shared code into a module both import"
    gone = set(KNOWN_CYCLES) - found
    assert not gone, f"{[sorted(c) for c in gone]} no longer a cycle: remove it from KNOWN_CYCLES"


def test_no_cycle_among_top_level_imports():
    """Even the known cycles go through function-level imports only: the module-level graph has none."""
    assert cycles(import_graph(modules(), top_level_only=True)) == []


@pytest.mark.parametrize("body, expected", [
    pytest.param("from post import data\n", {"post", "post.data"}, id="from-package"),
    pytest.param("def f():\n    from post.data import load_labelled\n", {"post.data"}, id="in-function"),
    pytest.param("def f():\n    import post.data as d\n", {"post.data"}, id="import-as-in-function"),
    pytest.param("from . import data\n", {"post", "post.data"}, id="relative"),
    pytest.param("if True:\n    from .cache import atomic_path\n", {"post.cache"}, id="relative-in-if"),
    pytest.param("import json\n", set(), id="outside-the-package"),
])
def test_the_scan_sees_every_form_of_import(tmp_path, body, expected):
    """The checks above would pass vacuously if the scan missed an import form: a fake post.corpus shows it does not."""
    fake = tmp_path / "post" / "corpus.py"
    fake.parent.mkdir()
    fake.write_text(body, encoding="utf-8")
    assert import_graph({**modules(), "post.corpus": fake})["post.corpus"] == expected


def test_cycles_finds_a_cycle_and_only_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []
