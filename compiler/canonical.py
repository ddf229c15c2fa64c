"""Graph clean-up shared by the canonicalization passes and ``mpqc info``: shape inference and
dead-code removal."""
from __future__ import annotations

import onnx

from ..core.ir import Graph
from .export import to_onnx
from .frontend import onnx_dtype_to_np


def remove_dead_nodes(graph: Graph) -> int:
    """Remove dead nodes in one backward sweep; return how many were removed."""
    outs = {id(v) for v in graph.outputs}
    removed = 0
    for node in reversed(list(graph.nodes)):
        if any(v.uses or id(v) in outs for v in node.outputs):
            continue
        graph.remove_node(node)
        removed += 1
    return removed


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
