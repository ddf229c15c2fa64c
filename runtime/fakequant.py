"""Fake-quantized execution: the float runtime with every quantization point rounded.

``QuantSim(plan, table)`` turns a ``BitConfig`` into a node function for the
``Executor``: layer weights and biases are replaced by their dequantized integers
(cached per width, rounded half up as insert-qdq stores them), input points are
rounded when read, and every layer/arith output is rounded to its format right
after the node runs (the target's rounding of requantization shifts, half to even
on the npu targets, and saturation). Layout ops pass values through, which is exact on the integer grid.
This is NN_S of the influence method, and what searches evaluate; the bit-exact
integer emulator (``runtime.emulator``) computes the same network in integers.
"""
from __future__ import annotations

import numpy as np

from ..core.ir import Graph, Node, Value
from ..core.qformat import QFormat, fake_quant
from ..compiler.quant import BitConfig, FormatTable, QuantPlan
from .executor import Executor, float_node_fn, run_batched


def fake_quant_act(x: np.ndarray, fmt: QFormat, rounding: str = "half-up") -> np.ndarray:
    """``fake_quant`` of an activation with the target's rounding of requantization shifts: the
    emulator (and onnxruntime) round ties to even on the npu targets, so the simulated network is
    the deployed one bit for bit."""
    if rounding != "half-even" or fmt.fscale is not None or fmt.bits > 16:
        return fake_quant(x, fmt)
    lo, hi = fmt.qmin, fmt.qmax
    f = fmt.frac_array()
    if fmt.axis is not None:
        shp = [1] * np.ndim(x)
        shp[fmt.axis % np.ndim(x)] = -1
        f = f.reshape(shp)
    s = np.ldexp(np.float32(1.0), f).astype(np.float32)
    q = np.rint(np.asarray(x, np.float32) * s)
    np.clip(q, lo, hi, out=q)
    return (q / s).astype(np.float32)


class QuantSim:
    """``bias_correction`` (optional): callable ``(layer, weight_format, bias_format) -> float bias or None``
    giving the
    bias to quantize instead of the layer's own (``passes.bias_correction.BiasCorrection.corrected_bias``);
    a layer without a bias input gets one when it returns an array."""

    def __init__(self, plan: QuantPlan, table: FormatTable, bias_correction=None):
        self.plan = plan
        self.table = table
        self.bias_correction = bias_correction
        #: rounding of activations (requantization shifts): the target's ("half-even" on the npu targets)
        self.rounding = getattr(table.target, "rounding", "half-up") if table is not None else "half-up"
        self._wcache: dict[tuple, np.ndarray] = {}
        self._bcache: dict[tuple, np.ndarray] = {}

    def _qweight(self, node: Node, fmt: QFormat) -> np.ndarray:
        key = (id(node), fmt.bits)
        w = self._wcache.get(key)
        if w is None:
            w = fake_quant(node.weight.const, fmt)
            self._wcache[key] = w
        return w

    def _qbias(self, node: Node, in_fmt: QFormat, w_fmt: QFormat) -> np.ndarray | None:
        key = (id(node), in_fmt.bits, w_fmt.bits)
        if key not in self._bcache:
            b = node.bias.const if node.bias is not None else None
            b_fmt = self.table.bias_format(node, in_fmt, w_fmt)
            if self.bias_correction is not None:
                cb = self.bias_correction(node, w_fmt, b_fmt)
                b = b if cb is None else cb
            self._bcache[key] = None if b is None else fake_quant(b, b_fmt)
        return self._bcache[key]

    def node_fn(self, config: BitConfig | None, *, float_layers: set | None = None):
        """Node function for ``config`` (None: plain float). Layers in ``float_layers`` stay float."""
        if config is None:
            return float_node_fn
        fmts = self.table.formats(config)
        wf = self.table.weight_formats(config)
        plan = self.plan
        points = plan.points
        layer_ids = {id(n) for n in plan.layers}
        float_layers = float_layers or set()
        rounding = self.rounding

        def fn(node: Node, args: list):
            args = list(args)
            for i, v in enumerate(node.inputs):
                if v is not None and v in points and points[v].kind == "input":
                    args[i] = fake_quant_act(args[i], fmts[v], rounding)
            if id(node) in layer_ids and node not in float_layers:
                args[1] = self._qweight(node, wf[node])
                if node.bias is not None and len(args) > 2:
                    args[2] = self._qbias(node, fmts[node.inputs[0]], wf[node])
                elif self.bias_correction is not None and node.bias is None:
                    b = self._qbias(node, fmts[node.inputs[0]], wf[node])
                    if b is not None:
                        args = (args + [None])[:2] + [b]
            outs = float_node_fn(node, args)
            res = []
            for v, a in zip(node.outputs, outs):
                p = points.get(v)
                if p is not None and p.kind in ("layer", "arith") and not (
                        p.kind == "layer" and p.layer in float_layers):
                    a = fake_quant_act(a, fmts[v], rounding)
                res.append(a)
            return tuple(res)

        return fn

    def run(self, config: BitConfig | None, x: np.ndarray, *, batch_size: int = 64, outputs=None,
            progress: str | None = None) -> list[np.ndarray]:
        return run_batched(self.plan.graph, x, batch_size=batch_size, outputs=outputs,
                           node_fn=self.node_fn(config), progress=progress)

    def executor(self, config: BitConfig | None) -> Executor:
        return Executor(self.plan.graph, self.node_fn(config))


def ir_node_fn(graph: Graph):
    """Node function that fake-quantizes according to the IR's own annotations
    (``node.qconfig`` formats and ``value.qformat``), for graphs after choose-formats."""
    layer_fmt = {id(n): n.qconfig for n in graph.layers() if n.qconfig is not None}
    wcache: dict[int, np.ndarray] = {}

    def fn(node: Node, args: list):
        args = list(args)
        for i, v in enumerate(node.inputs):
            if v is not None and not v.is_const and v.qformat is not None:
                # rounding an on-grid value is exact, so reading inputs through their format is safe
                args[i] = fake_quant(args[i], v.qformat)
        q = layer_fmt.get(id(node))
        if q is not None and q.weight_format is not None:
            w = wcache.get(id(node))
            if w is None:
                w = wcache[id(node)] = fake_quant(node.weight.const, q.weight_format)
            args[1] = w
            if q.bias_format is not None and len(args) > 2 and args[2] is not None:
                args[2] = fake_quant(node.bias.const, q.bias_format)
        outs = float_node_fn(node, args)
        return tuple(fake_quant(a, v.qformat) if v.qformat is not None else a for v, a in zip(node.outputs, outs))

    return fn
