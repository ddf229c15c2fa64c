"""serialize-residual: turn residual blocks into plain chains (SRN) so their channels can be pruned.

A block ``y = [relu](conv2(relu(conv1(x))) + shortcut(x))`` whose input ``x`` is provably
non-negative (a ReLU's output) is rebuilt as one chain: conv1 gains one Dirac output
channel per input channel (copied through the ReLU unchanged, since ``x >= 0``) and conv2
gains the matching input channels carrying the shortcut (a Dirac for an identity
shortcut, the 1x1 projection kernel for a projection). The Add and the projection Conv
disappear and the network computes the same function (to float rounding). Blocks whose
input may be negative, or whose geometry does not line up, are left as they are (their
channels then stay unpruned); with ``strict`` they are an error naming the block.

Options: strict (false). Requires: BatchNorm folded (fold-batchnorm), a float network
(before choose-formats). Preserves: nothing.
Report: serialized blocks (their Add nodes), refused blocks with the reason, and the
MACs, weight bytes and float accuracy (with --eval) after serialization.
Method: serialized residual network (K. Kamma and T. Wada, "Serialized Residual Network",
MIRU 2020; with REAP, IEICE Trans. Inf. & Syst. E104-D(1), 2021); docs/PRUNING.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.compiler.srn import serialize_residual
from mpqc.compiler.stages import stage_summary
from mpqc.core.ir import Graph


@dataclass(frozen=True)
class SerializeResidualPass(Pass):
    name = "serialize-residual"
    requires = ("folded-batchnorm", "float")

    strict: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        rep = serialize_residual(graph, strict=self.strict)
        sec = ctx.section(self.name)
        sec["serialized"] = list(rep.serialized)
        sec["refused"] = [{"block": b, "reason": why} for b, why in rep.refused]
        if rep.serialized:
            sec["after"] = stage_summary(self.name, graph, ctx)
        return PassResult(bool(rep.serialized), {"serialized": len(rep.serialized), "refused": len(rep.refused)})
