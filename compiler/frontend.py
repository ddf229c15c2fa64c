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
from onnx import TensorProto, numpy_helper, version_converter

from ..core.errors import ModelError, OptionError, UnsupportedOpError
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
    validate_model(model, origin)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{origin} fails the ONNX checker: {msg[:300]}") from None


#: float constants larger than this overflow float32 once multiplied (a flipped exponent bit)
MAX_CONST_MAGNITUDE = 1e30
#: the largest sane dimension (elements along one axis)
MAX_DIM = 2 ** 31 - 1
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
#: attributes that must be positive integers, of any op that has them
_POSITIVE_INTS = ("strides", "dilations", "kernel_shape")
#: attributes that hold integers in every op of the default domain that has them
_INT_ATTRS = ("strides", "dilations", "kernel_shape", "pads", "group", "output_padding", "output_shape",
              "transA", "transB", "axis", "axes", "keepdims", "ceil_mode")
#: where an infinite value is meaningful (clip bounds)
_INF_OK_ATTRS = {("Clip", "min"), ("Clip", "max")}


def _bad(origin: str, what: str, hint: str | None = None):
    raise ModelError(f"{origin}: {what}", hint=hint)


def _node_label(n) -> str:
    return f"node {n.name or (n.output[0] if n.output else '?')!r} ({n.op_type})"


def _check_utf8(model: onnx.ModelProto, origin: str) -> None:
    """protobuf hands out a string field holding invalid UTF-8 as bytes: name the field."""
    g = model.graph

    def chk(s, what):
        if not isinstance(s, str):
            _bad(origin, f"{what} {bytes(s)[:60]!r} is not valid UTF-8", "re-export the model with text names")
    chk(g.name, "graph name")
    for i, n in enumerate(g.node):
        label = f"node #{i}"
        chk(n.name, f"{label} name")
        label = f"node #{i} {n.name!r}" if isinstance(n.name, str) else label
        chk(n.op_type, f"{label} op_type")
        chk(n.domain, f"{label} domain")
        for j, t in enumerate(n.input):
            chk(t, f"{label} input {j} name")
        for j, t in enumerate(n.output):
            chk(t, f"{label} output {j} name")
        for a in n.attribute:
            chk(a.name, f"{label} attribute name")
    for kind, vals in (("graph input", g.input), ("graph output", g.output), ("value_info", g.value_info)):
        for v in vals:
            chk(v.name, f"{kind} name")
            for d in v.type.tensor_type.shape.dim:
                if d.HasField("dim_param"):
                    chk(d.dim_param, f"{kind} {v.name!r} dimension name")
    for t in g.initializer:
        chk(t.name, "initializer name")
    for p in model.metadata_props:
        chk(p.key, "metadata key")
        chk(p.value, f"metadata value of {p.key!r}")


def _check_tensor(t: onnx.TensorProto, what: str, origin: str, allow_inf: bool = False) -> np.ndarray | None:
    """Dims, data length and finiteness of a constant tensor; returns its array (None: external data)."""
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        _bad(origin, f"{what} has a negative dimension {dims}")
    if any(d > MAX_DIM for d in dims) or int(np.prod(dims, dtype=np.float64)) > 2 ** 34:
        _bad(origin, f"{what} has dimensions {dims}, too large for a constant")
    if t.data_location == TensorProto.EXTERNAL:
        return None
    n = int(np.prod(dims, dtype=np.int64))
    try:
        np_dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except Exception:
        np_dt = None
    if t.HasField("raw_data") and np_dt is not None and np_dt.kind in "biuf" and t.data_type not in (
            TensorProto.INT4, TensorProto.UINT4):
        if len(t.raw_data) != n * np_dt.itemsize:
            _bad(origin, f"{what} has dims {dims} ({n} elements of {np_dt}, {n * np_dt.itemsize} bytes) but "
                         f"{len(t.raw_data)} bytes of raw data", "the file is damaged; re-export the model")
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:
        _bad(origin, f"{what} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})",
             "the file is damaged; re-export the model")
    if arr.size != n:
        _bad(origin, f"{what} has dims {dims} ({n} elements) but holds {arr.size} values",
             "the file is damaged; re-export the model")
    if t.data_type in _FLOAT_TYPES and arr.size:
        a = arr.astype(np.float64, copy=False)
        bad = np.isnan(a) if allow_inf else ~np.isfinite(a)
        if bad.any():
            kinds = "NaN" if np.isnan(a).any() else "infinite"
            _bad(origin, f"{what} holds {int(bad.sum())} {kinds} value(s) (NaN or infinite weights give a "
                         f"meaningless model)", "fix or retrain the model")
        if not allow_inf:
            big = float(np.abs(a).max())
            if big > MAX_CONST_MAGNITUDE:
                _bad(origin, f"{what} holds a value of magnitude {big:.3g}; constants above "
                             f"{MAX_CONST_MAGNITUDE:.0e} overflow float32 arithmetic (a damaged file?)",
                     "fix or retrain the model")
    return arr


def _int_list(v) -> list[int]:
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def _check_attributes(n, origin: str, label: str) -> dict:
    """Finite float attributes, positive strides/dilations/kernel_shape; returns name -> value."""
    attrs = {}
    for a in n.attribute:
        where = f"{label} attribute {a.name!r}"
        if a.type == onnx.AttributeProto.FLOAT or a.type == onnx.AttributeProto.FLOATS:
            vals = [a.f] if a.type == onnx.AttributeProto.FLOAT else list(a.floats)
            for v in vals:
                if np.isnan(v) or (np.isinf(v) and (n.op_type, a.name) not in _INF_OK_ATTRS):
                    _bad(origin, f"{where} is {v}, expected a finite number")
        if a.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.SPARSE_TENSOR):
            if a.type == onnx.AttributeProto.TENSOR:
                _check_tensor(a.t, where, origin)
            continue
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            continue
        try:
            attrs[a.name] = onnx.helper.get_attribute_value(a)
        except Exception:
            _bad(origin, f"{where} cannot be read")
        v = attrs[a.name]
        if a.name in _INT_ATTRS and not (
                (isinstance(v, int) and not isinstance(v, bool))
                or (isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v))):
            _bad(origin, f"{where} is {v!r} ({onnx.AttributeProto.AttributeType.Name(a.type) if a.type in onnx.AttributeProto.AttributeType.values() else a.type}), expected integers")
        if a.name in _POSITIVE_INTS and a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS):
            vals = _int_list(attrs[a.name])
            if any(v < 1 or v > MAX_DIM for v in vals):
                _bad(origin, f"{where} is {vals}, every entry must be a positive integer")
    return attrs


def _check_conv(n, attrs, shapes, consts, origin, label) -> None:
    if len(n.input) < 2 or not n.input[0] or not n.input[1]:
        _bad(origin, f"{label} has inputs {list(n.input)}, expected (X, W[, B])")
    w = consts.get(n.input[1]) if len(n.input) > 1 else None
    wshape = None if w is None else list(w.shape)
    xshape = shapes.get(n.input[0])
    nd = len(wshape) - 2 if wshape is not None else (len(xshape) - 2 if xshape else None)
    if wshape is not None:
        if len(wshape) < 3:
            _bad(origin, f"{label}: weight {n.input[1]!r} has shape {wshape}, expected rank 3 or more "
                         f"(M, C/group, k1, ...)")
        if 0 in wshape:
            _bad(origin, f"{label}: weight {n.input[1]!r} has shape {wshape} with a zero dimension")
    group = attrs.get("group", 1)
    if not isinstance(group, int) or group < 1:
        _bad(origin, f"{label} attribute 'group' is {group}, expected a positive integer")
    ks = attrs.get("kernel_shape")
    if ks is not None and wshape is not None and list(ks) != wshape[2:]:
        _bad(origin, f"{label} attribute 'kernel_shape' is {list(ks)} but its weight {n.input[1]!r} has "
                     f"kernel {wshape[2:]} (shape {wshape})")
    if nd is not None:
        for key, want in (("strides", nd), ("dilations", nd), ("kernel_shape", nd), ("pads", 2 * nd),
                          ("output_padding", nd)):
            if key in attrs and len(_int_list(attrs[key])) != want:
                _bad(origin, f"{label} attribute {key!r} has {len(_int_list(attrs[key]))} entries, expected "
                             f"{want} for {nd} spatial dimension(s)")
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode("utf-8", "replace") if isinstance(auto, bytes) else str(auto)
    if auto not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        _bad(origin, f"{label} attribute 'auto_pad' is {auto!r}, expected NOTSET, SAME_UPPER, SAME_LOWER or VALID")
    if auto != "NOTSET" and "pads" in attrs:
        _bad(origin, f"{label} sets both attribute 'auto_pad' ({auto}) and attribute 'pads'; give only one")
    if "pads" in attrs and any(p < 0 or p > MAX_DIM for p in _int_list(attrs["pads"])):
        _bad(origin, f"{label} attribute 'pads' is {_int_list(attrs['pads'])}, entries must be 0 or more")
    if wshape is None:
        ws = shapes.get(n.input[1]) if len(n.input) > 1 else None
        if ws is None or any(not isinstance(d, int) or d <= 0 for d in ws):
            _bad(origin, f"{label}: weight {n.input[1]!r} is neither a constant nor of a static shape "
                         f"({'unknown' if ws is None else ws}); mpqc compiles layers with fixed weight shapes")
        return
    transpose = n.op_type == "ConvTranspose"
    m = wshape[1] * group if transpose else wshape[0]
    if transpose:
        cin = wshape[0]
        if cin % group:
            _bad(origin, f"{label} attribute 'group' ({group}) does not divide the weight's input channels {cin}")
    else:
        if m % group:
            _bad(origin, f"{label} attribute 'group' ({group}) does not divide its {m} output channels "
                         f"(weight {n.input[1]!r} shape {wshape})")
        cin = wshape[1] * group
    if xshape is not None and len(xshape) >= 2:
        if len(xshape) != len(wshape):
            _bad(origin, f"{label}: input {n.input[0]!r} has rank {len(xshape)} but weight {n.input[1]!r} "
                         f"rank {len(wshape)}")
        c = xshape[1]
        if isinstance(c, int) and c > 0 and c != cin:
            _bad(origin, f"{label}: input {n.input[0]!r} has {c} channels but weight {n.input[1]!r} {wshape} "
                         f"with attribute 'group' {group} expects {cin}")
    if len(n.input) > 2 and n.input[2]:
        b = consts.get(n.input[2])
        if b is not None and list(b.shape) != [m]:
            _bad(origin, f"{label}: bias {n.input[2]!r} has shape {list(b.shape)}, expected [{m}] "
                         f"(one per output channel)")


def _check_gemm(n, attrs, consts, origin, label) -> None:
    for k in ("transA", "transB"):
        if attrs.get(k, 0) not in (0, 1):
            _bad(origin, f"{label} attribute {k!r} is {attrs[k]}, expected 0 or 1")
    b = consts.get(n.input[1]) if len(n.input) > 1 else None
    if b is None:
        return
    if b.ndim != 2 or 0 in b.shape:
        _bad(origin, f"{label}: weight {n.input[1]!r} has shape {list(b.shape)}, expected a non-empty 2-D matrix")
    nout = b.shape[0] if attrs.get("transB", 0) else b.shape[1]
    if len(n.input) > 2 and n.input[2] and n.input[2] in consts:
        c = consts[n.input[2]]
        if c.ndim > 2 or (c.size and c.shape[-1] not in (1, nout)):
            _bad(origin, f"{label}: bias {n.input[2]!r} has shape {list(c.shape)}, expected [{nout}] "
                         f"(one per output)")


def _strict_inference(model: onnx.ModelProto, origin: str, data_prop: bool = False,
                      hint: str = "fix the model; its types or shapes do not fit together") -> onnx.ModelProto:
    """Full ONNX type and shape inference; an inconsistency (a weight of another type than the input,
    a matrix product of mismatched sizes...) is a ModelError, since the exported model would fail
    the same check. Models with ops of other domains are left to check_supported."""
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node) or \
            any(imp.domain not in ("", "ai.onnx") for imp in model.opset_import):
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=data_prop)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        msg = " ".join(str(e).split())
        msg = msg.replace("[ShapeInferenceError] Inference error(s): ", "").replace("[ShapeInferenceError] ", "")
        raise ModelError(f"{origin}: the model is inconsistent: {msg[:300]}", hint=hint) from None
    except Exception:  # inference itself failed (an op it does not know...): not the model's fault
        return model


def _static_shapes(inferred: onnx.ModelProto) -> dict[str, list]:
    shapes = {}
    g = inferred.graph
    for v in list(g.input) + list(g.value_info) + list(g.output):
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return shapes


def validate_model(model: onnx.ModelProto, origin: str = "model") -> None:
    """Structural checks the ONNX checker leaves out, run at import by every command: names are
    UTF-8, the opset is one onnx knows, the graph has inputs and outputs with sane dimensions,
    constants hold as many values as their dims say and are finite, float attributes are finite,
    and Conv/Gemm attributes agree with their weights. One ModelError names node and attribute."""
    _check_utf8(model, origin)
    g = model.graph
    max_opset = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not 1 <= imp.version <= max_opset:
            _bad(origin, f"opset {imp.version} is not supported (mpqc reads ONNX opsets 7 to {max_opset})",
                 "re-export the model at a released opset, e.g. 17")
    if not any(imp.domain in ("", "ai.onnx") for imp in model.opset_import) and model.opset_import:
        pass  # a model of custom ops only: check_supported names them
    if not g.output:
        _bad(origin, "the graph has no graph output", "a model must declare at least one output")
    inits = {t.name for t in g.initializer}
    if not [v for v in g.input if v.name not in inits]:
        _bad(origin, "the graph has no graph input (every input is a constant)")
    for kind, vals in (("graph input", g.input), ("graph output", g.output)):
        for v in vals:
            if v.name in inits:
                continue
            tt = v.type.tensor_type
            if not tt.HasField("shape"):
                continue
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and not 1 <= d.dim_value <= MAX_DIM:
                    _bad(origin, f"{kind} {v.name!r} has dim {i} = {d.dim_value}; dimensions must be between 1 "
                                 f"and {MAX_DIM}")
    clip_bounds = {t for n in g.node if n.op_type == "Clip" for t in list(n.input)[1:3]}
    consts: dict[str, np.ndarray] = {}
    for t in g.initializer:
        a = _check_tensor(t, f"initializer {t.name!r}", origin, allow_inf=t.name in clip_bounds)
        if a is not None:
            consts[t.name] = a
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    consts[n.output[0]] = _check_tensor(a.t, f"{_node_label(n)} attribute 'value'", origin,
                                                        allow_inf=n.output[0] in clip_bounds)
    shapes = None
    for n in g.node:
        label = _node_label(n)
        if n.domain not in ("", "ai.onnx"):
            continue
        attrs = _check_attributes(n, origin, label)
        if n.op_type in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"):
            if n.op_type in ("Conv", "ConvTranspose"):
                if shapes is None:
                    try:
                        shapes = _static_shapes(onnx.shape_inference.infer_shapes(model))
                    except Exception:
                        shapes = _static_shapes(model)
                _check_conv(n, attrs, shapes, consts, origin, label)
        elif n.op_type == "Gemm":
            _check_gemm(n, attrs, consts, origin, label)
        elif n.op_type in ("MaxPool", "AveragePool", "LpPool"):
            auto = attrs.get("auto_pad", b"NOTSET")
            auto = auto.decode("utf-8", "replace") if isinstance(auto, bytes) else str(auto)
            if auto != "NOTSET" and "pads" in attrs:
                _bad(origin, f"{label} sets both attribute 'auto_pad' ({auto}) and attribute 'pads'; give only one")
            if "pads" in attrs and any(p < 0 for p in _int_list(attrs["pads"])):
                _bad(origin, f"{label} attribute 'pads' is {_int_list(attrs['pads'])}, entries must be 0 or more")
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            for t in list(n.input)[1:2]:
                if t in consts and 0 in consts[t].shape:
                    _bad(origin, f"{label}: weight {t!r} has shape {list(consts[t].shape)} with a zero dimension")
    _strict_inference(model, origin)


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
    fuse_max_min(graph)
    if check_ops:
        check_supported(graph)
    graph.verify()
    return graph


def _channel_bound(v: Value | None, rank: int | None) -> bool:
    """A constant that is a scalar or one value per channel (axis 1) of a rank-``rank`` tensor."""
    if v is None or not v.is_const:
        return False
    a = v.const
    if a.ndim == 0:
        return True
    if rank is None or a.ndim != rank - 1:
        return False
    return all(d == 1 for d in a.shape[1:])


def fuse_max_min(graph: Graph) -> int:
    """Read ``Min(Max(x, lo), hi)`` with per-channel constant bounds back as one Clip: the form in which
    ``export.to_onnx`` writes a Clip whose bounds are per channel (ONNX Clip takes scalars only)."""
    fused = 0
    outs = {id(v) for v in graph.outputs}
    for mn in list(graph.nodes):
        if mn.op_type != "Min" or len(mn.inputs) != 2:
            continue
        mid, hi = mn.inputs
        mx = mid.producer if mid is not None else None
        if mx is None or mx.op_type != "Max" or len(mx.inputs) != 2 or len(mid.uses) != 1 or id(mid) in outs:
            continue
        x, lo = mx.inputs
        rank = x.rank if x is not None else None
        if x is None or x.is_const or not (_channel_bound(lo, rank) and _channel_bound(hi, rank)):
            continue
        if lo.const.ndim == 0 and hi.const.ndim == 0:
            continue  # scalar Max/Min: left as the model wrote it
        if lo.const.dtype != x.dtype or hi.const.dtype != x.dtype:
            continue
        idx = graph.nodes.index(mx)
        out = mn.outputs[0]
        graph.remove_node(mn, force=True)
        graph.remove_node(mx, force=True)
        graph.add_node("Clip", [x, lo, hi], [out], name=mn.name, index=idx)
        fused += 1
    return fused


def _dims_text(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)  # a symbol prints as its name


def fix_input_shapes(model: onnx.ModelProto, given: dict | None = None, data: tuple | None = None,
                     origin: str = "model") -> list[dict]:
    """Fix symbolic input dims of ``model`` in place, before shape inference and folding, so that
    shape subgraphs (``Shape -> Slice/Gather -> Concat -> Reshape``) fold to constants.

    ``given``: ``--input-shape`` (``CompileOptions.input_shapes``: input name, or None for the first
    input -> dims, None keeping the model's); every dim it gives wins over a symbolic one, and one
    that contradicts a fixed dim of the model, a wrong rank or an unknown input name is an
    ``OptionError``. ``data``: ``(shape, option, source)`` of the data given for the first input
    (the calibration data): the symbolic dims of that input that ``given`` leaves open, except the
    batch (dim 0, which stays symbolic), are taken from it; a data shape of another rank is left to
    the data checks. Value infos of inner tensors with symbolic dims are dropped (inference
    recomputes them). Returns, per graph input, ``{"name", "shape", "model_shape", "source"}``
    (source: "model", "--input-shape", or the data's option such as "--calib", then also "data")."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in inits]
    given = dict(given or {})
    by_name = {v.name: v for v in inputs}
    if None in given:
        if not inputs:
            raise OptionError("--input-shape: the model has no input")
        first = inputs[0].name
        if first in given:
            raise OptionError(f"--input-shape gives input {first!r} twice (once by name, once as the first input)")
        given[first] = given.pop(None)
    for name in given:
        if name not in by_name:
            raise OptionError(f"--input-shape names input {name!r}, which {origin} does not have; its inputs are: "
                              f"{', '.join(repr(v.name) for v in inputs)}")

    def dims_of(v):
        tt = v.type.tensor_type
        if not tt.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]

    rows = []
    changed = False
    for k, v in enumerate(inputs):
        model_dims = dims_of(v)
        row = {"name": v.name, "model_shape": model_dims, "shape": model_dims, "source": "model"}
        want = None
        if v.name in given:
            dims = given[v.name]
            spec = f"--input-shape {v.name}:{_dims_text(dims)}"
            if model_dims is not None and len(dims) != len(model_dims):
                raise OptionError(f"{spec}: input {v.name!r} of {origin} has rank {len(model_dims)} "
                                  f"({model_dims}), the option gives {len(dims)} dims")
            for i, (d, m) in enumerate(zip(dims, model_dims or dims)):
                if d is not None and isinstance(m, int) and m != d:
                    raise OptionError(f"{spec}: dim {i} of input {v.name!r} is fixed to {m} by {origin}, the "
                                      f"option gives {d}")
            want = list(dims)
            if any(d is not None and not isinstance(m, int) for d, m in zip(dims, model_dims or dims)):
                row["source"] = "--input-shape"
        if k == 0 and data is not None and model_dims is not None:
            shape, option, source = data
            if len(shape) == len(model_dims):
                want = want or [None] * len(model_dims)
                taken = False
                for i in range(1, len(model_dims)):
                    if want[i] is None and not isinstance(model_dims[i], int):
                        want[i] = int(shape[i])
                        taken = True
                if taken:
                    row["source"] = option if row["source"] == "model" else f"--input-shape and {option}"
                    row["data"] = source
        if want is not None and model_dims is not None:
            dim = v.type.tensor_type.shape.dim
            new = list(model_dims)
            for i, d in enumerate(want):
                if d is not None and not isinstance(model_dims[i], int):
                    dim[i].Clear()
                    dim[i].dim_value = int(d)
                    new[i] = int(d)
                    changed = True
            row["shape"] = new
        elif want is not None and model_dims is None and all(d is not None for d in want):
            for d in want:
                v.type.tensor_type.shape.dim.add().dim_value = int(d)
            row["shape"] = list(want)
            changed = True
        rows.append(row)
    if changed:  # inner value infos may hold the old symbols: inference recomputes them from the inputs
        keep = [vi for vi in g.value_info if not any(d.HasField("dim_param") or not d.HasField("dim_value")
                                                     for d in vi.type.tensor_type.shape.dim)]
        del g.value_info[:]
        g.value_info.extend(keep)
    return rows


def check_supported(graph: Graph) -> None:
    for n in graph.nodes:
        if n.domain not in ("", "ai.onnx") or n.op_type not in KERNELS:
            supported = ", ".join(sorted(KERNELS))
            op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            raise UnsupportedOpError(
                f"node {n.name!r} uses operator {op}, which mpqc does not support. "
                f"Supported: {supported}")
        validate_node(n)


def import_model(path: str | os.PathLike, *, fold: bool = True, check_ops: bool = True,
                 input_shapes: dict | None = None, data_shape: tuple | None = None) -> tuple[Graph, list[dict]]:
    """Read an ONNX file, fix its symbolic input dims (``fix_input_shapes``: ``input_shapes`` from
    ``--input-shape``, ``data_shape`` from the calibration data) and import it; returns the graph
    and where each input's shape came from (the report's ``inputs``)."""
    model = read_model(path)
    origin = Path(path).name
    check_model(model, origin)
    rows = fix_input_shapes(model, input_shapes, data_shape, origin)
    fixed = [r for r in rows if r["source"] != "model"]
    if fixed:  # a model that does not fit together at the shapes given: say which shapes, and from where
        model = upgrade_opset(model, origin)  # (data propagation through Shape/Gather needs opset 13+)
        where = "; ".join(f"{r['name']}:{_dims_text(r['shape'])} from "
                          f"{r['source']}{' ' + r['data'] if 'data' in r else ''}" for r in fixed)
        _strict_inference(model, f"{origin} at input shape {where}", data_prop=True,
                          hint="give the input shape the model is built for (--input-shape NAME:DIMS)")
    graph = from_onnx(model, origin=origin, fold=fold, check_ops=check_ops)
    if not graph.name or graph.name == "graph":
        graph.name = Path(path).stem
    return graph, rows


def load_graph(path: str | os.PathLike, *, fold: bool = True, check_ops: bool = True,
               input_shapes: dict | None = None) -> Graph:
    """Read an ONNX file and import it (the ``mpqc.load`` entry point); ``input_shapes`` as
    ``--input-shape`` (``{"x": (1, 3, 48, 192)}``, None in a dim: keep the model's)."""
    return import_model(path, fold=fold, check_ops=check_ops, input_shapes=input_shapes)[0]
