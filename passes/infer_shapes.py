"""infer-shapes: recompute every value's shape and dtype with ONNX shape inference.

The graph is exported (unchecked), inferred with ``onnx.shape_inference`` and the
results are copied back by name; graph inputs keep their declared shapes, so a
symbolic batch dim ``N`` propagates to every activation.

Options: none. Requires: nothing. Preserves: everything (it reports modified=False: only annotations change).
Method: canonicalisation.
"""
from __future__ import annotations

from dataclasses import dataclass

from mpqc.compiler.canonical import infer_shapes
from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.core.ir import Graph


@dataclass(frozen=True)
class InferShapesPass(Pass):
    name = "infer-shapes"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        infer_shapes(graph)
        return PassResult(False)
