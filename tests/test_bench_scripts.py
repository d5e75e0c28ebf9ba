"""The bench scripts need the real models and minutes, so the fast tier never runs them; these checks catch the
rot a refactor leaves in them: every name a script takes from ``post`` (imported, or read off an imported
module) still exists, and every script still parses its command line."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def _resolve(module: str, name: str) -> object | None:
    """``module.name``: an attribute, or a submodule of that name; None if neither exists."""
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return getattr(mod, name)
    try:
        return importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        return None


def missing_post_names(source: str) -> list[str]:
    """The ``post`` names ``source`` uses that do not exist: ``from post.x import y`` (anywhere, functions
    included) and ``alias.attr`` where ``alias`` is a ``post`` module it imported."""
    tree = ast.parse(source)
    modules: dict[str, types.ModuleType] = {}
    missing: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "post":
            for alias in node.names:
                got = _resolve(node.module, alias.name)
                if got is None:
                    missing.append(f"{node.module}.{alias.name}")
                elif isinstance(got, types.ModuleType):
                    modules[alias.asname or alias.name] = got
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "post":
                    mod = importlib.import_module(alias.name)
                    if alias.asname:
                        modules[alias.asname] = mod
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            mod = modules[node.value.id]
            if not hasattr(mod, node.attr) and not _resolve(mod.__name__, node.attr):
                missing.append(f"{mod.__name__}.{node.attr}")
    return missing


def test_the_check_finds_a_missing_name():
    assert missing_post_names("from post.cost import distill_parts, no_such_function") == [
        "post.cost.no_such_function"]
    assert missing_post_names("def f():\n    from post import cost\n    return cost.nonesuch(cost.calibrate)") == [
        "post.cost.nonesuch"]
    assert missing_post_names("import post.stats as st\nst.mcnemar_exact\nst.gone") == ["post.stats.gone"]


def test_an_unknown_post_module_fails():
    with pytest.raises(ModuleNotFoundError):
        missing_post_names("from post.nonesuch_module import x")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_post_name_a_bench_script_uses_exists(script):
    assert missing_post_names(script.read_text()) == []


def test_every_bench_script_parses_its_command_line():
    assert len(SCRIPTS) >= 10
    code = ("import runpy, sys\n"
            "for path in sys.argv[1:]:\n"
            "    sys.argv = [path, '--help']\n"
            "    try:\n"
            "        runpy.run_path(path, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (path, e.code)\n"
            "    else:\n"
            "        raise AssertionError(f'{path} --help did not exit')\n")
    done = subprocess.run([sys.executable, "-c", code, *map(str, SCRIPTS)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("usage:") == len(SCRIPTS)
