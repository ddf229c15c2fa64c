"""equalize: cross-layer equalization, power-of-two aware (docs/EQUALIZATION.md).

Where a layer's output channels reach other layers only through operators that commute with a
positive per-channel scale (Relu, ReLU6 and other Clips, LeakyRelu, PRelu, pooling, zero Pad,
Flatten), each channel c is scaled by ``s_c`` in that layer (filter and bias) and by ``1/s_c`` in the
layers that read it: the network computes the same function (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019). A Clip on the way gets per-channel
bounds ``s_c * bound`` (a ReLU6 becomes ``Clip(0, 6 s_c)``): the emulator clamps each channel's
accumulator, and the ONNX export writes it as ``Max``/``Min``.

Options:
* mode: "pow2" (default: each filter's largest weight moved just under the top of its power-of-two
  format at ``bits`` bits, so no bit of a per-channel format is wasted) or "range" (Nagel's rule: the
  filter's range and the range of the weights reading its channel made equal; for per-tensor formats);
* bits: the weight width the filters are aligned for (0, the default: the target's ``-O1`` width);
* direction ("pow2"): "auto" (a channel grows into its boundary where the calibration data shows its
  output stays within the tensor's largest channel, else shrinks; without --calib every channel
  shrinks) or "down" (every channel shrinks, data-free);
* iterations ("range"): sweeps over the chains (4).

Requires: a float network with BatchNorm folded (before choose-formats). Preserves: the network's
function (float outputs equal up to rounding). The report lists, per chain, the consumers, the
operators passed through, how many channels grew or shrank and the mean bits the power-of-two grid
wasted before and after; and, per layer left alone, why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpqc.compiler.equalize import equalize
from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.core.errors import OptionError
from mpqc.core.ir import Graph


@dataclass(frozen=True)
class EqualizePass(Pass):
    name = "equalize"
    requires = ("float", "folded-batchnorm")

    mode: Literal["pow2", "range"] = "pow2"
    bits: int = 0
    direction: Literal["auto", "down"] = "auto"
    iterations: int = 4

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        bits = self.bits or (ctx.target.default_weight_bits if ctx.target is not None else 8)
        if not 2 <= bits <= 16:
            raise OptionError(f"equalize: bits={self.bits} must be 0 (the target's width) or in 2..16")
        if self.iterations < 1:
            raise OptionError(f"equalize: iterations={self.iterations} must be at least 1")
        calib = None
        if self.mode == "pow2" and self.direction == "auto" and ctx.calib is not None:
            calib = ctx.calib.x
        sec = equalize(graph, mode=self.mode, bits=bits, direction=self.direction, iterations=self.iterations,
                       calib=calib, batch_size=ctx.batch_size)
        ctx.section(self.name).update(sec)
        return PassResult(bool(sec["chains"]), {"chains": len(sec["chains"])})
