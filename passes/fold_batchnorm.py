"""fold-batchnorm: fold an inference BatchNormalization into the Conv/Gemm before it.

``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` becomes a conv with
weights scaled per output channel by ``s = gamma / sqrt(var + eps)`` and bias
``(b - mean) * s + beta``. The producer must be a Conv (or a Gemm followed by a BN
over its output features) with constant weights whose output only the BN reads.
A BN that cannot be folded is left for the runtime to execute.

Options: none. Requires: constant BN parameters. Preserves: nothing.
Method: canonicalisation; residual-block serialization and pruning rely on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpqc.core.ir import Graph
from mpqc.compiler.passes import Pass, PassContext, PassResult


@dataclass(frozen=True)
class FoldBatchNormPass(Pass):
    name = "fold-batchnorm"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        modified = False
        for bn in graph.iter_ops("BatchNormalization"):
            x = bn.inputs[0]
            prod = x.producer
            params = bn.inputs[1:5]
            if (prod is None or prod.op_type not in ("Conv", "Gemm") or not prod.is_layer
                    or len(x.uses) != 1 or x in graph.outputs or len(bn.outputs) != 1
                    or int(bn.attr("training_mode", 0))  # batch statistics: not a fixed affine map
                    or not all(p is not None and p.is_const for p in params)):
                continue
            if prod.op_type == "Gemm" and (x.rank not in (None, 2) or prod.attr("transA", 0)):
                continue
            gamma, beta, mean, var = (p.const.astype(np.float64) for p in params)
            eps = float(bn.attr("epsilon", 1e-5))
            s = gamma / np.sqrt(var + eps)
            w = prod.weight.const.astype(np.float64)
            b = prod.bias.const.astype(np.float64) if prod.bias is not None else np.zeros_like(mean)
            if prod.op_type == "Conv":
                w2 = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
            else:
                alpha = float(prod.attr("alpha", 1.0))
                beta_g = float(prod.attr("beta", 1.0))
                if b.ndim > 1:
                    continue
                b = b * beta_g
                w2 = w * s[:, None] if prod.attr("transB", 0) else w * s[None, :]
                w2 = w2 * alpha
                prod.attrs["alpha"] = 1.0
                prod.attrs["beta"] = 1.0
            b2 = (b - mean) * s + beta
            dt = prod.weight.dtype
            graph.set_input(prod, 1, graph.constant(prod.weight.name + "_bnfold", w2.astype(dt)))
            graph.set_input(prod, 2, graph.constant(f"{prod.name}_bias_bnfold", b2.astype(dt)))
            out = bn.outputs[0]
            # the conv now produces what the BN produced (keeps the graph output's name)
            graph.remove_node(bn, force=True)
            graph.replace_all_uses_with(out, x)
            if out in graph.outputs or any(o is x for o in graph.outputs):
                x.name = out.name
            modified = True
        return PassResult(modified)
