"""The bench scripts stay runnable: each parses, every mpqc name it imports (at module level or
inside a function, where ``--help`` never reaches) exists, and ``--help`` answers."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py"))


def _mpqc_imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mpqc":
            for alias in node.names:
                yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mpqc":
                    yield node.lineno, alias.name, None


def test_there_are_bench_scripts():
    assert {"run_all.py", "bench_o1.py", "bench_o2.py", "bench_jobs.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_parses_and_its_mpqc_imports_exist(path):
    tree = ast.parse(path.read_text(), filename=str(path))  # a SyntaxError/IndentationError fails here
    missing = []
    for line, module, name in _mpqc_imports(tree):
        mod = importlib.import_module(module)
        if name is not None and name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{path.name}:{line}: {module}.{name}")
    assert not missing


@pytest.mark.parametrize("path", [p for p in SCRIPTS if p.name != "common.py"], ids=lambda p: p.name)
def test_bench_script_help(path):
    r = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()
