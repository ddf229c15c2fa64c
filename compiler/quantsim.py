"""QuantSim: the network of a bit assignment, simulated by fake quantization.

``QuantSim(plan, table)`` turns a ``BitConfig`` into a node function for the runtime's
``Executor`` (``runtime.fakequant.fake_quant_node_fn``): layer weights and biases are
replaced by their dequantized integers (cached per width, rounded half up as insert-qdq
stores them), input points are rounded when read, and every layer/arith output is
rounded to its format right after the node runs (the target's rounding of
requantization shifts, half to even on the npu targets, and saturation). Layout ops
pass values through, which is exact on the integer grid. This is NN_S of the influence
method, and what searches evaluate; the bit-exact integer emulator computes the same
network in integers.
"""
from __future__ import annotations

import numpy as np

from ..core.errors import OptionError
from ..core.ir import Node
from ..core.progress import progress_iter
from ..core.qformat import QFormat, fake_quant
from ..runtime.executor import Executor, batches, float_node_fn, run_batched
from ..runtime.fakequant import fake_quant_node_fn
from . import ortsim
from .options import SIM_ENGINES
from .quant import BitConfig, FormatTable, QuantPlan


class QuantSim:
    """``bias_correction`` (optional): callable ``(layer, weight_format, bias_format) -> float bias or None``
    giving the
    bias to quantize instead of the layer's own (``compiler.bias_correction.BiasCorrection.corrected_bias``);
    a layer without a bias input gets one when it returns an array."""

    def __init__(self, plan: QuantPlan, table: FormatTable, bias_correction=None, engine: str = "onnxruntime"):
        if engine not in SIM_ENGINES:
            raise OptionError(f"unknown simulation engine {engine!r}", hint=f"use one of {', '.join(SIM_ENGINES)}")
        #: "onnxruntime": whole-network and suffix runs as ONNX models in onnxruntime (``compiler/ortsim.py``);
        #: "numpy": mpqc's own float runtime with fake-quantizing node functions
        self.engine = engine
        self._ort: ortsim.OrtSim | None = None
        self.plan = plan
        self.table = table
        self.bias_correction = bias_correction
        #: rounding of activations (requantization shifts): the target's ("half-even" on the npu targets)
        self.rounding = getattr(table.target, "rounding", "half-up") if table is not None else "half-up"
        self._wcache: dict[tuple, np.ndarray] = {}
        self._bcache: dict[tuple, np.ndarray] = {}

    def _qweight(self, node: Node, fmt: QFormat) -> np.ndarray:
        key = (node, fmt.bits)  # the Node itself (identity), not id(): survives pickling
        w = self._wcache.get(key)
        if w is None:
            w = fake_quant(node.weight.const, fmt)
            self._wcache[key] = w
        return w

    def _qbias(self, node: Node, in_fmt: QFormat, w_fmt: QFormat) -> np.ndarray | None:
        key = (node, in_fmt.bits, w_fmt.bits)
        if key not in self._bcache:
            b = node.bias.const if node.bias is not None else None
            b_fmt = self.table.bias_format(node, in_fmt, w_fmt)
            if self.bias_correction is not None:
                cb = self.bias_correction(node, w_fmt, b_fmt)
                b = b if cb is None else cb
            self._bcache[key] = None if b is None else fake_quant(b, b_fmt)
        return self._bcache[key]

    def spec(self, config: BitConfig, *, float_layers: set | None = None):
        """``(in_formats, out_formats, params)`` of ``config``: what ``fake_quant_node_fn`` applies (and
        ``OrtSim`` builds as ONNX operators)."""
        fmts = self.table.formats(config)
        wf = self.table.weight_formats(config)
        points = self.plan.points
        layer_set = set(self.plan.layers)  # the Nodes (identity), not id(): ``params`` may be pickled
        float_layers = float_layers or set()
        in_formats = {v: fmts[v] for v, p in points.items() if p.kind == "input"}
        out_formats = {v: fmts[v] for v, p in points.items() if p.kind in ("layer", "arith") and not (
            p.kind == "layer" and p.layer in float_layers)}

        def params(node: Node):
            if node not in layer_set or node in float_layers:
                return None
            p = {1: self._qweight(node, wf[node])}
            if node.bias is not None and len(node.inputs) > 2:
                p[2] = self._qbias(node, fmts[node.inputs[0]], wf[node])
            elif self.bias_correction is not None and node.bias is None:
                b = self._qbias(node, fmts[node.inputs[0]], wf[node])
                if b is not None:
                    p[2] = b
            return p

        return in_formats, out_formats, params

    def node_fn(self, config: BitConfig | None, *, float_layers: set | None = None):
        """Node function for ``config`` (None: plain float). Layers in ``float_layers`` stay float."""
        if config is None:
            return float_node_fn
        return fake_quant_node_fn(*self.spec(config, float_layers=float_layers), self.rounding)

    # ------------------------------------------------------------------ the onnxruntime engine
    def ort_model(self, config: BitConfig | None, *, inputs=None, outputs=None):
        """The ONNX model of ``config``'s network from ``inputs`` to ``outputs`` (Values; defaults: the
        graph's), or None when ``engine`` is "numpy" or a format has no ONNX chain."""
        if self.engine != "onnxruntime":
            return None
        if config is None:
            spec = ({}, {}, None)
        else:
            spec = self.spec(config)
            if not all(ortsim.supported(f) for f in (*spec[0].values(), *spec[1].values())):
                return None
        if self._ort is None:
            self._ort = ortsim.OrtSim(self.plan.graph)
        return lambda: self._ort.build(*spec, self.rounding, inputs=inputs, outputs=outputs)

    def ort_session(self, config: BitConfig | None, *, inputs=None, outputs=None, jobs: int = 1):
        """A kept onnxruntime session of ``ort_model(config, inputs=, outputs=)`` (None where that is)."""
        g = self.plan.graph
        ins = tuple(inputs if inputs is not None else g.inputs)
        outs = tuple(outputs if outputs is not None else g.outputs)
        make = self.ort_model(config, inputs=ins, outputs=outs)
        if make is None:
            return None
        key = (None if config is None else config.key(self.plan.layers), ins, outs)
        return self._ort.session(key, make, max(1, jobs))

    def run(self, config: BitConfig | None, x: np.ndarray, *, batch_size: int = 64, outputs=None,
            progress: str | None = None, jobs: int = 1) -> list[np.ndarray]:
        g = self.plan.graph
        outs = [g.value_by_name(o) if isinstance(o, str) else o for o in (outputs or g.outputs)]
        sess = self.ort_session(config, outputs=outs, jobs=jobs)
        if sess is None:
            return run_batched(g, x, batch_size=batch_size, outputs=outputs,
                               node_fn=self.node_fn(config), progress=progress, jobs=jobs)
        per = [ortsim.run_session(sess, {g.inputs[0]: x[sl]}, outs)
               for sl in progress_iter(list(batches(len(x), batch_size)), desc=progress)]
        return [np.concatenate([b[i] for b in per], axis=0) for i in range(len(outs))]

    def executor(self, config: BitConfig | None) -> Executor:
        return Executor(self.plan.graph, self.node_fn(config))
