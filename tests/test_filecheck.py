"""The FileCheck tests of tests/filecheck/ (one .mir file per pass), run by lit from pytest.

Each ``.mir`` file holds ``// RUN:`` lines (``mpqc opt %s --passes ... | filecheck %s``) and
``// CHECK:`` lines; see docs/TESTING_PASSES.md. One pytest test per file, so a failure names the
file and shows lit's output (the failing RUN line and FileCheck's diagnostic)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parent / "filecheck"
FILES = sorted(FOLDER.glob("*.mir"))


def _lit() -> list[str]:
    pytest.importorskip("lit", reason="lit is not installed (pip install -e '.[test]')")
    exe = Path(sys.executable).with_name("filecheck")
    if not exe.exists():
        pytest.importorskip("filecheck", reason="filecheck is not installed (pip install -e '.[test]')")
    return [sys.executable, "-c", "import sys; from lit.main import main; sys.exit(main())"]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_filecheck(path: Path):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    res = subprocess.run(_lit() + ["-v", "-j", "1", str(path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, f"lit failed on {path.name}:\n{res.stdout[-6000:]}\n{res.stderr[-2000:]}"
    assert "Passed: 1" in res.stdout or "1 Passed" in res.stdout or "PASS:" in res.stdout, res.stdout


def test_every_pass_has_a_filecheck_file():
    from mpqc.compiler.pipelines import get_all_passes
    missing = sorted(set(get_all_passes()) - {p.stem for p in FILES})
    assert not missing, f"passes without a tests/filecheck/<pass>.mir file: {missing}"
