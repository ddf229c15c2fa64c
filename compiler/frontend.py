"""ONNX import: file -> checked, upgraded, shape-inferred, constant-folded -> mpqc IR.

Steps: read and check the protobuf; bring opsets older than 13 up to 17 with
``onnx.version_converter`` (so the runtime sees one set of op semantics); infer
shapes; import through onnx-graphsurgeon, fold constants (including shape
subgraphs whose dims are static), clean up and sort; then convert to ``Graph``.
Every op left must be one the runtime executes, else ``UnsupportedOpError``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper, version_converter

from ..core.errors import ModelError, UnsupportedOpError
from ..core.ir import Graph, Node, Value
from ..runtime.ops import KERNELS, SUPPORTED_DTYPES, validate_node

log = logging.getLogger(__name__)

#: opsets below this are converted up to TARGET_OPSET on import
MIN_NATIVE_OPSET = 13
TARGET_OPSET = 17


def onnx_dtype_to_np(elem_type: int) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # pragma: no cover - exotic types
        return np.dtype(np.float32)


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file; any failure is a one-line ModelError."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file {str(p)!r} does not exist")
    if p.is_dir():
        raise ModelError(f"model path {str(p)!r} is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelError(f"{str(p)!r} is not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})",
                         hint="check that the file is a complete .onnx export") from None
    if not model.graph.node:
        raise ModelError(f"{str(p)!r} holds no graph nodes: not an ONNX model, or an empty one")
    return model


def check_model(model: onnx.ModelProto, origin: str = "model") -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{origin} fails the ONNX checker: {msg[:300]}") from None


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return TARGET_OPSET


def upgrade_opset(model: onnx.ModelProto, origin: str = "model") -> onnx.ModelProto:
    """Convert models older than opset 13 to opset 17 (old model-zoo models are opset 7-9)."""
    ver = default_opset(model)
    if ver >= MIN_NATIVE_OPSET:
        return model
    try:
        return version_converter.convert_version(model, TARGET_OPSET)
    except Exception as e:
        _check_old_semantics(model, ver, origin, e)
        log.info("opset conversion of %s from %d failed (%s); importing as is", origin, ver, e)
        return model


#: legacy attributes the kernels still read (they moved to inputs in later opsets)
_KERNEL_LEGACY_ATTRS = {
    "Unsqueeze": {"axes"}, "Squeeze": {"axes"}, "Split": {"split"}, "Pad": {"pads", "value"},
    "Clip": {"min", "max"}, "Slice": {"starts", "ends", "axes"}, "Dropout": {"ratio"},
    "ReduceMean": {"axes"}, "ReduceSum": {"axes"}, "ReduceMax": {"axes"}, "ReduceMin": {"axes"},
}


def _check_old_semantics(model: onnx.ModelProto, ver: int, origin: str, err: Exception) -> None:
    """After a failed opset conversion: refuse nodes whose old-opset meaning the runtime lacks.

    The kernels implement opset 13+ semantics. Softmax/LogSoftmax/Hardmax before 13
    flatten to 2-D first, and attributes dropped from the current schema (``broadcast``,
    ``consumed_inputs``, ``is_test``, ``spatial``, Reshape's ``shape``...) change meaning;
    running either as is would give wrong numbers.
    """
    bad = []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type in ("Softmax", "LogSoftmax", "Hardmax") and ver < 13:
            bad.append(f"{n.op_type} {n.name or n.output[0]!r} (2-D coercion before opset 13)")
            continue
        try:
            known = set(onnx.defs.get_schema(n.op_type, TARGET_OPSET).attributes)
        except Exception:
            continue  # an unknown op is reported by check_supported
        legacy = {a.name for a in n.attribute} - known - _KERNEL_LEGACY_ATTRS.get(n.op_type, set())
        if legacy:
            bad.append(f"{n.op_type} {n.name or n.output[0]!r} (attribute {', '.join(sorted(legacy))})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UnsupportedOpError(
            f"{origin}: opset {ver} could not be converted to opset {TARGET_OPSET} "
            f"({str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__}), "
            f"and these nodes have an opset-{ver} meaning mpqc does not implement: {'; '.join(bad[:3])}{more}",
            hint="re-export the model at opset 13 or later")


def _attr_value(v):
    if isinstance(v, gs.Constant):
        return np.array(v.values)
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, gs.Graph) or isinstance(v, onnx.GraphProto):
        return v  # subgraph: only ops with subgraphs use it, and none is supported
    if isinstance(v, (list, tuple)):
        return [_attr_value(x) for x in v]
    return v


def _shape_of(var) -> tuple | None:
    shp = getattr(var, "shape", None)
    if shp is None:
        return None
    out = []
    for d in shp:
        if isinstance(d, (int, np.integer)) and int(d) >= 0:
            out.append(int(d))
        elif isinstance(d, str) and d:
            out.append(d)
        else:
            out.append(None)
    return tuple(out)


def _check_dtype(name: str, dt, origin: str) -> np.dtype:
    if dt is None or dt not in SUPPORTED_DTYPES:
        raise UnsupportedOpError(
            f"{origin}: tensor {name!r} has element type {dt}, which mpqc does not support "
            f"(supported: bool, int8-64, uint8-64, float16/32/64)")
    return dt


def _variable_dtype(t, origin: str) -> np.dtype:
    """numpy dtype of a graph-surgeon Variable; unknown -> float32; unsupported -> error."""
    if t.dtype is None:
        return np.dtype(np.float32)
    if isinstance(t.dtype, (int, np.integer)):  # an ONNX type gs could not map (bfloat16, float8...)
        try:
            dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(t.dtype)))
        except (TypeError, ValueError, KeyError):
            dt = None
        if dt not in SUPPORTED_DTYPES:
            try:
                dt = onnx.TensorProto.DataType.Name(int(t.dtype))
            except ValueError:
                pass
        return _check_dtype(t.name, dt, origin)
    try:
        dt = np.dtype(t.dtype)
    except TypeError:
        raise UnsupportedOpError(f"{origin}: tensor {t.name!r} is not a plain tensor ({str(t.dtype).split()[0]}); "
                                 f"mpqc supports tensor values only") from None
    return _check_dtype(t.name, dt, origin)


def _split_shape_start_end(g) -> None:
    """Rewrite ``Shape(start, end)`` as ``Slice(Shape(x))`` before graph-surgeon folding.

    onnx-graphsurgeon's shape folding (0.6) ignores the start/end attributes of Shape
    (opset 15+) and folds the whole shape; the Slice form folds correctly.
    """
    for i, n in enumerate(list(g.nodes)):
        if n.op != "Shape" or not ({"start", "end"} & set(n.attrs)):
            continue
        start = int(n.attrs.pop("start", 0))
        end = n.attrs.pop("end", None)
        end = np.iinfo(np.int64).max if end is None else int(end)
        out = n.outputs[0]
        base = n.name or out.name or f"shape_{i}"
        full = gs.Variable(f"{base}__full_shape", dtype=np.int64)
        n.outputs.clear()
        n.outputs.append(full)
        starts = gs.Constant(f"{base}__starts", np.array([start], dtype=np.int64))
        ends = gs.Constant(f"{base}__ends", np.array([end], dtype=np.int64))
        g.nodes.append(gs.Node("Slice", f"{base}__slice", inputs=[full, starts, ends], outputs=[out]))
    g.toposort()


def from_onnx(model: onnx.ModelProto, *, origin: str = "model", fold: bool = True,
              check_ops: bool = True) -> Graph:
    """Convert an in-memory ModelProto to a Graph (see module docstring)."""

    model = upgrade_opset(model, origin)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        log.info("shape inference of %s failed: %s", origin, e)
    try:
        g = gs.import_onnx(model)
    except Exception as e:
        raise ModelError(f"{origin} cannot be imported: {str(e).splitlines()[0][:200]}") from None
    if fold:
        _split_shape_start_end(g)
        try:
            g.fold_constants(fold_shapes=True, error_ok=True)
        except Exception as e:  # folding is an optimisation: never fatal
            log.info("constant folding at import failed: %s", e)
    g.cleanup(remove_unused_graph_inputs=False).toposort()

    graph = Graph(name=g.name or "graph", opset=max(default_opset(model), 13))
    for p in model.metadata_props:
        graph.metadata[p.key] = p.value
    vmap: dict[int, Value] = {}

    def conv(t) -> Value | None:
        if t is None:
            return None
        if isinstance(t, gs.Variable) and t.name == "":
            return None  # omitted optional input
        v = vmap.get(id(t))
        if v is None:
            if isinstance(t, gs.Constant):
                arr = np.array(t.values)
                _check_dtype(t.name, arr.dtype, origin)
                v = Value(t.name, const=arr)
            else:
                v = Value(t.name, _shape_of(t), _variable_dtype(t, origin))
            vmap[id(t)] = v
        return v

    graph.inputs = [conv(t) for t in g.inputs if not isinstance(t, gs.Constant)]
    used_names: set[str] = set()
    for i, n in enumerate(g.nodes):
        name = n.name or f"{n.op}_{i}"
        while name in used_names:
            name = f"{name}_{i}"
        used_names.add(name)
        node = Node(n.op, name, {k: _attr_value(a) for k, a in n.attrs.items()}, n.domain or "")
        for t in n.inputs:
            graph.append_input(node, conv(t))
        for t in n.outputs:
            v = conv(t)
            v.producer = node
            node.outputs.append(v)
        graph.nodes.append(node)
    graph.outputs = [conv(t) for t in g.outputs]
    if check_ops:
        check_supported(graph)
    graph.verify()
    return graph


def check_supported(graph: Graph) -> None:
    for n in graph.nodes:
        if n.domain not in ("", "ai.onnx") or n.op_type not in KERNELS:
            supported = ", ".join(sorted(KERNELS))
            op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            raise UnsupportedOpError(
                f"node {n.name!r} uses operator {op}, which mpqc does not support. "
                f"Supported: {supported}")
        validate_node(n)


def load_graph(path: str | os.PathLike, *, fold: bool = True, check_ops: bool = True) -> Graph:
    """Read an ONNX file and import it (the ``mpqc.load`` entry point)."""
    model = read_model(path)
    origin = Path(path).name
    check_model(model, origin)
    graph = from_onnx(model, origin=origin, fold=fold, check_ops=check_ops)
    if not graph.name or graph.name == "graph":
        graph.name = Path(path).stem
    return graph
