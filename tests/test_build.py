"""examples/build/ built for real with make, plain ninja and CMake + Ninja, using mpqc's depfiles.

Each build runs in a copy of examples/ under tmp_path, with an ``mpqc`` on PATH that runs this
interpreter's ``-m mpqc`` and logs each call. Checks: the first build compiles both models, an
immediate second build compiles nothing, touching one model's (staged) data file recompiles only
that model (a dependency the build learns from the depfile only), and touching the shared ONNX
model recompiles both.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MODELS = ("digits_npu8.onnx", "digits_npu4.onnx")


def _need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"'{t}' is not installed (on PATH); the build test of examples/build/ needs it")


@pytest.fixture
def work(tmp_path) -> Path:
    """A copy of examples/ and a logging ``mpqc`` wrapper in tmp_path/bin."""
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("out", "build-*"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "mpqc"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{tmp_path / "log"}"\n'
                       f'exec "{sys.executable}" -m mpqc "$@"\n')
    wrapper.chmod(0o755)
    return tmp_path


def _env(work: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{work / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def _build(work: Path, cmd: list[str], cwd: Path) -> list[str]:
    """Run one build; return the models mpqc compiled (by the -o argument's file name)."""
    log = work / "log"
    log.write_text("")
    res = subprocess.run(cmd, cwd=cwd, env=_env(work), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (cmd, res.stdout, res.stderr)
    compiled = []
    for line in log.read_text().splitlines():
        args = line.split()
        compiled.append(Path(args[args.index("-o") + 1]).name)
    return sorted(compiled)


def _touch(p: Path) -> None:
    time.sleep(0.05)  # a later mtime than the outputs just written, at any timestamp resolution
    now = time.time() + 1
    os.utime(p, (now, now))


def _check(work: Path, build, out: Path) -> None:
    """The three builds and a touch of the shared model, ``build()`` running the tool."""
    assert build() == sorted(MODELS)
    for m in MODELS:
        assert (out / m).is_file()
        dep = (out / f"{m}.d").read_text()
        assert dep.split(":", 1)[0].strip().endswith(m) and "digits_resnet.onnx" in dep
    assert build() == []
    _touch(out / "data_npu4.npz")
    assert build() == ["digits_npu4.onnx"]
    assert build() == []
    _touch(work / "examples" / "digits_resnet.onnx")
    assert build() == sorted(MODELS)


def test_make(work):
    _need("make")
    d = work / "examples" / "build"
    _check(work, lambda: _build(work, ["make", "--no-print-directory"], d), d / "out")


def test_ninja(work):
    _need("ninja")
    d = work / "examples" / "build"
    out = d / "out"
    build = lambda: _build(work, ["ninja"], d)  # noqa: E731
    assert build() == sorted(MODELS)
    for m in MODELS:  # deps = gcc: ninja moved each depfile into .ninja_deps
        assert (out / m).is_file() and not (out / f"{m}.d").exists()
    deps = subprocess.run(["ninja", "-t", "deps"], cwd=d, capture_output=True, text=True).stdout
    assert "out/data_npu4.npz" in deps and "out/data_npu8.npz" in deps
    assert build() == []
    _touch(out / "data_npu4.npz")
    assert build() == ["digits_npu4.onnx"]
    assert build() == []
    _touch(work / "examples" / "digits_resnet.onnx")
    assert build() == sorted(MODELS)


def test_cmake_ninja(work):
    _need("cmake", "ninja")
    src, b = work / "examples" / "build", work / "cmake-build"
    res = subprocess.run(["cmake", "-S", str(src), "-B", str(b), "-G", "Ninja"], env=_env(work),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    _check(work, lambda: _build(work, ["cmake", "--build", str(b)], b), b)
