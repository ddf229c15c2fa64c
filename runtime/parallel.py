"""Batches in worker processes (``--jobs N``): the same per-batch work, split over processes.

``map_batches(fn, slices, jobs=N)`` returns ``[fn(s) for s in slices]`` in order. With
``jobs > 1`` (and more than one slice) it forks ``min(jobs, len(slices))`` workers that
inherit the caller's state (graph, formats, data: nothing is pickled but the slices and the
results), each limited to one BLAS thread so that N workers use N cores. Every batch is
computed exactly as the serial loop computes it, so the results are identical for any N.
Where ``fork`` does not exist the work runs serially.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any, Callable, Sequence

from threadpoolctl import threadpool_limits

from ..core.progress import progress_iter

_FN: Callable[[Any], Any] | None = None


def default_jobs() -> int:
    """The number of cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _init() -> None:
    threadpool_limits(1)


def _call(item):
    return _FN(item)


def map_batches(fn: Callable[[Any], Any], items: Sequence, *, jobs: int = 1, progress: str | None = None) -> list:
    """``[fn(i) for i in items]`` in order, in ``jobs`` forked worker processes when that can help."""
    global _FN
    items = list(items)
    if jobs <= 1 or len(items) < 2 or "fork" not in mp.get_all_start_methods() or _FN is not None:
        return [fn(i) for i in progress_iter(items, desc=progress)]  # (_FN set: already inside a map)
    _FN = fn
    try:
        with mp.get_context("fork").Pool(min(jobs, len(items)), initializer=_init) as pool:
            return list(progress_iter(pool.imap(_call, items), desc=progress, total=len(items)))
    finally:
        _FN = None
