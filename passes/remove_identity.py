"""remove-identity: drop Identity and inference-time Dropout nodes.

A Dropout whose mask output is read stays (it is not a no-op then). A node whose
output is a graph output and whose input is a graph input stays, so the graph keeps
its interface. Options: none. Requires: nothing. Preserves: nothing.
Method: canonicalisation.
"""
from __future__ import annotations

from dataclasses import dataclass

from mpqc.core.ir import Graph
from mpqc.compiler.passes import Pass, PassContext, PassResult


@dataclass(frozen=True)
class RemoveIdentityPass(Pass):
    name = "remove-identity"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        modified = False
        for node in graph.iter_ops("Identity", "Dropout"):
            if node.op_type == "Dropout" and len(node.outputs) > 1 and (
                    node.outputs[1].uses or node.outputs[1] in graph.outputs):
                continue
            if node.op_type == "Dropout" and len(node.outputs) > 1:
                node.outputs = node.outputs[:1]
            before = len(graph.nodes)
            graph.bypass(node)
            modified |= len(graph.nodes) < before
        return PassResult(modified)
