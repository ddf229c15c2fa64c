"""fold-constants: evaluate every node whose inputs are all constant; fold shape arithmetic.

* A node whose inputs are all constants (and that is not a QuantizeLinear /
  DequantizeLinear, which stay as the quantized model's structure) is run once with
  the float runtime and its outputs become constants.
* Shape subgraphs are evaluated symbolically: ``Shape(x)`` yields the static dims
  of ``x`` and a symbol for dynamic ones; Gather/Slice/Concat/Unsqueeze/Squeeze/
  Cast/Identity propagate those vectors. A vector without symbols becomes a
  constant. A ``Reshape`` whose target shape contains the symbolic batch dim of its
  own input at the same position gets the constant ``0`` there ("copy this dim"),
  which keeps the batch dimension free; this folds ``x.view(x.size(0), -1)``.

Options: none. Requires: nothing. Preserves: nothing (values change).
Method: canonicalisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpqc.core.ir import Graph, Node, Value
from mpqc.runtime.executor import float_node_fn
from mpqc.compiler.canonical import infer_shapes, remove_dead_nodes
from mpqc.compiler.passes import Pass, PassContext, PassResult

NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform",
              "RandomNormalLike", "RandomUniformLike", "Multinomial", "Dropout"}
#: ops with no inputs that are folded anyway (Constant)
SOURCE_OPS = {"Constant"}

Sym = tuple  # ("dim", value, axis)


def fold_node_outputs(graph: Graph, node: Node, arrays) -> None:
    """Replace every output of ``node`` by a constant and drop the node."""
    for v, a in zip(node.outputs, arrays):
        c = Value(v.name, const=np.asarray(a))
        graph.replace_all_uses_with(v, c)
    graph.remove_node(node, force=True)


def _sym_of(v: Value | None, sym: dict[int, list]) -> list | None:
    if v is None:
        return None
    if id(v) in sym:
        return sym[id(v)]
    if v.is_const and v.const.dtype.kind in "iu" and v.const.ndim <= 1:
        return [int(x) for x in v.const.reshape(-1)] if v.const.ndim == 1 else int(v.const)
    return None


def _symbolic(node: Node, sym: dict[int, list]):
    """Symbolic result of a shape-arithmetic node, or None when it cannot be tracked."""
    op = node.op_type
    if op == "Cast" and int(node.attr("to", 0)) != 7:
        return None  # shape vectors are int64: a Cast to another type must be folded by value
    ins = [_sym_of(v, sym) for v in node.inputs]
    if op == "Shape":
        x = node.inputs[0]
        if x.shape is None:
            return None
        dims = [d if isinstance(d, int) else ("dim", x, i) for i, d in enumerate(x.shape)]
        start = int(node.attr("start", 0))
        end = node.attr("end")
        return dims[start:end] if end is not None else dims[start:]
    if op in ("Cast", "Identity", "Squeeze") and isinstance(ins[0], list) and op != "Squeeze":
        return ins[0]
    if op == "Squeeze" and isinstance(ins[0], list) and len(ins[0]) == 1:
        return ins[0][0]
    if op == "Cast" and ins[0] is not None and not isinstance(ins[0], list):
        return ins[0]
    if op == "Gather" and isinstance(ins[0], list) and ins[1] is not None and int(node.attr("axis", 0)) == 0:
        idx = ins[1]
        if isinstance(idx, list):
            return [ins[0][i] for i in idx]
        return ins[0][idx]
    if op == "Unsqueeze" and ins[0] is not None and not isinstance(ins[0], list):
        return [ins[0]]
    if op == "Concat" and all(i is not None for i in ins) and int(node.attr("axis", 0)) == 0:
        out = []
        for i in ins:
            out.extend(i if isinstance(i, list) else [i])
        return out
    if op == "Slice" and isinstance(ins[0], list) and all(isinstance(i, list) for i in ins[1:3]):
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1]
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else [0]
        if axes not in ([0], [-1]):
            return None
        return ins[0][slice(ins[1][0], ins[2][0], steps[0])]
    return None


def _is_static(s) -> bool:
    if isinstance(s, list):
        return all(isinstance(x, int) for x in s)
    return isinstance(s, int)


def _reshape_with_copy_dims(node: Node, target: list) -> list | None:
    """Replace symbolic dims equal to the data's own dim at that position by 0."""
    data = node.inputs[0]
    if node.attr("allowzero", 0) or data.shape is None:
        return None
    out = []
    for i, t in enumerate(target):
        if isinstance(t, int):
            if t == 0:
                return None
            out.append(t)
            continue
        _, src, axis = t
        d = data.shape[i] if i < len(data.shape) else None
        s = src.shape[axis] if src.shape is not None else None
        # equal dims, or the batch dim of both when one of them is unknown (two different symbols
        # such as "N" and "M" may differ at run time: not folded)
        same = (d is not None and d == s) or (i == 0 and axis == 0 and not isinstance(d, int)
                                               and (d is None or s is None))
        if not same:
            return None
        out.append(0)
    return out


@dataclass(frozen=True)
class FoldConstantsPass(Pass):
    name = "fold-constants"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        modified = False
        sym: dict[int, list] = {}
        if any(n.op_type == "Shape" and n.inputs[0].shape is None for n in graph.nodes):
            infer_shapes(graph)  # the symbolic shape folding reads the shapes of Shape's inputs
        for node in list(graph.nodes):
            ins = [v for v in node.inputs if v is not None]
            if node.op_type in NEVER_FOLD:
                continue
            if (ins and all(v.is_const for v in ins)) or (not ins and node.op_type in SOURCE_OPS):
                arrays = float_node_fn(node, [None if v is None else v.const for v in node.inputs])
                fold_node_outputs(graph, node, arrays)
                modified = True
                continue
            s = _symbolic(node, sym)
            if s is not None:
                if _is_static(s):
                    fold_node_outputs(graph, node, [np.asarray(s, dtype=np.int64)])
                    modified = True
                else:
                    sym[id(node.outputs[0])] = s
                continue
            if node.op_type == "Reshape" and len(node.inputs) > 1 and not node.inputs[1].is_const:
                target = _sym_of(node.inputs[1], sym)
                if isinstance(target, list):
                    fixed = _reshape_with_copy_dims(node, target)
                    if fixed is not None:
                        graph.set_input(node, 1, graph.constant(f"{node.name}_shape",
                                                                np.asarray(fixed, dtype=np.int64)))
                        modified = True
        if modified:
            remove_dead_nodes(graph)
        return PassResult(modified)
