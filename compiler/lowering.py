"""Lowering: a QDQ graph -> the integer ``Program`` the target (and the emulator) executes.

``lower(graph)`` turns a QDQ graph (what insert-qdq leaves, or a QDQ .onnx file) into
a ``Program``: a flat list of integer steps, the integer constants (weights, int32
biases) and the formats of every integer tensor (core/program.py).
``runtime.emulator.Emulator(program).run(x)`` executes it; a target bundle
(``--emit-bundle``) is that program serialized, so ``mpqc eval BUNDLE.npz --runtime
emulator`` runs from the bundle alone. ``load_program``/``run_emulator`` take a Graph,
a Program, a QDQ .onnx path or a bundle path.

Semantics (docs/FIXED_POINT.md has the full story):

* Lowering is an abstract interpretation of the QDQ graph: a tensor is either a
  float (host preprocessing before the input QuantizeLinear), or a fixed-point value
  ``real = ints * scale / den`` whose integers the emulator holds exactly (float32 or
  float64 arrays of integers: a product-sum of B-bit integers is exact in float64,
  and in float32 while it stays below 2^24 -- checked per layer from the weights).
* DequantizeLinear is free (it only reinterprets integers); Conv/Gemm/MatMul on
  integer inputs and weights accumulate exactly (``layer`` step, BLAS), the int32 bias
  is added, Relu/Clip clamp the accumulator exactly, Add aligns operands by shifts,
  GlobalAveragePool sums (``den`` = window size); every QuantizeLinear after integer
  math is a ``requant`` step: arithmetic shift with rounding (the graph's
  ``mpqc.rounding``: half to even, as ONNX and the npu targets, or half up), the clamp
  of a fused Relu/Clip, exact rational rounding when dividing by a window size,
  saturation to the container -- numba kernels in ``runtime/emulator_kernels.py``.
* Float-scale formats (``ort-int8``) requantize as onnxruntime does: ``f32(acc) *
  f32(multiplier)``, ties to even.
* An op without an integer rule is evaluated on its real inputs and rounded by the
  QuantizeLinear after it (a lookup table on a chip computes the same function of the
  integer input): in float32 for the ops made of correctly rounded IEEE steps
  (``FLOAT32_OPS``: HardSigmoid, HardSwish, Add, Mul, Clip ...), as the exported QDQ model
  computes them on DequantizeLinear's float32 values, so the two agree bit for bit; in
  float64 on the exact reals for the others (Sigmoid, Softmax, ...), whose float32
  implementations differ from library to library.
* Tensors that carry shapes or integers (``Shape`` of a quantized tensor, the shape
  arithmetic after it) are host integers: ``Shape`` reads the integer tensor's shape, and
  a ``Reshape``/``Slice``/... whose shape or index input is such a tensor still only moves
  integers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import CompilerError, UnsupportedOpError
from ..core.ir import LAYER_OPS, Graph, Node, Value
from ..core.program import Program, Step, load_bundle
from ..core.qformat import dequantize_linear
from ..runtime.emulator import F32_EXACT, F64_EXACT, ROUNDINGS, run_program
from ..runtime.executor import float_node_fn
from ..runtime.ops import _onnx_elem_dtype
from .export import load_qdq_graph
from .qdq import insert_qdq, is_qdq_graph

#: ops that only move integers (exact on the integer grid), besides the Q/DQ themselves
MOVE_OPS = ("MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity",
            "Dropout", "Slice", "Split", "Concat", "Pad", "Expand", "Tile", "Gather", "DepthToSpace",
            "SpaceToDepth")
#: move ops that keep the channel axis (1) in place: allowed on per-channel scales
CHANNEL_SAFE_MOVES = ("MaxPool", "GlobalMaxPool", "Identity", "Dropout")
#: ops without an integer rule whose float32 result is one correctly rounded IEEE operation after
#: another, in the order ONNX (and onnxruntime) evaluates them: on the float32 reals of a
#: DequantizeLinear they are evaluated in float32, as the exported QDQ model computes them, so the
#: QuantizeLinear after them sees the same number (bit-exact with onnxruntime). Other ops
#: (Sigmoid, Softmax ...) are evaluated in float64: their float32 implementations differ by library.
FLOAT32_OPS = ("HardSigmoid", "HardSwish", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Clip", "Max", "Min",
               "Neg", "Abs")


@dataclass
class _AV:
    """Abstract value during lowering."""
    kind: str  # float | fix | qint | const | cfix
    name: str
    scale: np.ndarray | None = None  # float64, () or (C,)
    axis: int | None = None  # channel axis of a per-channel scale (in the tensor)
    den: Any = 1.0  # float, or the name of a constant count array
    bound: float = 0.0  # max |integer|
    integral: bool = True
    zp: int = 0
    qmin: int = 0
    qmax: int = 0
    dtype: str = ""  # qint: container type
    const: np.ndarray | None = None  # const / cfix: the stored array
    zp_arr: np.ndarray | None = None  # cfix: zero point array

    @property
    def per_channel(self) -> bool:
        return self.scale is not None and np.ndim(self.scale) > 0 and np.size(self.scale) > 1

    @property
    def is_fix(self) -> bool:
        return self.kind in ("fix", "qint")


def _is_pow2(x) -> bool:
    x = np.asarray(x, np.float64).reshape(-1)
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
        return False
    m, _ = np.frexp(x)
    return bool(np.all(m == 0.5))


def _log2(x) -> np.ndarray:
    return np.frexp(np.asarray(x, np.float64))[1].astype(np.int64) - 1


def _jsonable(a):
    if isinstance(a, np.ndarray):
        return a.tolist()
    if isinstance(a, (np.integer,)):
        return int(a)
    if isinstance(a, (np.floating,)):
        return float(a)
    return a


class _Lowering:
    def __init__(self, graph: Graph, rounding: str):
        self.g = graph
        self.mode = rounding
        self.steps: list[Step] = []
        self.consts: dict[str, np.ndarray] = {}
        self.const_formats: dict[str, dict] = {}
        self.tensors: dict[str, dict] = {}
        self.av: dict[int, _AV] = {}
        self.taken = {v.name for v in graph.values()} | {n.name for n in graph.nodes}
        self._tmp = 0

    # -- helpers --------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        while True:
            self._tmp += 1
            name = f"{base}__emu{self._tmp}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def get(self, v: Value | None) -> _AV | None:
        if v is None:
            return None
        a = self.av.get(id(v))
        if a is None:
            if v.is_const:
                a = _AV("const", v.name, const=v.const)
            else:
                a = _AV("float", v.name)  # a graph input
            self.av[id(v)] = a
        return a

    def use_const(self, a: _AV) -> str:
        if a.name not in self.consts:
            self.consts[a.name] = np.asarray(a.const)
        return a.name

    def add_const(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        self.consts[name] = np.asarray(arr)
        return name

    def emit(self, kind: str, node: Node | None, inputs: list[str], outputs: list[str], *, op: str = "",
             attrs: dict | None = None, **params) -> Step:
        s = Step(kind, op, list(inputs), list(outputs), dict(attrs or {}),
                 {k: _jsonable(v) for k, v in params.items()}, node.name if node is not None else "")
        self.steps.append(s)
        return s

    def arg_name(self, a: _AV | None) -> str:
        if a is None:
            return ""
        if a.kind == "const":
            return self.use_const(a)
        if a.kind == "cfix":
            return self.use_const(self.fold_cfix(a))
        return a.name

    def fold_cfix(self, a: _AV) -> _AV:
        """A DequantizeLinear of a constant, evaluated (ONNX semantics) for a float consumer."""
        arr = dequantize_linear(a.const, a.scale.astype(np.float32), a.zp_arr, axis=a.axis if a.axis is not None else 1)
        return _AV("const", a.name + "_dequantized_const", const=arr)

    def to_float(self, a: _AV, node: Node, dtype: str = "float64") -> _AV:
        """Dequantize an integer value into a float tensor (for ops without an integer rule)."""
        if a is None or a.kind in ("float", "const"):
            return a
        if a.kind == "cfix":
            return self.fold_cfix(a)
        out = self.fresh(a.name + "_real")
        self.emit("dequantize", node, [a.name] + ([a.den] if isinstance(a.den, str) else []), [out],
                  scale=np.asarray(a.scale, np.float64), axis=a.axis,
                  den=a.den if not isinstance(a.den, str) else None, dtype=dtype)
        return _AV("float", out)

    # -- driver ---------------------------------------------------------------------
    def run(self) -> Program:
        g = self.g
        for n in g.nodes:
            ins = [self.get(v) for v in n.inputs]
            if (n.op_type != "DequantizeLinear" and ins and all(a is None or a.kind == "const" for a in ins)
                    and n.op_type not in ("RandomNormal", "RandomUniform")):
                outs = float_node_fn(n, [None if a is None else a.const for a in ins])
                for v, arr in zip(n.outputs, outs):
                    self.av[id(v)] = _AV("const", self.fresh(v.name + "_const"), const=np.asarray(arr))
                continue
            handler = getattr(self, "op_" + n.op_type, None)
            if handler is None and n.op_type in MOVE_OPS:
                handler = self.op_move
            if handler is None and n.op_type in LAYER_OPS:
                handler = self.op_layer
            outs = handler(n, ins) if handler is not None else None
            if outs is None:
                outs = self.fallback(n, ins)
            for v, a in zip(n.outputs, outs):
                self.av[id(v)] = a
        outputs = []
        for v in g.outputs:
            a = self.get(v)
            if a.kind == "fix":
                self.emit("dequantize", None, [a.name] + ([a.den] if isinstance(a.den, str) else []), [v.name],
                          scale=np.asarray(a.scale, np.float64), axis=a.axis,
                          den=a.den if not isinstance(a.den, str) else None, dtype="float32")
                outputs.append({"name": v.name, "tensor": v.name})
            elif a.kind == "qint":
                self.emit("raw", None, [a.name], [v.name], zero_point=a.zp, dtype=a.dtype)
                outputs.append({"name": v.name, "tensor": v.name})
            elif a.kind in ("const", "cfix"):
                outputs.append({"name": v.name, "tensor": self.arg_name(a)})
            else:
                outputs.append({"name": v.name, "tensor": a.name})
        inputs = [{"name": v.name, "shape": [d if isinstance(d, int) else (d if isinstance(d, str) else None)
                                             for d in (v.shape or ())], "dtype": str(v.dtype)} for v in g.inputs]
        steps = _fuse_clamps(self.steps, {o["tensor"] for o in outputs})
        return Program(g.name, inputs, outputs, self.consts, steps, self.mode, self.tensors,
                       self.const_formats, dict(g.metadata))

    def fallback(self, n: Node, ins: list[_AV | None]) -> list[_AV]:
        """Evaluate ``n`` in float (float64 on dequantized integer inputs)."""
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            raise UnsupportedOpError(f"node {n.name!r} ({n.op_type}): this QuantizeLinear/DequantizeLinear form "
                                     "(per-axis activations, differing zero points) is not emulated")
        # float32 where the dequantized reals are ONNX DequantizeLinear's float32 values (one scale,
        # no pooling divisor): a fixed-point value from integer steps dequantizes to the float32
        # rounding of its exact real, which is what float32 arithmetic on the DQ outputs gives too
        f32 = n.op_type in FLOAT32_OPS and all(a is None or not a.is_fix or (np.ndim(a.scale) == 0 and a.den == 1.0)
                                               for a in ins)
        fl = [self.to_float(a, n, "float32" if f32 else "float64") for a in ins]
        outs = [v.name for v in n.outputs]
        self.emit("float", n, [self.arg_name(a) for a in fl], outs, op=n.op_type, attrs=n.attrs)
        return [_AV("float", o) for o in outs]

    # -- quantization ops ---------------------------------------------------------------
    def op_QuantizeLinear(self, n: Node, ins):
        x, s, zp = (ins + [None, None])[:3]
        if s is None or s.kind != "const" or np.size(s.const) != 1 or (zp is not None and zp.kind != "const"):
            return None
        scale = float(np.asarray(s.const, np.float32).reshape(()))
        if zp is not None:
            cdt = np.asarray(zp.const).dtype
            z = int(np.asarray(zp.const).reshape(()))
        else:
            od = int(n.attr("output_dtype", 0))
            cdt = _onnx_elem_dtype(n, od, "an output_dtype") if od else np.dtype(np.uint8)
            z = 0
        if cdt.kind not in "iu" or cdt.itemsize > 2:
            return None
        info = np.iinfo(cdt)
        qmin, qmax = int(info.min), int(info.max)
        out = n.outputs[0].name
        pow2 = _is_pow2(scale)
        fmt = {"scale": scale, "frac": int(-_log2(scale)) if pow2 else None, "zero_point": z,
               "qmin": qmin, "qmax": qmax, "dtype": str(cdt)}
        self.tensors[out] = dict(fmt)
        res = _AV("qint", out, scale=np.float64(scale), zp=z, qmin=qmin, qmax=qmax, dtype=str(cdt),
                  bound=float(max(abs(qmin - z), abs(qmax - z))))
        lo, hi = qmin - z, qmax - z
        if x.kind == "float":
            self.emit("quantize", n, [x.name], [out], scale=scale, frac=fmt["frac"], zero_point=z,
                      qmin=qmin, qmax=qmax, mode=self.mode if pow2 else "half-even")
            return [res]
        if not x.is_fix:
            return None
        if x.den != 1.0 and not x.integral:
            return [self._quantize_real(n, x, res, fmt)]
        den_name = x.den if isinstance(x.den, str) else None
        den = None if den_name else float(x.den)
        s_in = np.asarray(x.scale, np.float64)
        ratio = s_in / scale
        C = int(np.size(s_in))
        lo_a = np.full(C, lo, np.float64)
        hi_a = np.full(C, hi, np.float64)
        if pow2 and _is_pow2(s_in):
            shift = -_log2(ratio).reshape(-1)  # q = round(ints * 2^-shift / den)
            self.emit("requant", n, [x.name] + ([den_name] if den_name else []), [out],
                      shift=shift, axis=x.axis if C > 1 else None, den=den, lo=lo_a, hi=hi_a, mode=self.mode)
        else:
            if den_name:
                return [self._quantize_real(n, x, res, fmt)]
            # onnxruntime: float multiplier in float32 (X_scale * W_scale / Y_scale), ties to even
            mult = (np.asarray(s_in, np.float32).reshape(-1) / np.float32(scale * den)).astype(np.float32)
            self.emit("requant", n, [x.name], [out], mult=mult.astype(np.float64), axis=x.axis if C > 1 else None,
                      den=None, lo=lo_a, hi=hi_a, mode="half-even")
        return [res]

    def _quantize_real(self, n: Node, x: _AV, res: _AV, fmt: dict) -> _AV:
        f = self.to_float(x, n)
        self.emit("quantize", n, [f.name], [res.name], scale=fmt["scale"], frac=fmt["frac"],
                  zero_point=res.zp, qmin=res.qmin, qmax=res.qmax,
                  mode=self.mode if fmt["frac"] is not None else "half-even")
        return res

    def op_DequantizeLinear(self, n: Node, ins):
        x, s, zp = (ins + [None, None])[:3]
        if s is None or s.kind != "const" or (zp is not None and zp.kind != "const"):
            return None
        scale = np.asarray(s.const, np.float32).astype(np.float64)
        if x.kind == "const":
            if np.asarray(x.const).dtype.kind not in "iu":
                return None
            axis = int(n.attr("axis", 1)) if scale.size > 1 else None
            zpa = None if zp is None else np.asarray(zp.const)
            if axis is not None:
                axis %= np.ndim(x.const)
            a = _AV("cfix", x.name, scale=scale.reshape(-1) if scale.size > 1 else scale.reshape(()), axis=axis,
                    const=np.asarray(x.const), zp_arr=zpa)
            self.const_formats[x.name] = {
                "scale": scale.reshape(-1).tolist() if scale.size > 1 else float(scale.reshape(-1)[0]),
                "frac": (-_log2(scale)).reshape(-1).tolist() if _is_pow2(scale) else None,
                "axis": axis, "dtype": str(np.asarray(x.const).dtype),
                "zero_point": None if zpa is None else zpa.reshape(-1).tolist()}
            return [a]
        if x.kind != "qint" or scale.size != 1:
            return None
        z = 0 if zp is None else int(np.asarray(zp.const).reshape(()))
        if z != x.zp:
            return None
        return [_AV("fix", x.name, scale=scale.reshape(()), bound=x.bound, integral=True)]

    # -- layers ---------------------------------------------------------------------------
    def op_layer(self, n: Node, ins):
        x = ins[0]
        w = ins[1] if len(ins) > 1 else None
        b = ins[2] if len(ins) > 2 else None
        op = n.op_type
        if x is None or not x.is_fix or x.per_channel or x.den != 1.0 or not x.integral:
            return None
        if w is None or w.kind != "cfix" or (w.zp_arr is not None and np.any(w.zp_arr != 0)):
            return None
        if op == "Gemm" and (float(n.attr("alpha", 1.0)) != 1.0 or float(n.attr("beta", 1.0)) != 1.0):
            return None
        wc = np.asarray(w.const)
        if op == "Conv":
            w_axis = 0
        elif op == "ConvTranspose":
            w_axis = 1
        elif op == "Gemm":
            w_axis = 0 if n.attr("transB", 0) else 1
        else:
            if wc.ndim != 2:
                return None
            w_axis = 1
        if w.per_channel and w.axis != w_axis:
            return None
        out_axis = -1 if op == "MatMul" else 1
        acc_scale = np.float64(x.scale) * np.asarray(w.scale, np.float64)  # exact: float32 x float32
        wabs = np.abs(wc.astype(np.float64))
        per_out = np.moveaxis(wabs, w_axis, 0).reshape(wc.shape[w_axis], -1).sum(axis=1)
        bound = float(per_out.max() if per_out.size else 0.0) * x.bound
        bname = ""
        if b is not None:
            if b.kind != "cfix" or (b.zp_arr is not None and np.any(b.zp_arr != 0)):
                return None
            bs = np.asarray(b.scale, np.float64)
            ref = np.broadcast_to(acc_scale, np.shape(bs)) if np.ndim(bs) else acc_scale
            if np.ndim(bs) == 0 and np.ndim(acc_scale) > 0:
                ref, bs = acc_scale, np.full(np.shape(acc_scale), float(bs))
            exact = _is_pow2(acc_scale) and _is_pow2(bs)
            if exact and not np.array_equal(np.broadcast_to(bs, np.shape(ref)), ref):
                return None
            if not exact and not np.allclose(bs, ref, rtol=1e-6, atol=0):
                return None
            bname = self.use_const(b)
            bound += float(np.max(np.abs(np.asarray(b.const, np.float64)))) if np.size(b.const) else 0.0
        if bound >= F64_EXACT:
            raise UnsupportedOpError(f"layer {n.name!r}: its integer accumulator can reach 2^{math.log2(bound):.0f}, "
                                     "beyond the exact range of the emulator (2^53)")
        dtype = "float32" if bound < F32_EXACT else "float64"
        out = n.outputs[0].name
        self.emit("layer", n, [x.name, self.use_const(w), bname], [out], op=op, attrs=n.attrs,
                  dtype=dtype, out_axis=out_axis, bound=bound)
        per_ch = np.size(acc_scale) > 1
        return [_AV("fix", out, scale=acc_scale.reshape(-1) if per_ch else acc_scale.reshape(()),
                    axis=out_axis if per_ch else None, bound=bound, integral=True)]

    # -- activations ----------------------------------------------------------------------
    def _clamp(self, n: Node, x: _AV, lo_real, hi_real):
        out = n.outputs[0].name
        if x.kind == "qint":
            return None
        if x.den != 1.0:
            return None
        s = np.asarray(x.scale, np.float64).reshape(-1)
        lo_r = np.asarray(lo_real, np.float64).reshape(-1)
        hi_r = np.asarray(hi_real, np.float64).reshape(-1)
        # bounds per channel (a Clip rescaled by cross-layer equalization) clamp along the channel axis
        bounds_axis = 1 if max(lo_r.size, hi_r.size) > 1 else None
        axis = x.axis if x.per_channel else bounds_axis
        if bounds_axis is not None and axis != bounds_axis:
            return None
        lo = lo_r / s
        hi = hi_r / s
        integral = x.integral and bool(np.all((lo == np.floor(lo)) | ~np.isfinite(lo))) and bool(
            np.all((hi == np.floor(hi)) | ~np.isfinite(hi)))
        if axis is not None:
            C = max(lo.size, hi.size)
            lo, hi = np.broadcast_to(lo, (C,)), np.broadcast_to(hi, (C,))
        self.emit("clamp", n, [x.name], [out], lo=np.where(np.isfinite(lo), lo, -1e300),
                  hi=np.where(np.isfinite(hi), hi, 1e300), axis=axis)
        bound = min(x.bound, float(np.max(np.maximum(np.abs(np.where(np.isfinite(lo), lo, 0)),
                                                      np.abs(np.where(np.isfinite(hi), hi, 0))))) if
                    np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) else x.bound)
        return [_AV("fix", out, scale=x.scale, axis=x.axis, bound=bound, integral=integral)]

    def op_Relu(self, n: Node, ins):
        x = ins[0]
        if not x.is_fix:
            return None
        return self._clamp(n, x, 0.0, np.inf)

    def op_Clip(self, n: Node, ins):
        x = ins[0]
        lo = ins[1] if len(ins) > 1 else None
        hi = ins[2] if len(ins) > 2 else None
        if any(a is not None and a.kind != "const" for a in (lo, hi)):
            return None
        if any(a is not None and np.asarray(a.const).size > 1 for a in (lo, hi)):
            # per-channel bounds (cross-layer equalization through a ReLU6): on an accumulator only
            if not x.is_fix:
                return None
            return self._clamp(n, x, -np.inf if lo is None else np.asarray(lo.const, np.float64),
                               np.inf if hi is None else np.asarray(hi.const, np.float64))
        lo_v = -np.inf if lo is None else float(np.asarray(lo.const).reshape(()))
        hi_v = np.inf if hi is None else float(np.asarray(hi.const).reshape(()))
        if x.kind == "qint":  # a clamp in the integer domain (a narrow format in a wider container)
            out = n.outputs[0].name
            q_lo = max(x.qmin, int(math.ceil(lo_v)) if np.isfinite(lo_v) else x.qmin)
            q_hi = min(x.qmax, int(math.floor(hi_v)) if np.isfinite(hi_v) else x.qmax)
            self.emit("clamp", n, [x.name], [out], lo=[float(q_lo - x.zp)], hi=[float(q_hi - x.zp)], axis=None)
            self.tensors[out] = dict(self.tensors.get(x.name, {}), qmin=q_lo, qmax=q_hi)
            return [_AV("qint", out, scale=x.scale, zp=x.zp, qmin=q_lo, qmax=q_hi, dtype=x.dtype,
                        bound=float(max(abs(q_lo - x.zp), abs(q_hi - x.zp))))]
        if not x.is_fix:
            return None
        return self._clamp(n, x, lo_v, hi_v)

    # -- arithmetic -------------------------------------------------------------------------
    def _aligned(self, xs: list[_AV]):
        """Common scale and power-of-two multipliers aligning ``xs`` (None if impossible)."""
        if any(not a.is_fix or a.den != 1.0 for a in xs):
            return None
        if any(a.per_channel for a in xs):
            if not all(a.per_channel and a.axis == xs[0].axis and np.array_equal(a.scale, xs[0].scale) for a in xs):
                return None
            return xs[0].scale, [1.0] * len(xs)
        scales = [float(a.scale) for a in xs]
        smin = min(scales)
        mult = [s / smin for s in scales]
        if all(m == 1.0 for m in mult):
            return np.float64(smin), mult
        if not all(_is_pow2(m) for m in mult):
            return None
        return np.float64(smin), mult

    def _add(self, n: Node, xs: list[_AV], signs: list[float]):
        al = self._aligned(xs)
        if al is None:
            return None
        scale, mult = al
        out = n.outputs[0].name
        bound = sum(m * a.bound for m, a in zip(mult, xs))
        if bound >= F64_EXACT:
            return None
        self.emit("add", n, [a.name for a in xs], [out], mult=[m * s for m, s in zip(mult, signs)], bound=bound)
        return [_AV("fix", out, scale=scale, axis=xs[0].axis, bound=bound, integral=all(a.integral for a in xs))]

    def op_Add(self, n, ins):
        return self._add(n, ins[:2], [1.0, 1.0])

    def op_Sub(self, n, ins):
        return self._add(n, ins[:2], [1.0, -1.0])

    def op_Sum(self, n, ins):
        return self._add(n, list(ins), [1.0] * len(ins))

    def op_Neg(self, n, ins):
        return self._add(n, ins[:1], [-1.0])

    def op_Mul(self, n, ins):
        a, b = ins[:2]
        if a.kind == "const" and b.is_fix:
            a, b = b, a
        if a.is_fix and b.kind == "const" and np.size(b.const) == 1 and a.den == 1.0:
            c = float(np.asarray(b.const).reshape(()))
            if c != 0 and _is_pow2(abs(c)):
                out = n.outputs[0].name
                self.emit("add", n, [a.name], [out], mult=[1.0 if c > 0 else -1.0], bound=a.bound)
                return [_AV("fix", out, scale=np.asarray(a.scale) * abs(c), axis=a.axis, bound=a.bound,
                            integral=a.integral)]
            return None
        if a.is_fix and b.is_fix and a.den == 1.0 and b.den == 1.0 and not (a.per_channel and b.per_channel):
            bound = a.bound * b.bound
            if bound >= F64_EXACT:
                return None
            out = n.outputs[0].name
            self.emit("mul", n, [a.name, b.name], [out], bound=bound)
            pc = a if a.per_channel else b
            return [_AV("fix", out, scale=np.asarray(a.scale, np.float64) * np.asarray(b.scale, np.float64),
                        axis=pc.axis if pc.per_channel else None, bound=bound, integral=a.integral and b.integral)]
        return None

    def op_Div(self, n, ins):
        a, b = ins[:2]
        if a.is_fix and b.kind == "const" and np.size(b.const) == 1 and a.den == 1.0:
            c = float(np.asarray(b.const).reshape(()))
            if c > 0 and _is_pow2(c):
                out = n.outputs[0].name
                self.emit("add", n, [a.name], [out], mult=[1.0], bound=a.bound)
                return [_AV("fix", out, scale=np.asarray(a.scale) / c, axis=a.axis, bound=a.bound,
                            integral=a.integral)]
        return None

    def op_GlobalAveragePool(self, n, ins):
        x = ins[0]
        shp = n.inputs[0].shape
        if not x.is_fix or x.den != 1.0 or not x.integral:
            return None
        if x.per_channel and x.axis != 1:
            return None
        out = n.outputs[0].name
        if shp is not None and all(isinstance(d, int) for d in shp[2:]):
            count = int(np.prod(shp[2:]))
            self.emit("sum_pool", n, [x.name], [out], op="GlobalAveragePool", attrs=n.attrs, den=None)
            return [_AV("fix", out, scale=x.scale, axis=x.axis, den=float(count), bound=x.bound * count,
                        integral=True)]
        # spatial size known only at run time: the step also yields the window size
        cnt = self.fresh(out + "_count")
        self.emit("sum_pool", n, [x.name], [out, cnt], op="GlobalAveragePool", attrs=n.attrs, den=None)
        return [_AV("fix", out, scale=x.scale, axis=x.axis, den=cnt, bound=x.bound * float(1 << 24),
                    integral=True)]

    def op_AveragePool(self, n, ins):
        x = ins[0]
        shp = n.inputs[0].shape
        if not x.is_fix or x.den != 1.0 or not x.integral or shp is None or not all(
                isinstance(d, int) for d in shp[2:]):
            return None
        if x.per_channel and x.axis != 1:
            return None
        area = int(np.prod(n.attr("kernel_shape")))
        probe = Node("AveragePool", n.name, dict(n.attrs, count_include_pad=1))
        probe.outputs = [Value("probe")]
        ones = np.ones((1, 1) + tuple(shp[2:]), np.float64)
        inside = np.rint(float_node_fn(probe, [ones])[0] * area)  # real (unpadded) cells per window
        if int(n.attr("count_include_pad", 0)):
            full = float_node_fn(probe, [np.ones((1, 1) + tuple(shp[2:]), np.float64)])[0]
            cnt = np.full_like(full, float(area))
        else:
            cnt = inside
        out = n.outputs[0].name
        if np.all(cnt == cnt.reshape(-1)[0]):
            den = float(cnt.reshape(-1)[0])
            self.emit("sum_pool", n, [x.name], [out], op="AveragePool", attrs=n.attrs, den=den)
            return [_AV("fix", out, scale=x.scale, axis=x.axis, den=den, bound=x.bound * area, integral=True)]
        cname = self.add_const(out + "_count", cnt.astype(np.float64))
        self.emit("sum_pool", n, [x.name, cname], [out], op="AveragePool", attrs=n.attrs, den=None)
        return [_AV("fix", out, scale=x.scale, axis=x.axis, den=cname, bound=x.bound * area, integral=True)]

    # -- shapes -------------------------------------------------------------------------------
    def op_Shape(self, n: Node, ins):
        """The shape of an integer tensor is the shape of the real one: read without dequantizing."""
        x = ins[0]
        if x is None or not x.is_fix:
            return None
        outs = [v.name for v in n.outputs]
        self.emit("float", n, [x.name], outs, op=n.op_type, attrs=n.attrs)
        return [_AV("float", o) for o in outs]

    op_Size = op_Shape

    # -- data movement ------------------------------------------------------------------------
    def op_move(self, n: Node, ins):
        # a shape, index or count computed at run time (Reshape's shape, Slice's starts, ...): an
        # integer tensor of the host, not data
        index = {i for i, a in enumerate(ins) if i > 0 and a is not None and a.kind == "float"
                 and n.inputs[i].dtype.kind in "iu"}
        data_idx = [i for i, a in enumerate(ins) if a is not None and a.kind != "const" and i not in index]
        if not data_idx:
            return None
        if n.op_type == "Gather" and data_idx != [0]:
            return None
        xs = [ins[i] for i in data_idx]
        if any(not a.is_fix for a in xs):
            return None
        first = xs[0]
        if (first.per_channel or isinstance(first.den, str)) and n.op_type not in CHANNEL_SAFE_MOVES:
            return None
        names = [self.arg_name(a) for a in ins]
        if len(xs) > 1:  # Concat: align scales by exact multiplications
            if any(a.den != 1.0 for a in xs):
                return None
            al = self._aligned(xs)
            if al is None:
                return None
            scale, mult = al
            for k, (i, a, m) in enumerate(zip(data_idx, xs, mult)):
                if m != 1.0:
                    t = self.fresh(a.name + "_aligned")
                    self.emit("add", n, [a.name], [t], mult=[m], bound=a.bound * m)
                    names[i] = t
            bound = max(a.bound * m for a, m in zip(xs, mult))
        else:
            scale, bound = first.scale, first.bound
        if n.op_type == "Pad" and len(ins) > 2 and ins[2] is not None:
            pv = float(np.asarray(ins[2].const).reshape(()))
            if pv != 0.0:
                pq = pv / float(scale)
                if pq != math.floor(pq) or np.ndim(scale):
                    return None
                names[2] = self.add_const(n.name + "_pad_value", np.asarray(pq, np.float32))
                bound = max(bound, abs(pq))
        outs = [v.name for v in n.outputs]
        self.emit("move", n, names, outs, op=n.op_type, attrs=n.attrs)
        return [_AV("fix", o, scale=scale, axis=first.axis, den=first.den, bound=bound,
                    integral=all(a.integral for a in xs)) for o in outs]


def _round_mode(y: np.ndarray, mode: str) -> np.ndarray:
    return np.floor(y + 0.5) if mode == "half-up" else np.rint(y)


def _fuse_clamps(steps: list[Step], outputs: set[str]) -> list[Step]:
    """Fold a Relu/Clip clamp of an accumulator into the shift requantization that reads it:
    rounding is monotone, so round(clamp(a, lo, hi) / 2^k) = clamp(round(a / 2^k), round(lo / 2^k),
    round(hi / 2^k)) -- one pass over the data instead of two, as a chip clamps after the shift."""
    readers: dict[str, int] = {}
    for s in steps:
        for x in s.inputs:
            readers[x] = readers.get(x, 0) + 1
    out: list[Step] = []
    i = 0
    while i < len(steps):
        s = steps[i]
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        if (s.kind == "clamp" and nxt is not None and nxt.kind == "requant" and "shift" in nxt.params
                and nxt.params.get("den") in (None, 1.0) and len(nxt.inputs) == 1 and nxt.inputs[0] == s.outputs[0]
                and readers.get(s.outputs[0], 0) == 1 and s.outputs[0] not in outputs):
            shift = np.asarray(nxt.params["shift"], np.int64).reshape(-1)
            lo_c = np.asarray(s.params["lo"], np.float64).reshape(-1)
            hi_c = np.asarray(s.params["hi"], np.float64).reshape(-1)
            C = len(shift)
            if len(lo_c) == 1 or (len(lo_c) == C and s.params["axis"] == nxt.params["axis"]):
                m = np.ldexp(1.0, -shift)
                lo = np.broadcast_to(np.asarray(nxt.params["lo"], np.float64), (C,))
                hi = np.broadcast_to(np.asarray(nxt.params["hi"], np.float64), (C,))
                lo_q = np.where(np.abs(lo_c) < 1e299, _round_mode(lo_c * m, nxt.params["mode"]), -np.inf)
                hi_q = np.where(np.abs(hi_c) < 1e299, _round_mode(hi_c * m, nxt.params["mode"]), np.inf)
                params = dict(nxt.params, lo=np.maximum(lo, lo_q).tolist(), hi=np.minimum(hi, hi_q).tolist())
                out.append(Step("requant", "", list(s.inputs), list(nxt.outputs), {}, params, nxt.node))
                i += 2
                continue
        out.append(s)
        i += 1
    return out


def lower(graph: Graph, rounding: str | None = None) -> Program:
    """The integer program of a QDQ graph. ``rounding``: requantization ties (default: the
    graph's ``mpqc.rounding`` metadata, else ONNX's half to even)."""
    mode = rounding or graph.metadata.get("mpqc.rounding") or "half-even"
    if mode not in ROUNDINGS:
        raise CompilerError(f"rounding {mode!r} is unknown; use one of {', '.join(ROUNDINGS)}")
    return _Lowering(graph, mode).run()


def _prepare_graph(graph: Graph) -> Graph:
    """The QDQ graph to lower: ``graph`` itself, or, for an IR annotated by choose-formats but
    without Q/DQ nodes yet, a copy with insert-qdq applied."""
    if is_qdq_graph(graph):
        return graph
    if any(v.qformat is not None for v in graph.values() if not v.is_const):
        g = graph.copy()
        insert_qdq(g)
        return g
    raise CompilerError(f"model {graph.name!r} has no quantization (no QuantizeLinear/DequantizeLinear and "
                        "no formats): compile it with -O1 or higher first")


def load_program(model, *, rounding: str | None = None) -> Program:
    """A Program from a Graph, a Program, a QDQ .onnx path or a bundle .npz path."""
    if isinstance(model, Program):
        return model
    if isinstance(model, Graph):
        return lower(_prepare_graph(model), rounding)
    path = Path(model)
    if path.suffix == ".npz":
        prog = load_bundle(path)
        if rounding is not None and rounding != prog.rounding:
            raise CompilerError(f"bundle {str(path)!r} was compiled for rounding {prog.rounding}; "
                                f"it cannot be run with {rounding}")
        return prog
    return lower(_prepare_graph(load_qdq_graph(path)), rounding)


def run_emulator(model, x: np.ndarray, *, batch_size: int = 64, progress: str | None = None,
                 rounding: str | None = None, outputs: str = "first") -> np.ndarray | dict:
    """Run ``model`` (Graph, Program, .onnx or bundle .npz) on ``x`` in batches with the
    fixed-point emulator; returns the first output (``outputs="all"``: every output by name)."""
    return run_program(load_program(model, rounding=rounding), x, batch_size=batch_size, progress=progress,
                       outputs=outputs)
