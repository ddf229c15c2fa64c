"""Data files: ``FILE.npz:SPLIT`` selects ``x_SPLIT`` (and ``y_SPLIT`` when present).

Arrays are checked against the model input (rank, static dims, numeric dtype,
finite values) and cast to the input's dtype. Every problem is a one-line
``DataError`` naming the file, the array and what to do.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import DataError
from ..core.ir import Value


@dataclass
class Dataset:
    x: np.ndarray
    y: np.ndarray | None
    source: str  # "file.npz:split"

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, n: int | None) -> "Dataset":
        if n is None or n >= len(self):
            return self
        return Dataset(self.x[:n], None if self.y is None else self.y[:n], f"{self.source}[:{n}]")


def parse_spec(spec: str, default_split: str) -> tuple[str, str]:
    """``"a.npz:calib"`` -> ("a.npz", "calib"); ``"a.npz"`` -> ("a.npz", default_split)."""
    path, sep, split = str(spec).rpartition(":")
    if sep and path and not split:  # "a.npz:" -> the default split
        return path, default_split
    if not sep or not path or "/" in split or split.endswith(".npz"):
        return str(spec), default_split
    return path, split


def load_dataset(spec: str, input_value: Value | None = None, *, default_split: str = "eval",
                 option: str = "--data") -> Dataset:
    path, split = parse_spec(spec, default_split)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{option}: data file {path!r} does not exist")
    try:
        npz = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{option}: {path!r} is not a readable .npz file ({str(e)[:100]})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{option}: {path!r} is a single array, expected an .npz with x_{split} (and y_{split})")
    keys = set(npz.files)
    xk, yk = f"x_{split}", f"y_{split}"
    if xk not in keys:
        splits = sorted(k[2:] for k in keys if k.startswith("x_"))
        raise DataError(f"{option}: {path!r} has no array {xk!r} for split {split!r}; "
                        f"splits present: {', '.join(splits) or 'none (keys must be x_SPLIT / y_SPLIT)'}")
    try:
        x = npz[xk]
        y = npz[yk] if yk in keys else None
    except ValueError as e:
        raise DataError(f"{option}: cannot read {xk!r} from {path!r} ({e})") from None
    src = f"{p.name}:{split}"
    x = check_input(x, input_value, f"{option} {src} array {xk!r}")
    if y is not None:
        if y.ndim < 1 or len(y) != len(x):
            raise DataError(f"{option} {src}: {yk!r} has {len(y) if y.ndim else 0} entries but {xk!r} has {len(x)}")
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise DataError(f"{option} {src}: {yk!r} contains NaN or infinite values")
    return Dataset(x, y, src)


def check_input(x: np.ndarray, input_value: Value | None, what: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{what} has dtype {x.dtype}, expected a numeric array (float or integer)")
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{what} is empty")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise DataError(f"{what} contains {bad} NaN or infinite values; clean the data first")
    if input_value is not None:
        shp = input_value.shape
        if shp is not None:
            if x.ndim != len(shp):
                raise DataError(f"{what} has shape {list(x.shape)} (rank {x.ndim}) but model input "
                                f"{input_value.name!r} expects rank {len(shp)} {list(shp)}")
            for i, (a, b) in enumerate(zip(x.shape, shp)):
                if isinstance(b, int) and b > 0 and a != b:
                    raise DataError(f"{what} has shape {list(x.shape)} but model input {input_value.name!r} "
                                    f"expects {list(shp)} (dim {i} is {a}, expected {b})")
        x = x.astype(input_value.dtype, copy=False)
    return np.ascontiguousarray(x)


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
