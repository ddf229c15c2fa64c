"""IR -> ONNX export through onnx-graphsurgeon, checked with full shape inference.

Files are written atomically (temporary file in the same folder, then rename), so
a failure never leaves a partial model behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper

from ..core.errors import CompilerError
from ..core.ir import Graph, Value
from .frontend import check_model, from_onnx, read_model

PRODUCER = "mpqc"


def to_onnx(graph: Graph, *, check: bool = True, opset: int | None = None) -> onnx.ModelProto:

    tmap: dict[int, object] = {}
    narrowed: dict[str, np.ndarray] = {}  # 4-bit constants, written as int4/uint4 after export

    def conv(v: Value | None):
        if v is None:
            return gs.Variable.empty()
        t = tmap.get(id(v))
        if t is None:
            if v.is_const:
                arr = v.const if v.const.flags.c_contiguous else v.const.copy()
                narrow = _narrow_dtype(v)
                if narrow is not None:
                    narrowed[v.name] = arr.astype(narrow)
                t = gs.Constant(v.name, arr)
            else:
                shape = None if v.shape is None else [d if d is not None else None for d in v.shape]
                t = gs.Variable(v.name, dtype=v.dtype, shape=shape)
            tmap[id(v)] = t
        return t

    inputs = [conv(v) for v in graph.inputs]
    nodes = []
    for n in graph.nodes:
        attrs = {}
        for k, a in n.attrs.items():
            if isinstance(a, np.ndarray):
                a = gs.Constant(f"{n.name}_{k}", a)
            attrs[k] = a
        # intermediate shapes are re-inferred on export: drop them to avoid stale ones
        outs = []
        for v in n.outputs:
            t = conv(v)
            if v not in graph.outputs:
                t.shape = None
                t.dtype = None
            outs.append(t)
        if n.op_type == "Clip" and per_channel_clip(n):
            nodes.extend(_clip_as_max_min(n, conv, outs))
            continue
        nodes.append(gs.Node(n.op_type, n.name, attrs, [conv(v) for v in n.inputs], outs,
                             domain=n.domain or None))
    outputs = [conv(v) for v in graph.outputs]
    ver = opset or graph.opset
    g = gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, name=graph.name, opset=ver)
    model = gs.export_onnx(g, do_type_check=False)
    if narrowed:  # onnx-graphsurgeon 0.6 does not pack int4: replace those initializers
        for i, t in enumerate(model.graph.initializer):
            if t.name in narrowed:
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(narrowed[t.name], t.name))
    model.producer_name = PRODUCER
    model.ir_version = min(model.ir_version, 10)
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", ver))
    for k, v in sorted(graph.metadata.items()):
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    if check:
        try:
            model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise CompilerError(f"exported model fails the ONNX checker: {str(e).splitlines()[0][:300]}",
                                hint="this is an mpqc bug; please report it with the model") from None
    return model


def per_channel_clip(n) -> bool:
    """A Clip whose bounds are per-channel constants (cross-layer equalization through a ReLU6):
    mpqc's IR allows it, ONNX Clip does not (its bounds are scalars)."""
    return any(v is not None and v.is_const and v.const.ndim > 0 for v in n.inputs[1:3])


def _clip_as_max_min(n, conv, outs) -> list:
    """A per-channel Clip written as ``Max(x, min)`` then ``Min(., max)``; ``from_onnx`` reads the
    pair back as one Clip (``frontend.fuse_max_min``)."""
    x = conv(n.inputs[0])
    lo, hi = n.input(1), n.input(2)
    out = []
    if lo is not None and hi is not None:
        mid = gs.Variable(f"{n.outputs[0].name}_lower_bounded")
        out.append(gs.Node("Max", f"{n.name}_max", {}, [x, conv(lo)], [mid]))
        out.append(gs.Node("Min", n.name, {}, [mid, conv(hi)], outs))
    elif lo is not None:
        out.append(gs.Node("Max", n.name, {}, [x, conv(lo)], outs))
    elif hi is not None:
        out.append(gs.Node("Min", n.name, {}, [x, conv(hi)], outs))
    else:
        out.append(gs.Node("Identity", n.name, {}, [x], outs))
    return out


def _narrow_dtype(v: Value):
    """Storage type of a constant in the file: integer constants tagged with a 4-bit ``qformat``
    (4-bit weights after insert-qdq) are stored as ONNX int4/uint4 (None: as they are)."""
    f = v.qformat
    arr = v.const
    if f is None or f.bits != 4 or arr.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        return None
    lo, hi = (-8, 7) if f.signed else (0, 15)
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise CompilerError(f"constant {v.name!r} is tagged 4-bit but holds values outside [{lo}, {hi}]",
                            hint="this is an mpqc bug; please report it with the model")
    return ml_dtypes.int4 if f.signed else ml_dtypes.uint4


def widen_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite int4/uint4 initializers as int8/uint8 (same values; DequantizeLinear gives the same
    result), so mpqc's runtimes, which have no 4-bit type, can import a model with 4-bit weights."""
    wide = {TensorProto.INT4: np.int8, TensorProto.UINT4: np.uint8}
    if not any(t.data_type in wide for t in model.graph.initializer):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i, t in enumerate(model.graph.initializer):
        if t.data_type in wide:
            arr = numpy_helper.to_array(t).astype(wide[t.data_type])
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
    for vi in list(model.graph.value_info):
        if vi.type.tensor_type.elem_type in wide:
            model.graph.value_info.remove(vi)
    return model


def load_qdq_graph(path: str | os.PathLike) -> Graph:
    """``frontend.load_graph`` for models mpqc exported: 4-bit weights are widened first."""
    model = read_model(path)
    origin = Path(path).name
    check_model(model, origin)
    graph = from_onnx(widen_int4(model), origin=origin)
    if not graph.name or graph.name == "graph":
        graph.name = Path(path).stem
    return graph


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    commit_files([(path, data)])


def _missing_dirs(d: Path) -> list[Path]:
    """The folders above (and including) ``d`` that do not exist yet, top-most first."""
    out = []
    while not d.exists() and d != d.parent:
        out.append(d)
        d = d.parent
    return out[::-1]


def _write_error(p: Path, e: BaseException) -> CompilerError:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return CompilerError(f"cannot write {str(p)!r}: {why}",
                         hint="nothing was written; check that its folder is a writable folder")


def commit_files(blobs: list[tuple[str | os.PathLike, bytes]]) -> None:
    """Write every ``(path, data)`` as one transaction: each to a temporary file in its target
    folder, then, only when all were written, rename them into place. On any failure every
    pre-existing file is left as it was, and the new files, temporaries and the folders this
    call created are removed."""
    umask = os.umask(0)
    os.umask(umask)
    created: list[Path] = []  # folders made here, in creation order
    temps: list[tuple[Path, Path]] = []  # (temporary, target)
    backups: list[tuple[Path, Path]] = []  # (backup of a pre-existing target, target)
    placed: list[Path] = []  # targets renamed into place
    current = None
    try:
        for path, data in blobs:
            current = p = Path(path)
            if str(path) == "" or p.is_dir():
                raise IsADirectoryError(21, "is a directory" if str(path) else "empty path")
            for d in _missing_dirs(p.parent):
                d.mkdir()
                created.append(d)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent))
            temps.append((Path(tmp), p))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # mkstemp creates 0600: give the file the permissions a plain open() would
            os.chmod(tmp, 0o666 & ~umask)
        for tmp, p in temps:
            current = p
            if p.exists():
                bfd, bak = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".bak", dir=str(p.parent))
                os.close(bfd)
                try:
                    os.replace(p, bak)
                except BaseException:
                    _quiet_unlink(Path(bak))
                    raise
                backups.append((Path(bak), p))
            os.replace(tmp, p)
            placed.append(p)
    except BaseException as e:
        restored = {p for _, p in backups}
        for p in placed:
            if p not in restored:
                _quiet_unlink(p)
        for bak, p in backups:
            try:
                os.replace(bak, p)
            except OSError:
                pass
        for tmp, _ in temps:
            _quiet_unlink(tmp)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError) and current is not None:
            raise _write_error(current, e) from None
        raise
    for bak, _ in backups:
        _quiet_unlink(bak)


def _quiet_unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def save_onnx(graph: Graph, path: str | os.PathLike, **kw) -> onnx.ModelProto:
    model = to_onnx(graph, **kw)
    atomic_write_bytes(path, model.SerializeToString(deterministic=True))
    return model
