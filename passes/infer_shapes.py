"""infer-shapes: recompute every value's shape and dtype with ONNX shape inference.

The graph is exported (unchecked), inferred with ``onnx.shape_inference`` and the
results are copied back by name; graph inputs keep their declared shapes, so a
symbolic batch dim ``N`` propagates to every activation.

Options: none. Requires: nothing. Preserves: everything (it reports modified=False: only annotations change).
Seed: canonicalisation (not a seed method).
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from mpqc.compiler.frontend import onnx_dtype_to_np
from mpqc.core.ir import Graph
from mpqc.compiler.passes import Pass, PassContext, PassResult, register_pass


#: float constants larger than this are passed to shape inference as typed graph inputs
#: (their values never decide a shape), so no weight is serialized just to infer shapes
LARGE_CONST = 256


def _without_large_constants(graph: Graph) -> Graph:
    """A structural copy whose large float constants are graph inputs of the same type."""
    g, _ = graph.clone()
    for v in g.values():
        if v.is_const and v.const.dtype.kind == "f" and v.const.size > LARGE_CONST:
            v.const = None
            g.inputs.append(v)
    return g


def infer_shapes(graph: Graph) -> bool:
    """Update value shapes in place; return True when any shape changed."""
    from mpqc.compiler.export import to_onnx
    model = to_onnx(_without_large_constants(graph), check=False)
    for o in model.graph.output:  # graph outputs are re-inferred too: their declared shape may be stale
        o.ClearField("type")
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return False
    info = {}
    for vi in list(model.graph.value_info) + list(model.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        info[vi.name] = (dims, onnx_dtype_to_np(tt.elem_type) if tt.elem_type else None)
    changed = False
    for n in graph.nodes:
        for v in n.outputs:
            if v.name in info:
                dims, dt = info[v.name]
                if v.shape != dims:
                    v.shape = dims
                    changed = True
                if dt is not None and v.dtype != dt:
                    v.dtype = dt
                    changed = True
    return changed


@register_pass
@dataclass(frozen=True)
class InferShapesPass(Pass):
    name = "infer-shapes"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        infer_shapes(graph)
        return PassResult(False)
