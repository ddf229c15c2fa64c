"""Shared pytest fixtures.

``bench``: the folder of benchmark models and data (``../shared/bench`` next to the
repository, or ``$MPQC_BENCH``); tests that need it skip with a reason when absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

BENCH = Path(os.environ.get("MPQC_BENCH") or Path(__file__).resolve().parents[2] / "shared" / "bench")


def bench_path(name: str) -> Path:
    """Path of a benchmark file; skips the calling test when it is absent."""
    p = BENCH / name
    if not p.exists():
        pytest.skip(f"benchmark file {p} is absent (set MPQC_BENCH to the folder holding it)")
    return p


@pytest.fixture(scope="session")
def bench() -> Path:
    """The benchmark folder (skips the test when it is absent)."""
    if not BENCH.is_dir():
        pytest.skip(f"benchmark folder {BENCH} is absent (set MPQC_BENCH to the folder holding it)")
    return BENCH


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets an empty result cache of its own: the CLI's default cache folder
    ($MPQC_CACHE_DIR) never leaks results between tests or into the user's ~/.cache; and the CLI
    runs serially ($MPQC_JOBS=1) unless a test asks for workers."""
    monkeypatch.setenv("MPQC_CACHE_DIR", str(tmp_path_factory.mktemp("mpqc-cache")))
    # the CLI's default --jobs is the number of cores; the suite already runs one test per core, and
    # the tests of --jobs ask for workers explicitly
    monkeypatch.setenv("MPQC_JOBS", "1")
