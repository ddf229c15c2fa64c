"""fold-pad-into-conv: merge a zero constant Pad on spatial dims into the Conv pads.

Exporters write TensorFlow-style "same" padding as an explicit Pad before a Conv
(EfficientNet-Lite0 has 17). When the Pad has constant mode, value 0, constant
non-negative pads on spatial axes only, and every reader is a Conv with explicit
pads, the pads are added to each Conv and the Pad disappears.

Options: none. Requires: constant pads (run fold-constants first). Preserves: nothing.
Method: canonicalisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpqc.core.ir import Graph, Node
from mpqc.compiler.passes import Pass, PassContext, PassResult


def _const_pads(node: Node) -> list[int] | None:
    mode = node.attr("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode != "constant":
        return None
    pads_v = node.input(1)
    if pads_v is None or not pads_v.is_const:
        return None
    if node.input(3) is not None:  # axes input
        return None
    val = node.input(2)
    if val is not None and (not val.is_const or val.const.size and float(val.const.reshape(-1)[0]) != 0.0):
        return None
    pads = [int(p) for p in pads_v.const.reshape(-1)]
    if any(p < 0 for p in pads):
        return None
    return pads


@dataclass(frozen=True)
class FoldPadIntoConvPass(Pass):
    name = "fold-pad-into-conv"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        modified = False
        for pad in graph.iter_ops("Pad"):
            pads = _const_pads(pad)
            out = pad.outputs[0]
            if pads is None or out in graph.outputs or not out.uses:
                continue
            r = len(pads) // 2
            if pads[0] or pads[1] or pads[r] or pads[r + 1]:
                continue  # batch or channel padding
            consumers = out.consumers()
            if not all(c.op_type == "Conv" and c.inputs[0] is out
                       and c.attr("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET") for c in consumers):
                continue
            nd = r - 2
            add = pads[2:r] + pads[r + 2:]
            for c in consumers:
                cur = list(c.attr("pads", [0] * (2 * nd)))
                c.attrs["pads"] = [int(a + b) for a, b in zip(cur, add)]
                c.attrs.pop("auto_pad", None)
            graph.bypass(pad)
            modified = True
        return PassResult(modified)
