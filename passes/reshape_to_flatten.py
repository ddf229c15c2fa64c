"""reshape-to-flatten: turn ``Reshape(x, [0, -1])`` (and equivalents) into ``Flatten(axis=1)``.

After fold-constants, ``x.view(x.size(0), -1)`` is ``Reshape(x, [0, -1])``. As a
Flatten it is recognisably a layout-only op to every later pass and backend. Also
matched: ``[-1, D]`` and ``[B, D]`` with ``D`` the product of the static trailing
dims of ``x``.

Options: none. Requires: constant shape. Preserves: nothing.
Method: canonicalisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpqc.core.ir import Graph
from mpqc.compiler.passes import Pass, PassContext, PassResult


@dataclass(frozen=True)
class ReshapeToFlattenPass(Pass):
    name = "reshape-to-flatten"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        modified = False
        for node in graph.iter_ops("Reshape"):
            x, shp = node.inputs[0], node.input(1)
            if shp is None or not shp.is_const or x.shape is None or node.attr("allowzero", 0):
                continue
            target = [int(s) for s in shp.const.reshape(-1)]
            if len(target) != 2:
                continue
            tail = x.shape[1:]
            tail_static = all(isinstance(d, int) for d in tail)
            D = int(np.prod(tail)) if tail_static else None
            ok = target == [0, -1] or (D is not None and target[1] == D and target[0] in (0, -1)) or (
                D is not None and target[1] == -1 and isinstance(x.shape[0], int) and target[0] == x.shape[0])
            if not ok:
                continue
            idx = graph.nodes.index(node)
            out = node.outputs[0]
            graph.remove_node(node, force=True)
            graph.add_node("Flatten", [x], [out], {"axis": 1}, name=node.name, index=idx)
            modified = True
        return PassResult(modified)
