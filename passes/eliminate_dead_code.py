"""eliminate-dead-code: remove nodes none of whose outputs reach a graph output.

Options: none. Requires: nothing. Preserves: nothing.
Seed: canonicalisation (not a seed method).
"""
from __future__ import annotations

from dataclasses import dataclass

from mpqc.core.ir import Graph
from mpqc.compiler.passes import Pass, PassContext, PassResult, register_pass


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


@register_pass
@dataclass(frozen=True)
class EliminateDeadCodePass(Pass):
    name = "eliminate-dead-code"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(remove_dead_nodes(graph) > 0)
