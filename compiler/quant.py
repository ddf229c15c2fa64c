"""Where a network is quantized, with which formats, and how a bit assignment is applied.

**Quantization plan** (``QuantPlan``, structural, computed from the float graph):

* *host* nodes: float preprocessing on the graph input before any layer (e.g. the
  ``(x/255 - m)/s`` normalisation of EfficientNet). They stay float everywhere;
  the chip's input is the first quantized tensor.
* *input* points: the tensors where the quantized region starts (a graph input or a
  host output read by a quantized op).
* *layer* points: each layer (Conv/Gemm/MatMul with constant weights) quantizes its
  weights (per output channel when the target allows), its bias at the
  accumulator's scale (int32, frac = input frac + weight frac), and one output
  tensor: its own output, or the output of a Relu/Clip that alone reads it (the
  activation is fused, as an NPU and onnxruntime's QLinearConv do).
* *arith* points: outputs of value-changing ops without weights (Add, Mul, Concat,
  pooling averages, Sigmoid, ...): requantized at the widest width of their inputs.
* *layout* points: outputs of MaxPool, Flatten, Reshape, Transpose, Pad, unfused
  Relu/Clip ...: integers pass through unchanged, so they share their input's format.
* tensors that carry shapes or integers (``integer_values``: an integer or bool type, the
  output of Shape/Size/ArgMax..., shape arithmetic on them) are no points at all: they stay
  exact integers, computed by the host; a node reading both (``Reshape(x, shape)``) quantizes
  only its float input.

**Bit assignment** (``BitConfig``): ``{layer: (weight_bits, act_bits)}`` plus the
width of the input points. ``FormatTable`` gives the Qm.n format of every point at
any width, chosen once from the calibration statistics (docs/FIXED_POINT.md: MSE
search around the range-derived fractional length). ``apply_config`` writes the
decisions onto the IR: ``node.qconfig`` and ``value.qformat``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx.helper import tensor_dtype_to_np_dtype

from ..core.errors import CompilerError
from ..core.ir import Graph, Node, Value
from ..core.qformat import LayerQConfig, QFormat, choose_frac_mse, choose_frac_mse_per_channel, qrange
from .passes import Analysis
from .ranges import ActivationRanges
from .targets import Target

FUSABLE_ACTIVATIONS = ("Relu", "Clip")
LAYOUT_OPS = ("MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
              "Identity", "Dropout", "Relu", "Clip", "Pad", "Slice", "Split")
#: ops computed in float by the host before the chip (only ahead of the first layer)
HOST_OPS = ("Div", "Sub", "Mul", "Add", "Cast", "Transpose", "Reshape", "Identity", "Pad", "Clip")


#: ops whose outputs are integers whatever their inputs (shapes, sizes, indices)
INTEGER_OPS = ("Shape", "Size", "NonZero", "ArgMax", "ArgMin")


def integer_values(graph: Graph) -> set[int]:
    """ids of the non-constant values that carry shapes or integers, never a quantization format:
    of an integer or bool type, outputs of ``INTEGER_OPS`` or of a Cast to a non-float type, and
    whatever is computed from such values alone (Gather/Slice/Concat/Mul on a shape, even a Cast of
    a shape to float). Types alone are not enough: a graph built by hand may leave a Shape's output
    typed float32."""
    out = {id(v) for v in graph.inputs if v.dtype.kind in "iub"}
    for n in graph.nodes:
        acts = [v for v in n.inputs if v is not None and not v.is_const]
        ints = (n.op_type in INTEGER_OPS or (bool(acts) and all(id(v) in out for v in acts))
                or (n.op_type == "Cast" and np.dtype(tensor_dtype_to_np_dtype(int(n.attr("to", 1)))).kind != "f"))
        for o in n.outputs:
            if ints or o.dtype.kind in "iub":
                out.add(id(o))
    return out


@dataclass(eq=False)
class QuantPoint:
    value: Value
    kind: str  # "input" | "layer" | "arith" | "layout"
    layer: Node | None = None  # owner layer for kind == "layer"
    source: Value | None = None  # format source for kind == "layout"
    inputs: tuple = ()  # for arith: the quantized inputs whose widest width it takes


@dataclass(eq=False)
class QuantPlan:
    graph: Graph
    layers: list[Node]
    points: dict[Value, QuantPoint]
    host: set[Node]
    layer_out: dict[Node, Value]
    fused: dict[Node, Node | None]  # layer -> fused activation node

    @classmethod
    def build(cls, graph: Graph) -> "QuantPlan":
        layers = graph.layers()
        layer_ids = {id(n) for n in layers}
        # host region: nodes not downstream of any layer and of host-able op types
        downstream: set[int] = set()
        host: set[Node] = set()
        for n in graph.nodes:
            after_layer = any(v is not None and v.producer is not None and
                              (id(v.producer) in downstream or id(v.producer) in layer_ids)
                              for v in n.inputs)
            if id(n) in layer_ids or after_layer:
                downstream.add(id(n))
            elif n.op_type in HOST_OPS:
                host.add(n)
            else:
                downstream.add(id(n))
        host_ids = {id(n) for n in host}
        ints = integer_values(graph)
        points: dict[Value, QuantPoint] = {}
        layer_out: dict[Node, Value] = {}
        fused: dict[Node, Node | None] = {}

        def float_source(v: Value) -> bool:
            return not v.is_const and (v.producer is None or id(v.producer) in host_ids)

        def ensure_input(v: Value):
            if v not in points and float_source(v):
                points[v] = QuantPoint(v, "input")

        fused_acts: set[int] = set()
        for n in graph.nodes:
            if id(n) in host_ids:
                continue
            if id(n) in layer_ids:
                ensure_input(n.inputs[0])
                out = n.outputs[0]
                act = None
                cons = out.consumers()
                if (len(out.uses) == 1 and out not in graph.outputs and cons[0].op_type in FUSABLE_ACTIVATIONS
                        and _clip_bounds_const(cons[0])):
                    act = cons[0]
                    fused_acts.add(id(act))
                    out = act.outputs[0]
                layer_out[n] = out
                fused[n] = act
                points[out] = QuantPoint(out, "layer", layer=n)
                continue
            if id(n) in fused_acts:
                continue
            if all(id(o) in ints for o in n.outputs):
                continue  # shapes and integers (Shape, its Gather/Concat ...): no format
            acts = [v for v in n.inputs if v is not None and not v.is_const and id(v) not in ints]
            for v in acts:
                ensure_input(v)
            if not acts or any(v not in points for v in acts):
                raise CompilerError(f"node {n.name!r} ({n.op_type}) reads a tensor that is neither quantized "
                                    "nor a constant; mpqc cannot place it in the fixed-point region")
            if n.op_type in LAYOUT_OPS and len(acts) == 1 and not (n.op_type == "Pad" and not zero_pad(n)):
                for o in n.outputs:
                    points[o] = QuantPoint(o, "layout", source=_root(points, acts[0]))
            else:
                for o in n.outputs:
                    points[o] = QuantPoint(o, "arith", inputs=tuple(acts))
        return cls(graph, layers, points, host, layer_out, fused)

    def act_values(self) -> list[Value]:
        """Values that get their own format (everything but layout points)."""
        return [v for v, p in self.points.items() if p.kind != "layout"]


def _root(points: dict[Value, QuantPoint], v: Value) -> Value:
    p = points[v]
    while p.kind == "layout":
        v = p.source
        p = points[v]
    return v


def zero_pad(n: Node) -> bool:
    """A constant Pad with value 0 (or none)."""
    mode = n.attr("mode", "constant")
    val = n.input(2)
    return mode in ("constant", b"constant") and (val is None or (val.is_const and not np.any(val.const)))


def _clip_bounds_const(n: Node) -> bool:
    if n.op_type != "Clip":
        return True
    return all(v is None or v.is_const for v in n.inputs[1:])


def weight_axis(node: Node) -> int:
    """Output-channel axis of a layer's weight tensor."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if node.attr("transB", 0) else 1
    return node.weight.const.ndim - 1  # MatMul: [K, N]


@dataclass(eq=False)
class BitConfig:
    """Per-layer (weight bits, activation bits) and the width of the input points."""
    bits: dict[Node, tuple[int, int]]
    input_bits: int

    def copy(self) -> "BitConfig":
        return BitConfig(dict(self.bits), self.input_bits)

    def with_layer(self, node: Node, wa: tuple[int, int]) -> "BitConfig":
        c = self.copy()
        c.bits[node] = tuple(wa)
        return c

    def key(self, layers: list[Node]) -> tuple:
        return (self.input_bits,) + tuple(self.bits[n] for n in layers)

    @classmethod
    def uniform(cls, layers: list[Node], w: int, a: int) -> "BitConfig":
        return cls({n: (w, a) for n in layers}, a)


class FormatTable:
    """Formats of every quantization point at any width, chosen once and cached."""

    def __init__(self, plan: QuantPlan, stats: dict, target: Target, *, search: int = 2):
        self.plan = plan
        self.stats = stats
        self.target = target
        self.search = search
        self._w: dict[tuple, QFormat] = {}
        self._a: dict[tuple, QFormat] = {}

    def signed(self, v: Value) -> bool:
        s = self.stats.get(v)
        return not (s is not None and s.nonnegative)

    @property
    def float_scales(self) -> bool:
        """The target's scale kind is float (onnxruntime's int8 path), not powers of two."""
        return self.target.scale == "float"

    def weight_format(self, node: Node, bits: int) -> QFormat:
        key = (id(node), bits)
        f = self._w.get(key)
        if f is None and self.float_scales:
            f = float_weight_format(node.weight.const, bits, weight_axis(node) if self.target.per_channel else None)
            f = self._w[key] = self._fit_bias_float(node, f)
        if f is None:
            w = node.weight.const
            cap = self._frac_cap(node)
            if self.target.per_channel and w.ndim >= 2:
                ax = weight_axis(node)
                fr = choose_frac_mse_per_channel(w, bits, ax, search=self.search)
                if cap is not None:
                    fr = np.minimum(fr, cap)
                f = QFormat(bits, tuple(int(x) for x in fr), True, ax)
            else:
                fr = choose_frac_mse(w, bits, True, search=self.search)
                if cap is not None:
                    fr = min(fr, int(np.min(cap)))
                f = QFormat(bits, int(fr), True, None)
            self._w[key] = f
        return f

    def _fit_bias_float(self, node: Node, f: QFormat) -> QFormat:
        """Float-scale kind: widen weight scales whose bias would not fit int32 at s_in * s_w,
        as onnxruntime's quantizer does (``_adjust_weight_scale_for_int32_bias``)."""
        if node.bias is None or node.inputs[0] not in self.plan.points:
            return f
        src = _root(self.plan.points, node.inputs[0])
        s_in = float(np.float32(self.act_format(src, max(self.target.act_bits)).scale()))
        b = np.abs(node.bias.const.astype(np.float64)).reshape(-1)
        qrange = float(np.iinfo(np.int32).max) - float(np.iinfo(np.int32).min + 1)
        sw = np.asarray(f.fscale, np.float64).reshape(-1)
        if not f.per_channel:
            b = np.array([b.max() if b.size else 0.0])
        need = 1.0001 * 2.0 * b / qrange
        cand = s_in * sw
        bump = (cand < need) & (cand > 0)
        if not np.any(bump):
            return f
        new = np.where(bump, sw * (need / np.where(cand > 0, cand, 1.0)), sw).astype(np.float32)
        if f.per_channel:
            return QFormat(f.bits, f.frac, True, f.axis, fscale=tuple(float(x) for x in new))
        return QFormat(f.bits, 0, True, None, fscale=float(new[0]))

    def set_weight_format(self, node: Node, bits: int, fmt: QFormat) -> None:
        """Record ``fmt`` as ``node``'s weight format at ``bits`` (a pass that re-quantized the weights in a
        format of its own, such as optimize-rounding's finer channels, keeps the table in step with the IR)."""
        self._w[(id(node), bits)] = fmt

    def frac_cap(self, node: Node) -> np.ndarray | None:
        """Largest weight fractional length per channel whose bias fits the accumulator (None: no limit)."""
        return None if self.float_scales else self._frac_cap(node)

    def _frac_cap(self, node: Node) -> np.ndarray | None:  # power-of-two formats only
        """Largest weight fractional length per channel that keeps the bias inside the
        accumulator (with one bit of headroom) at the widest input format on the target.

        The bias is stored at the accumulator scale 2^-(n_in + n_w); a channel with tiny
        weights but a large bias would otherwise overflow int32."""
        if node.bias is None:
            return None
        src = _root(self.plan.points, node.inputs[0]) if node.inputs[0] in self.plan.points else None
        if src is None:
            return None
        n_in = max(int(np.max(self.act_format(src, b).frac_array())) for b in self.target.act_bits)
        b = np.abs(node.bias.const.astype(np.float64)).reshape(-1)
        head = self.target.accumulator_bits - 2  # sign bit and one bit of headroom
        with np.errstate(divide="ignore"):
            cap = np.where(b > 0, head - n_in - np.ceil(np.log2(np.where(b > 0, b, 1.0))), 10 ** 6)
        return cap.astype(np.int64)

    def act_format(self, v: Value, bits: int) -> QFormat:
        key = (id(v), bits)
        f = self._a.get(key)
        if f is None:
            s = self.stats.get(v)
            if s is None or s.count == 0:
                raise CompilerError(f"tensor {v.name!r} has no calibration statistics")
            if self.float_scales:
                self._a[key] = f = float_act_format(s.min, s.max, bits)
                return f
            signed = self.signed(v)
            f = QFormat(bits, choose_frac_mse(s.sample, bits, signed, search=self.search, absmax=s.absmax), signed)
            self._a[key] = f
        return f

    def bias_format(self, node: Node, in_fmt: QFormat, w_fmt: QFormat) -> QFormat:
        acc = self.target.accumulator_bits
        if w_fmt.fscale is not None or in_fmt.fscale is not None:
            # onnxruntime's convention: int32 at scale s_in * s_w (a float32 product), zero point 0
            sc = np.float32(in_fmt.scale()) * np.asarray(w_fmt.scale(), np.float32)
            if w_fmt.per_channel:
                return QFormat(acc, 0, True, 0, fscale=tuple(float(x) for x in sc.astype(np.float32)))
            return QFormat(acc, 0, True, None, fscale=float(np.float32(sc)))
        f = np.asarray(w_fmt.frac, dtype=np.int64) + int(np.asarray(in_fmt.frac))
        if w_fmt.per_channel:
            return QFormat(acc, tuple(int(x) for x in f), True, 0)
        return QFormat(acc, int(f), True, None)

    # -- assignment -> formats ------------------------------------------------------
    def formats(self, config: BitConfig) -> dict[Value, QFormat]:
        """The format of every quantization point under ``config``."""
        plan = self.plan
        out: dict[Value, QFormat] = {}
        for v, p in plan.points.items():
            if p.kind == "input":
                out[v] = self.act_format(v, config.input_bits)
            elif p.kind == "layer":
                out[v] = self.act_format(v, config.bits[p.layer][1])
            elif p.kind == "arith":
                bits = max(out[i].bits for i in p.inputs)
                out[v] = self.act_format(v, bits)
            else:
                out[v] = out[_root(plan.points, v)]
        return out

    def weight_formats(self, config: BitConfig) -> dict[Node, QFormat]:
        return {n: self.weight_format(n, config.bits[n][0]) for n in self.plan.layers}


def apply_config(graph: Graph, plan: QuantPlan, table: FormatTable, config: BitConfig,
                 note: str | None = None) -> None:
    """Write ``config`` onto the IR: ``node.qconfig`` for layers, ``value.qformat`` for tensors."""
    fmts = table.formats(config)
    for v in graph.values():
        if not v.is_const:
            v.qformat = None
    for v, f in fmts.items():
        v.qformat = f
    for n in plan.layers:
        w, a = config.bits[n]
        wf = table.weight_format(n, w)
        in_fmt = fmts[n.inputs[0]]
        old = n.qconfig
        hist = list(old.history) if old is not None else []
        if old is not None and (old.weight_bits, old.act_bits) != (w, a) and note:
            hist.append({"by": note, "from": [old.weight_bits, old.act_bits], "to": [w, a]})
        n.qconfig = LayerQConfig(w, a, wf, table.bias_format(n, in_fmt, wf) if n.bias is not None else None, hist)


def config_from_ir(plan: QuantPlan) -> BitConfig:
    """The BitConfig the IR's annotations describe."""
    bits = {}
    for n in plan.layers:
        if n.qconfig is None:
            raise CompilerError(f"layer {n.name!r} has no bit widths yet: run choose-formats first")
        bits[n] = (n.qconfig.weight_bits, n.qconfig.act_bits)
    ins = [v for v, p in plan.points.items() if p.kind == "input"]
    input_bits = ins[0].qformat.bits if ins and ins[0].qformat is not None else max(a for _, a in bits.values())
    return BitConfig(bits, input_bits)


def weight_bytes(plan: QuantPlan, config: BitConfig) -> float:
    """Bytes of weights (at their widths) and biases (int32) under ``config``."""
    total = 0.0
    for n in plan.layers:
        total += n.weight.const.size * config.bits[n][0] / 8
        if n.bias is not None:
            total += n.bias.const.size * 4
    return total


def float_weight_format(w: np.ndarray, bits: int, axis: int | None) -> QFormat:
    """Symmetric float-scale weight format as onnxruntime's ``quantize_static`` computes it:
    scale = max|w| / (2^(B-1) - 1) per channel (or per tensor), zero point 0."""
    w = np.asarray(w, np.float32)
    qmax = float((1 << (bits - 1)) - 1)
    if axis is None:
        r = float(np.max(np.abs(w))) if w.size else 0.0
        s = np.float32(2 * r / (2 * qmax)) if r > 0 else np.float32(1.0)
        return QFormat(bits, 0, True, None, fscale=float(s))
    r = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1).astype(np.float64)
    s = np.where(r > 0, 2 * r / (2 * qmax), 1.0).astype(np.float32)
    return QFormat(bits, (0,) * len(s), True, axis, fscale=tuple(float(x) for x in s))


def float_act_format(vmin: float, vmax: float, bits: int) -> QFormat:
    """Asymmetric unsigned float-scale format from a min/max range, as onnxruntime's MinMax
    calibration computes it: the range is widened to hold 0, scale = (max - min) / (2^B - 1),
    zero point = round(-min / scale)."""
    lo = float(np.float32(min(float(vmin), 0.0)))
    hi = float(np.float32(max(float(vmax), 0.0)))
    qmax = float((1 << bits) - 1)
    s = (hi - lo) / qmax  # float64, stored as float32 (as onnxruntime does)
    if s < np.finfo(np.float32).tiny:
        return QFormat(bits, 0, False, None, fscale=1.0, zero_point=0)
    zp = int(np.clip(np.round(-lo / s), 0, qmax))
    return QFormat(bits, 0, False, None, fscale=float(np.float32(s)), zero_point=zp)


def bias_fits(bias: np.ndarray, fmt: QFormat) -> bool:
    """The float ``bias`` quantized at ``fmt`` (the accumulator's scale: ``2^-frac`` or the float scale)
    stays inside the accumulator's signed range."""
    lo, hi = qrange(fmt.bits, True)
    if fmt.fscale is not None:
        sc = np.asarray(fmt.fscale, np.float64)
        q = np.asarray(bias, np.float64).reshape(-1) / (sc if sc.ndim == 0 else sc.reshape(-1))
    else:
        q = np.ldexp(np.asarray(bias, np.float64), np.asarray(fmt.frac))
    return bool(np.all(q >= lo) and np.all(q <= hi))


def check_bias_fits(node: Node, bias: np.ndarray, fmt: QFormat) -> None:
    if not bias_fits(bias, fmt):
        raise CompilerError(f"layer {node.name!r}: bias does not fit the {fmt.bits}-bit accumulator at "
                            f"its scale", hint="use a target with wider accumulators")


class QuantPlanAnalysis(Analysis):
    """The graph's QuantPlan (structure only)."""
    name = "quant-plan"

    def compute(self, graph: Graph, ctx) -> QuantPlan:
        return QuantPlan.build(graph)


class FormatTableAnalysis(Analysis):
    """The FormatTable from calibration statistics and the context's target."""
    name = "format-table"

    def __init__(self, search: int = 2, **params):
        super().__init__(search=search, **params)
        self.search = search

    def compute(self, graph: Graph, ctx) -> FormatTable:
        if ctx.target is None:
            raise CompilerError("choosing fixed-point formats needs a --target")
        plan = ctx.analyses.get(QuantPlanAnalysis, graph)
        stats = ctx.analyses.get(ActivationRanges, graph)
        return FormatTable(plan, stats, ctx.target, search=self.search)
