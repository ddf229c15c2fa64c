"""Data files: ``FILE.npz:SPLIT`` selects ``x_SPLIT`` (and ``y_SPLIT`` when present).

Arrays are checked against the model input (rank, static dims, numeric dtype,
finite values) and cast to the input's dtype. Every problem is a one-line
``DataError`` naming the file, the array and what to do.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
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


_MAGIC_HINTS = ((b"\x1f\x8b", "gzip-compressed data"), (b"\x80", "a Python pickle"),
                (b"\x93NUMPY", "a single .npy array"), (b"BZh", "bzip2-compressed data"),
                (b"\xfd7zXZ", "xz-compressed data"), (b"\x08", "a protobuf (an ONNX model?)"))


def _sniff(path: str, p: Path, option: str) -> None:
    """Refuse what is not a zip archive, saying what the file looks like instead."""
    if p.is_dir():
        raise DataError(f"{option}: data path {path!r} is a directory, expected an .npz file")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DataError(f"{option}: cannot read data file {path!r}: {e.strerror or e}") from None
    if not head:
        raise DataError(f"{option}: data file {path!r} is empty (0 bytes), expected an .npz archive "
                        f"(numpy.savez) with x_SPLIT arrays")
    if head.startswith(b"\x93NUMPY"):
        return  # reported as a single array below
    if not head.startswith(b"PK"):
        looks = next((what for magic, what in _MAGIC_HINTS if head.startswith(magic)), None)
        if looks is None:
            looks = "text" if all(32 <= c < 127 or c in (9, 10, 13) for c in head) else "some other format"
        raise DataError(f"{option}: {path!r} is not a readable .npz file: it is not an .npz archive (it looks "
                        f"like {looks}); give a file "
                        f"written by numpy.savez with x_SPLIT (and y_SPLIT) arrays")


def _read_member(zf: zipfile.ZipFile, key: str, path: str, option: str) -> np.ndarray:
    """One array of an npz, its header checked against the bytes the member holds before reading."""
    member = f"{key}.npy"
    info = zf.getinfo(member)
    where = f"{option}: {path!r} array {key!r}"
    try:
        with zf.open(info) as f:
            try:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
            except Exception as e:  # ValueError, EOFError, SyntaxError, tokenize.TokenError ...
                raise DataError(f"{where} is not a valid .npy array ({str(e).splitlines()[0][:100]})",
                                hint="the file is damaged or was not written by numpy") from None
            if dtype.hasobject:
                raise DataError(f"{option}: cannot read {key!r} from {path!r}: it holds Python objects (dtype {dtype}); mpqc reads numeric arrays only "
                                f"and never unpickles data")
            if dtype.kind not in "biuf":
                raise DataError(f"{where} has dtype {dtype}, expected a numeric array (float or integer)")
            n = int(np.prod(shape, dtype=np.float64)) if shape else 1
            need = n * dtype.itemsize
            header = f.tell()
            if header + need > info.file_size:
                raise DataError(f"{where}: its header claims shape {list(shape)} ({need:,} bytes) but the member "
                                f"holds {max(0, info.file_size - header):,} bytes",
                                hint="the file is damaged or truncated")
            f.seek(0)
            arr = np.lib.format.read_array(f, allow_pickle=False)
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise DataError(f"{where} is corrupt ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})",
                        hint="the file is damaged; write it again") from None
    except MemoryError:
        raise DataError(f"{where} of shape {list(shape)} does not fit in memory") from None
    return arr


def load_dataset(spec: str, input_value: Value | None = None, *, default_split: str = "eval",
                 option: str = "--data") -> Dataset:
    path, split = parse_spec(spec, default_split)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{option}: data file {path!r} does not exist")
    _sniff(path, p, option)
    if option == "--calib" and input_value is not None and input_value.dtype is not None \
            and np.dtype(input_value.dtype).kind != "f":
        raise DataError(f"{option}: model input {input_value.name!r} has type {np.dtype(input_value.dtype)}; "
                        f"mpqc calibrates and quantizes models with float inputs only",
                        hint="-O0 canonicalizes such a model; quantize a model whose input is float")
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        with open(p, "rb") as f:
            single = f.read(6) == b"\x93NUMPY"
        if single:
            raise DataError(f"{option}: {path!r} is a single array, expected an .npz with x_{split} (and y_{split})")
        raise DataError(f"{option}: {path!r} is not a readable .npz file ({str(e)[:100]})",
                        hint="the file is damaged or truncated") from None
    with zf:
        keys = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        xk, yk = f"x_{split}", f"y_{split}"
        if xk not in keys:
            splits = sorted(k[2:] for k in keys if k.startswith("x_"))
            raise DataError(f"{option}: {path!r} has no array {xk!r} for split {split!r}; "
                            f"splits present: {', '.join(splits) or 'none (keys must be x_SPLIT / y_SPLIT)'}")
        x = _read_member(zf, xk, path, option)
        y = _read_member(zf, yk, path, option) if yk in keys else None
    src = f"{p.name}:{split}"
    x = check_input(x, input_value, f"{option} {src} array {xk!r}")
    if y is not None:
        if y.ndim < 1 or len(y) != len(x):
            raise DataError(f"{option} {src}: {yk!r} has {len(y) if y.ndim else 0} entries but {xk!r} has {len(x)}")
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise DataError(f"{option} {src}: {yk!r} contains NaN or infinite values")
    return Dataset(x, y, src)


def peek_shape(spec: str, default_split: str) -> tuple[tuple[int, ...], str] | None:
    """Shape of ``x_SPLIT`` in a data file and its source (``file.npz:split``), read from the array's
    header without loading it; None when the file cannot say (``load_dataset`` then reports why)."""
    path, split = parse_spec(spec, default_split)
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"x_{split}.npy") as f:
            version = np.lib.format.read_magic(f)
            shape = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                     else np.lib.format.read_array_header_2_0(f))[0]
    except Exception:  # not there, not an npz, damaged: the full read says what is wrong
        return None
    return tuple(int(d) for d in shape), f"{Path(path).name}:{split}"


def model_batch(input_value: Value | None, batch_size: int) -> int:
    """The batch size runs use: the model input's fixed batch when it has one (a model exported
    with batch 1 runs one sample at a time), else ``batch_size``."""
    shp = None if input_value is None else input_value.shape
    if shp and isinstance(shp[0], int) and shp[0] > 0:
        return int(shp[0])
    return batch_size


def check_input(x: np.ndarray, input_value: Value | None, what: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{what} has dtype {x.dtype}, expected a numeric array (float or integer)")
    if x.ndim == 0 or len(x) == 0 or x.size == 0:
        raise DataError(f"{what} is empty (shape {list(x.shape)})")
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
                if i == 0 and isinstance(b, int) and b > 0 and a % b == 0:
                    continue  # a fixed batch: the runs batch at the model's batch size (model_batch)
                if i == 0 and isinstance(b, int) and b > 0:
                    raise DataError(f"{what} has {a} samples, but model input {input_value.name!r} has a fixed "
                                    f"batch of {b}: give a multiple of {b} samples")
                if isinstance(b, int) and b > 0 and a != b:
                    raise DataError(f"{what} has shape {list(x.shape)} but model input {input_value.name!r} "
                                    f"expects {list(shp)} (dim {i} is {a}, expected {b})")
        dt = np.dtype(input_value.dtype)
        if dt.kind in "iub" and x.dtype.kind == "f":
            if dt.kind != "b":
                info = np.iinfo(dt)
                if x.min() < info.min or x.max() > info.max:
                    raise DataError(f"{what} holds values outside the range of the model input's type {dt}")
        with np.errstate(all="ignore"):
            xc = x.astype(dt, copy=False)
        if dt.kind == "f" and xc is not x and not np.all(np.isfinite(xc)):
            bad = int(np.count_nonzero(~np.isfinite(xc)))
            raise DataError(f"{what} holds {bad} values that are infinite after conversion to the model "
                            f"input's type {dt} (largest magnitude {float(np.abs(x).max()):.3g})")
        x = xc
    return np.ascontiguousarray(x)


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
