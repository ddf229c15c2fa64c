"""The content-addressed result cache (``--cache-dir``, ``--no-cache``, ``--cache-size``).

A second identical compile should not run calibration, influence sweeps and search
evaluations again; a compile that changes only ``--max-drop`` should reuse the
calibration statistics and the influence sweeps. Each expensive result is stored
under the SHA-256 of exactly what it depends on:

* the graph it is computed on (``graph_digest``: the textual IR of the graph, with
  every decision on it -- formats, bit widths, pruning records -- plus the bytes of
  every constant), not the model file, so the same network reached by another path
  is the same entry;
* the data (``ResultCache.data_digest``: the bytes, dtype and shape of the arrays
  and labels), the batch size, the target, the metric and the result's own
  parameters;
* mpqc itself: its version and a digest of its source files, so an upgraded (or an
  edited development) mpqc never reads results of another code.

What is cached: activation statistics (calibration), the layer input means of bias
correction, the float network's outputs on a split, influence sweeps
(``InfluenceResult``), the evaluation value of every network a search scores, and
the final accuracy measurement. A hit replays the result exactly (arrays
bit for bit, floats through ``repr``), so outputs are byte-identical with or without
the cache.

Safety. An entry is one ``.npz`` file (no pickle: ``allow_pickle=False``) holding its
arrays and a JSON header that repeats the full key and a SHA-256 of the arrays. It is
written to a temporary file in the same folder and renamed into place, so a process
killed mid-write leaves at most a stray ``.tmp-*`` file (removed by ``trim``) and
readers see the old entry or the new one, never half of one. Concurrent compiles
sharing the folder may compute the same entry twice; both write the same bytes. An
entry that cannot be read, whose header names another key (a foreign file) or whose
arrays do not match their digest is ignored, deleted and recomputed, never trusted.
The folder is bounded: after each compile the least recently used entries are
removed until it holds at most ``max_bytes``.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from importlib import util as import_util
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.errors import OptionError
from ..core.ir import Graph
from ..core.textir import print_graph

log = logging.getLogger(__name__)

#: bump when the layout of entries changes
FORMAT = 1
DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB
_META = "__meta__"
#: a temporary file older than this (seconds) belongs to a process that died
STALE_TMP_SECONDS = 3600


def default_cache_dir() -> Path:
    """``$MPQC_CACHE_DIR``, else ``$XDG_CACHE_HOME/mpqc``, else ``~/.cache/mpqc``."""
    env = os.environ.get("MPQC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpqc"


def parse_size(text: str, option: str = "--cache-size") -> int:
    """``"500M"``, ``"2G"``, ``"1048576"`` (bytes; K/M/G/T are powers of 1024) into bytes."""
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if s and s[-1] in "KMGT":
        mult = 1 << (10 * ("KMGT".index(s[-1]) + 1))
        s = s[:-1]
    try:
        v = float(s)
    except ValueError:
        raise OptionError(f"{option} {text!r} is not a size; give bytes or a number with K, M or G (e.g. 2G)") \
            from None
    if not np.isfinite(v) or v < 0:
        raise OptionError(f"{option} {text!r} must be a size of at least 0 bytes")
    return int(v * mult)


# ---------------------------------------------------------------------------- digests
def _sha() -> "hashlib._Hash":
    return hashlib.sha256()


def array_digest(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(a)
    h = _sha()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def graph_digest(graph: Graph, *, decisions: bool = True) -> str:
    """SHA-256 of everything a computation on ``graph`` can depend on: its textual IR (ops,
    attributes, shapes, formats, bit widths, pruning records, metadata) and the bytes of every
    constant and array attribute (the text only names large constants by a checksum).
    ``decisions=False``: without the quantization decisions, for results of the float network."""
    h = _sha()
    h.update(print_graph(graph, elide_above=0, decisions=decisions).encode())
    for v in graph.values():
        if v.is_const:
            h.update(v.name.encode() + b"\0")
            h.update(array_digest(v.const).encode())
    for n in graph.nodes:
        for k, a in n.attrs.items():
            if isinstance(a, np.ndarray):
                h.update(f"{n.name}.{k}".encode() + b"\0")
                h.update(array_digest(a).encode())
    return h.hexdigest()


_CODE: str | None = None


def code_digest() -> str:
    """mpqc's version and a SHA-256 of its source files (the packages' ``.py`` files, read without
    importing them), computed once per process."""
    global _CODE
    if _CODE is None:
        h = _sha()
        try:
            h.update(dist_version("mpqc").encode())
        except Exception:  # pragma: no cover - not installed as a distribution
            h.update(b"unknown")
        for pkg in ("mpqc", "mpqc.core", "mpqc.compiler", "mpqc.passes", "mpqc.runtime"):
            spec = import_util.find_spec(pkg)
            for d in (spec.submodule_search_locations or []) if spec else []:
                for f in sorted(Path(d).glob("*.py")):
                    h.update(f"{pkg}/{f.name}".encode() + b"\0")
                    h.update(f.read_bytes())
        _CODE = h.hexdigest()
    return _CODE


def _canon(key: Any) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    if hasattr(o, "to_json"):
        return o.to_json()
    raise TypeError(f"cache key part of type {type(o).__name__} cannot be written")


def _payload_digest(arrays: dict[str, np.ndarray]) -> str:
    h = _sha()
    for k in sorted(arrays):
        h.update(k.encode() + b"\0")
        h.update(array_digest(arrays[k]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- the cache
class ResultCache:
    """A folder of cached results (see the module docstring). ``get``/``put`` by (kind, key);
    ``memo`` computes on a miss; ``stats`` counts hits, misses and rejected entries per kind;
    ``trim`` bounds the folder to ``max_bytes``."""

    def __init__(self, root: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.stats: dict[str, dict[str, int]] = {}
        self.disabled_reason: str | None = None
        self._data: dict[int, tuple[Any, str]] = {}
        self._writes = 0

    # ---- keys
    def data_digest(self, data) -> str:
        """Digest of a Dataset (its ``x`` and ``y``) or an array; computed once per object."""
        ent = self._data.get(id(data))
        if ent is not None and ent[0] is data:
            return ent[1]
        if hasattr(data, "x"):
            y = getattr(data, "y", None)
            d = _sha()
            d.update(array_digest(np.asarray(data.x)).encode())
            d.update(b"none" if y is None else array_digest(np.asarray(y)).encode())
            dig = d.hexdigest()
        else:
            dig = array_digest(np.asarray(data))
        self._data[id(data)] = (data, dig)  # holds the object: its id is not reused
        return dig

    def _path(self, kind: str, key: Any) -> tuple[Path, str]:
        text = _canon({"format": FORMAT, "code": code_digest(), "kind": kind, "key": key})
        h = hashlib.sha256(text.encode()).hexdigest()
        return self.root / f"v{FORMAT}" / kind / h[:2] / f"{h}.npz", text

    def _count(self, kind: str, what: str) -> None:
        s = self.stats.setdefault(kind, {"hits": 0, "misses": 0, "rejected": 0})
        s[what] += 1

    # ---- reading and writing
    def get(self, kind: str, key: Any) -> tuple[dict, dict[str, np.ndarray]] | None:
        """(meta, arrays) of the entry, or None (counted as a miss). A damaged or foreign entry is
        deleted and reported as a miss."""
        if self.disabled_reason is not None:
            self._count(kind, "misses")
            return None
        path, text = self._path(kind, key)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            self._count(kind, "misses")
            return None
        except Exception as e:  # damaged: unreadable zip, bad header, object arrays ...
            return self._reject(kind, path, f"unreadable ({type(e).__name__})")
        try:
            head = json.loads(bytes(arrays.pop(_META)).decode())
        except Exception:
            return self._reject(kind, path, "no valid header")
        if not isinstance(head, dict) or head.get("key") != text:
            return self._reject(kind, path, "its header names another key (a foreign entry)")
        if head.get("payload") != _payload_digest(arrays):
            return self._reject(kind, path, "its arrays do not match their digest")
        try:
            os.utime(path)  # least recently used goes first
        except OSError:
            pass
        self._count(kind, "hits")
        return head.get("meta") or {}, arrays

    def _reject(self, kind: str, path: Path, why: str):
        log.warning("cache entry %s ignored and recomputed: %s", path, why)
        self._count(kind, "rejected")
        self._count(kind, "misses")
        try:
            path.unlink()
        except OSError:
            pass
        return None

    def put(self, kind: str, key: Any, meta: dict | None = None, arrays: dict[str, np.ndarray] | None = None
            ) -> None:
        """Store an entry (atomically: a temporary file in the entry's folder, then a rename). A
        cache folder that cannot be written disables the cache for this run with one warning."""
        if self.disabled_reason is not None:
            return
        path, text = self._path(kind, key)
        arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
        if _META in arrays or any(v.dtype.hasobject for v in arrays.values()):
            raise ValueError("cache arrays must be plain numeric arrays not named __meta__")
        head = {"key": text, "kind": kind, "payload": _payload_digest(arrays), "meta": meta or {}}
        buf = io.BytesIO()
        body = dict(arrays)
        body[_META] = np.frombuffer(json.dumps(head, default=_json_default).encode(), np.uint8)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # np.savez's layout, fixed timestamps
            for k in sorted(body):
                info = zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, body[k], allow_pickle=False)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, path)
            tmp = None
            self._writes += 1
        except OSError as e:
            self.disabled_reason = f"cannot write {path.parent}: {e.strerror or e}"
            log.warning("result cache disabled for this run: %s (use --cache-dir DIR or --no-cache)",
                        self.disabled_reason)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def memo(self, kind: str, key: Any, compute: Callable[[], Any],
             encode: Callable[[Any], tuple[dict, dict[str, np.ndarray]]],
             decode: Callable[[dict, dict[str, np.ndarray]], Any]) -> Any:
        """The cached result of ``compute()``; ``encode(result) -> (meta, arrays)`` and its inverse
        ``decode``. A hit whose decoding fails is recomputed."""
        hit = self.get(kind, key)
        if hit is not None:
            try:
                return decode(*hit)
            except Exception as e:  # an entry of the right key that does not fit: never trusted
                log.warning("cache entry of %s does not decode (%s); recomputed", kind, e)
                self._count(kind, "rejected")
        result = compute()
        meta, arrays = encode(result)
        self.put(kind, key, meta, arrays)
        return result

    def memo_json(self, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
        """``memo`` for a JSON-ready result (numbers, strings, lists, dicts)."""
        return self.memo(kind, key, compute, lambda r: ({"value": r}, {}), lambda m, a: m["value"])

    # ---- size bound
    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry file."""
        out = []
        base = self.root / f"v{FORMAT}"
        if not base.is_dir():
            return out
        for dirpath, _, files in os.walk(base):
            for f in files:
                p = Path(dirpath) / f
                try:
                    st = p.stat()
                except OSError:
                    continue
                if f.startswith(".tmp-"):
                    if time.time() - st.st_mtime > STALE_TMP_SECONDS:
                        try:
                            p.unlink()
                        except OSError:
                            pass
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return out

    def trim(self) -> int:
        """Remove least recently used entries until the folder holds at most ``max_bytes``; returns
        how many were removed."""
        ents = self.entries()
        total = sum(s for _, s, _ in ents)
        removed = 0
        for _, size, p in sorted(ents):
            if total <= self.max_bytes:
                break
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
            total -= size
        return removed

    def summary(self) -> dict:
        """What came from the cache in this run: per kind, hits / misses / rejected entries."""
        out = {"dir": str(self.root), "kinds": {k: dict(v) for k, v in sorted(self.stats.items())},
               "hits": sum(v["hits"] for v in self.stats.values()),
               "misses": sum(v["misses"] for v in self.stats.values()),
               "written": self._writes}
        if self.disabled_reason:
            out["disabled"] = self.disabled_reason
        return out


def open_cache(cache: "ResultCache | str | os.PathLike | bool | None", max_bytes: int | None = None
               ) -> ResultCache | None:
    """``compile_model``'s ``cache=``: a ResultCache, a folder, True (the default folder) or
    None/False (no cache)."""
    if cache is None or cache is False:
        return None
    if isinstance(cache, ResultCache):
        return cache
    root = default_cache_dir() if cache is True else Path(cache)
    if root.exists() and not root.is_dir():
        raise OptionError(f"--cache-dir {str(root)!r} is a file, not a folder; give a folder or --no-cache")
    return ResultCache(root, max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)


def hash_json(obj: Any) -> str:
    """SHA-256 of a JSON-ready object in its canonical form (sorted keys)."""
    return hashlib.sha256(_canon(obj).encode()).hexdigest()
