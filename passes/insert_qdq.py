"""insert-qdq: materialise the quantization decisions as QuantizeLinear/DequantizeLinear.

Reads the annotations choose-formats (and any bit-width search) left on the IR --
``node.qconfig`` on layers, ``value.qformat`` on activation tensors -- and rewrites
the graph into the QDQ form onnxruntime executes (docs/FIXED_POINT.md):

* every quantized activation ``v`` (input points, layer outputs after a fused
  Relu/Clip, arith outputs, layout outputs) becomes ``v -> QuantizeLinear ->
  DequantizeLinear -> readers``; a graph output keeps its name on the DequantizeLinear;
* layer weights become integer constants read through a DequantizeLinear (per
  output channel: ``axis``); biases int32 at the accumulator's scale ``s_in * s_w``;
* scales are ``2^-n`` with zero point 0 (power-of-two targets) or the float scale and
  zero point of the float-scale kind (``ort-int8``).

Containers: activations of 8 / 16 bits are int8/uint8 and int16/uint16; narrower
ones (2..7 bits) and 9..15 bits live in the next container with an integer ``Clip``
between the QuantizeLinear and the DequantizeLinear, so they saturate at their own
range. 4-bit weights are stored as ONNX int4/uint4 (the exporter converts the int8
constants tagged with a 4-bit ``qformat``; set ``int4=false`` to keep int8), other
widths below 8 bits in int8 containers, clamped at compile time. The graph moves to
opset 21 (int16 and int4 QuantizeLinear/DequantizeLinear). Graph metadata records
the target and its rounding (``mpqc.target``, ``mpqc.rounding``) for the emulator.

Before rewriting, the pass writes the quantization report (``report["quantization"]``):
per layer bits, formats, SQNR of weights and activations, weight bytes and MACs;
per tensor formats and SQNR; totals against float and uniform int8.

Options: int4 (store 4-bit weights as int4, default true); rounding ("target": the target's,
"half-even", "half-up": the ties of every requantization shift the emulator and the bundle
use; ONNX QuantizeLinear always rounds half to even, so only "half-even" makes the QDQ
model and the emulator agree bit for bit).
Requires: choose-formats (or a search) to have annotated the IR. Preserves: nothing.
Method: the export of fixed-point Qm.n formats (US 12,393,828 B2, FIG. 5-6; docs/FIXED_POINT.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.compiler.qdq import insert_qdq, needs_qdq, quantization_report
from mpqc.core.ir import Graph


@dataclass(frozen=True)
class InsertQDQPass(Pass):
    name = "insert-qdq"

    int4: bool = True
    rounding: Literal["target", "half-even", "half-up"] = "target"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not needs_qdq(graph):
            return PassResult(False)
        if ctx.target is not None:
            ctx.report["quantization"] = quantization_report(graph, ctx)
        counts = insert_qdq(graph, ctx.target, int4=self.int4, rounding=self.rounding)
        sec = ctx.section(self.name)
        sec.update(counts)
        sec["opset"] = graph.opset
        sec["quantize_nodes"] = sum(1 for n in graph.nodes if n.op_type == "QuantizeLinear")
        sec["dequantize_nodes"] = sum(1 for n in graph.nodes if n.op_type == "DequantizeLinear")
        return PassResult(True, counts)
