"""The fake-quantized network as an ONNX model that onnxruntime runs (the search's fast engine).

``OrtSim(graph)`` turns what ``runtime.fakequant.fake_quant_node_fn`` does into ONNX
operators, once per bit assignment, and runs it in an onnxruntime session:

* a rounded input point (``in_formats``) is read through a quantization chain;
* a rounded output (``out_formats``) is the node's raw output passed through one;
* substituted constants (quantized weights, corrected biases) become initializers.

A chain is the same float32 arithmetic as the numpy kernels, operator by operator, so
the rounding itself is bit for bit the numpy engine's:

* power-of-two formats, ties to even (the npu targets' requantization):
  ``Mul(2^f) -> Round -> Clip(qmin, qmax) -> Mul(2^-f)`` (``fake_quant_act``);
* power-of-two formats, ties up (``fake_quant``): ``Mul(2^f) -> Add(0.5) -> Floor -> Clip -> Mul(2^-f)``;
* float-scale formats: ``Div(s) -> Round -> Add(zp) -> Clip -> Sub(zp) -> Mul(s)``.

Scaling by a power of two is exact, so where onnxruntime's graph optimizer folds a ``Mul``
into the preceding convolution nothing changes. What differs from the numpy engine is only
the order in which the float32 convolutions add their products (both are float32
approximations of the integer sums the emulator computes exactly): outputs agree to float
tolerance, and the integer network the emulator runs is the same (tests compare both
engines and the emulator). ``supported(fmt)`` says which formats have a chain; a bit
assignment with any other format runs on the numpy engine.

A model is built per ``(config, inputs, outputs)``: whole-network evaluations keep their
sessions in ``OrtSim`` (LRU of a few); an influence sweep builds one model per suffix, whose
inputs are the tensors crossing its cut (``crossing_inputs``), and keeps it for the sweep.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..core.errors import CompilerError
from ..core.ir import Graph, Node, Value
from ..core.qformat import QFormat
from ..runtime.executor import Executor
from .export import per_channel_clip, to_onnx

def supported(fmt: QFormat | None) -> bool:
    """True if ``fmt`` has an ONNX chain equal to the numpy engine's rounding (power-of-two formats up
    to 16 bits, float-scale formats); wider formats are rounded in float64 by the numpy engine."""
    return fmt is None or fmt.fscale is not None or fmt.bits <= 16


def _bshape(arr: np.ndarray, axis: int | None, ndim: int | None) -> np.ndarray:
    if axis is None or arr.ndim == 0:
        return arr
    if ndim is None:
        raise CompilerError("a per-channel format on a tensor of unknown rank")
    shp = [1] * ndim
    shp[axis % ndim] = -1
    return arr.reshape(shp)


class _Builder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._k = 0
        self._consts: dict[tuple, str] = {}

    def name(self, stem: str) -> str:
        self._k += 1
        return f"__sim{self._k}_{stem}"

    def const(self, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 4096 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(arr, n))
        if key is not None:
            self._consts[key] = n
        return n

    def op(self, op_type: str, inputs: list[str], stem: str, out: str | None = None) -> str:
        out = out or self.name(stem)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type)))
        return out

    def chain(self, x: str, fmt: QFormat, rounding: str, ndim: int | None, out: str) -> None:
        """Nodes computing ``out`` = fake quantization of ``x`` exactly as the numpy engine does."""
        lo, hi = np.float32(fmt.qmin), np.float32(fmt.qmax)
        if fmt.fscale is not None:
            s = _bshape(np.asarray(fmt.fscale, np.float32), fmt.axis if fmt.axis is not None else 0, ndim)
            zp = np.float32(fmt.zero_point)
            t = self.op("Div", [x, self.const(s)], "q")
            t = self.op("Round", [t], "q")
            t = self.op("Add", [t, self.const(zp)], "q")
            t = self.op("Clip", [t, self.const(lo), self.const(hi)], "q")
            t = self.op("Sub", [t, self.const(zp)], "q")
            self.op("Mul", [t, self.const(s)], "q", out)
            return
        f = _bshape(fmt.frac_array(), fmt.axis, ndim)
        s = np.ldexp(np.float32(1.0), f).astype(np.float32)
        # the last step multiplies by 2^-f where numpy divides by 2^f: q is an integer below 2^16, so
        # both are exact and equal (the result is far from float32's subnormal range)
        inv = self.const(np.ldexp(np.float32(1.0), -f).astype(np.float32))
        t = self.op("Mul", [x, self.const(s)], "q")
        if rounding == "half-even":
            t = self.op("Round", [t], "q")
        else:
            t = self.op("Add", [t, self.const(np.float32(0.5))], "q")
            t = self.op("Floor", [t], "q")
        t = self.op("Clip", [t, self.const(lo), self.const(hi)], "q")
        self.op("Mul", [t, inv], "q", out)


def _value_info(v: Value) -> onnx.ValueInfoProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(v.dtype or np.float32))
    if v.shape is None:
        return helper.make_tensor_value_info(v.name, elem, None)
    dims = ["N"] + [d if isinstance(d, int) else None for d in list(v.shape)[1:]]
    return helper.make_tensor_value_info(v.name, elem, dims)


class OrtSim:
    """Runs fake-quantized variants of ``graph`` in onnxruntime (see the module docstring).

    Sessions run with a number of intra-op threads (``--jobs``); onnxruntime's kernels split
    work over output elements, so results do not depend on it (tested)."""

    def __init__(self, graph: Graph, *, max_sessions: int = 4):
        self.graph = graph
        self.max_sessions = max_sessions
        self._base: onnx.ModelProto | None = None
        self._sessions: OrderedDict = OrderedDict()
        self.built = 0  # sessions created

    def __getstate__(self) -> dict:
        # onnxruntime sessions do not pickle (a Dask worker gets this object): they are rebuilt there
        state = dict(self.__dict__)
        state["_sessions"] = OrderedDict()
        return state

    # ------------------------------------------------------------------ model
    def _base_model(self) -> onnx.ModelProto:
        if self._base is None:
            self._base = to_onnx(self.graph, check=False)
        return self._base

    def build(self, in_formats: Mapping[Value, QFormat], out_formats: Mapping[Value, QFormat],
              params: Callable[[Node], dict | None], rounding: str, *,
              inputs: Sequence[Value] | None = None, outputs: Sequence[Value] | None = None) -> onnx.ModelProto:
        """The ONNX model of the fake-quantized network from ``inputs`` (default: the graph's) to
        ``outputs`` (default: the graph's)."""
        g = self.graph
        base = self._base_model()
        inputs = list(inputs if inputs is not None else g.inputs)
        outputs = list(outputs if outputs is not None else g.outputs)
        needed = Executor(g).plan(outputs, inputs)
        protos = {p.name: p for p in base.graph.node}
        b = _Builder()
        read_as: dict[str, str] = {}  # value name -> the name consumers read (after its input chain)

        def ndim(v: Value):
            return None if v.shape is None else len(v.shape)

        def produced(v: Value) -> None:
            f = in_formats.get(v)
            if f is not None:
                read_as[v.name] = b.name("in")
                b.chain(v.name, f, rounding, ndim(v), read_as[v.name])

        for v in inputs:
            produced(v)
        used_inits: set[str] = set()
        for n in needed:
            p = protos.get(n.name)
            if p is None:
                raise CompilerError(f"node {n.name!r} is missing from the exported model")
            pre = protos.get(f"{n.name}_max") if n.op_type == "Clip" and per_channel_clip(n) else None
            if pre is not None and p.op_type == "Min":  # a per-channel Clip is exported as Max, then Min
                q0 = onnx.NodeProto()
                q0.CopyFrom(pre)
                del q0.input[:]
                q0.input.extend(read_as.get(x, x) if x else x for x in pre.input)
                b.nodes.append(q0)
                used_inits.update(x for x in q0.input if x)
            ins = [read_as.get(x, x) if x else x for x in p.input]
            sub = params(n) if params is not None else None
            if sub:
                for i, a in sorted(sub.items()):
                    nm = b.const(np.asarray(a))
                    if i < len(ins):
                        ins[i] = nm
                    else:
                        ins += [""] * (i - len(ins)) + [nm]
            outs = list(p.output)
            raw = {}
            for k, v in enumerate(n.outputs):
                if v in out_formats:
                    raw[k] = b.name("raw")
                    outs[k] = raw[k]
            q = onnx.NodeProto()
            q.CopyFrom(p)
            del q.input[:]
            q.input.extend(ins)
            del q.output[:]
            q.output.extend(outs)
            b.nodes.append(q)
            used_inits.update(x for x in ins if x)
            for k, v in enumerate(n.outputs):
                if k in raw:
                    b.chain(raw[k], out_formats[v], rounding, ndim(v), v.name)
                produced(v)
        inits = [t for t in base.graph.initializer if t.name in used_inits] + b.inits
        graph = helper.make_graph(b.nodes, g.name or "sim", [_value_info(v) for v in inputs],
                                  [helper.make_tensor_value_info(v.name, helper.np_dtype_to_tensor_dtype(
                                      np.dtype(v.dtype or np.float32)), None) for v in outputs],
                                  initializer=inits)
        m = helper.make_model(graph, opset_imports=list(base.opset_import), producer_name="mpqc-sim")
        m.ir_version = base.ir_version
        return m

    # ------------------------------------------------------------------ sessions
    def session(self, key, make_model: Callable[[], onnx.ModelProto], threads: int = 1):
        """The session of ``(key, threads)`` (kept, LRU of ``max_sessions``), built from ``make_model()``
        on a miss."""
        key = (key, threads)
        s = self._sessions.get(key)
        if s is not None:
            self._sessions.move_to_end(key)
            return s
        s = make_session(make_model(), threads)
        self.built += 1
        self._sessions[key] = s
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return s


def run_session(sess, feeds: Mapping[Value, np.ndarray], outputs: Sequence[Value]) -> list[np.ndarray]:
    """``outputs`` of ``sess`` fed ``{Value: array}`` (the IR's value names are the model's)."""
    return list(sess.run([v.name for v in outputs], {v.name: np.ascontiguousarray(a) for v, a in feeds.items()}))


def crossing_inputs(nodes: Sequence[Node]) -> list[Value]:
    """The non-constant values ``nodes`` read but do not produce (the inputs of a partial model), in
    order of first read."""
    produced = {id(o) for n in nodes for o in n.outputs}
    seen: set[int] = set()
    out: list[Value] = []
    for n in nodes:
        for v in n.inputs:
            if v is not None and not v.is_const and id(v) not in produced and id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def make_session(model: onnx.ModelProto, threads: int = 1, *, arena: bool = True):
    """An onnxruntime CPU session of ``model`` with every graph optimization (they do not change the
    chains' rounding: see the module docstring). ``arena=False`` frees activations after each run
    (for the many small suffix sessions of a sweep)."""
    import onnxruntime as ort  # start-up: loaded only when a simulation runs
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # an mpqc bug, not the user's: say which engine to fall back to
        raise CompilerError(f"onnxruntime refused the simulated network: {str(e).splitlines()[0][:300]}",
                            hint="run with --sim numpy and report this") from None
