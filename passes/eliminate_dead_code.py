"""eliminate-dead-code: remove nodes none of whose outputs reach a graph output.

Options: none. Requires: nothing. Preserves: nothing.
Method: canonicalisation.
"""
from __future__ import annotations

from dataclasses import dataclass

from mpqc.compiler.canonical import remove_dead_nodes
from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.core.ir import Graph


@dataclass(frozen=True)
class EliminateDeadCodePass(Pass):
    name = "eliminate-dead-code"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(remove_dead_nodes(graph) > 0)
