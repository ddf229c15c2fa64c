"""Progress bars: tqdm on a terminal, silent when not a TTY or when quieted."""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def enabled() -> bool:
    return not _QUIET and sys.stderr.isatty() and os.environ.get("MPQC_QUIET", "") == ""


def progress_iter(it: Iterable[T], desc: str | None = None, total: int | None = None) -> Iterable[T]:
    """Wrap ``it`` in a tqdm bar when ``desc`` is given and progress is enabled."""
    if desc is None or not enabled():
        return it
    return tqdm(it, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)
