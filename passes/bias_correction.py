"""bias-correction: fold each layer's expected weight-quantization error into its bias.

Quantizing a layer's weights from W to W_q shifts every output channel o by
``(W_q - W)[o] . x`` on average ``(W_q - W)[o] . E[x]``: a systematic error that small
kernels (depthwise 3x3 / 5x5) cannot average away, and that 4-bit weights make
large. The pass subtracts it from the bias: ``b' = b - (W_q - W) E[x]`` (analytic
bias correction, as in Nagel et al., "Data-Free Quantization", 2019, with E[x]
measured on the calibration data instead of derived from BatchNorm statistics).

E[x] comes from the ``LayerInputMeans`` analysis: one float run over the
calibration data recording, for a Conv, the mean of each input channel at each
kernel tap over all output positions (so zero padding at the borders is counted
exactly); for a Gemm, the mean of each input feature. The correction uses the
weight format the IR holds (``node.qconfig.weight_format``), so it runs after the
widths are decided (after ``choose-formats`` or ``assign-bit-widths``) and before
``insert-qdq``. Layers without a bias get one (Conv, Gemm); MatMul layers, Gemm with
``transA`` or ``beta=0`` and ConvTranspose are left as they are. A correction that
would not fit the int32 accumulator at the bias scale is not applied (reported).

The searches simulate the same correction when their ``bias_correction`` option
is set (``assign-bit-widths{bias_correction=true}``, ``layer-influence{...}``), so
the network they score is the one this pass exports.

A graph whose weights all lie on their formats' grids (after optimize-rounding) has nothing to
correct: the pass says so and leaves it (without computing the input means).

Options: none. Requires: calibration data, widths on the IR. Preserves: activation
ranges, quant plan, format table, layer input means. Marks the graph (metadata
``mpqc.bias_correction``) and does nothing on a graph already corrected.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpqc.compiler.bias_correction import META_KEY, LayerInputMeans, bias_correction_for
from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.compiler.quant import FormatTableAnalysis, QuantPlanAnalysis, apply_config, config_from_ir
from mpqc.compiler.ranges import ActivationRanges
from mpqc.core.ir import Graph
from mpqc.core.qformat import fake_quant


@dataclass(frozen=True)
class BiasCorrectionPass(Pass):
    name = "bias-correction"
    preserves = frozenset({ActivationRanges, QuantPlanAnalysis, FormatTableAnalysis, LayerInputMeans})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        sec = ctx.section(self.name)
        if graph.metadata.get(META_KEY):
            sec["skipped"] = "the biases are already corrected"
            return PassResult(False)
        plan = ctx.analyses.get(QuantPlanAnalysis, graph)
        config = config_from_ir(plan)  # raises when no widths are decided yet
        if all(np.array_equal(fake_quant(n.weight.const, n.qconfig.weight_format), n.weight.const)
               for n in plan.layers if n.qconfig is not None and n.qconfig.weight_format is not None):
            # weights already on their grid (optimize-rounding): no quantization error to correct
            sec["skipped"] = "every layer's weights lie on their format's grid: there is no error to correct"
            return PassResult(False)
        bc = bias_correction_for(graph, ctx)
        table = ctx.analyses.get(FormatTableAnalysis, graph, search=2)
        rows = []
        changed = False
        for n in plan.layers:
            q = n.qconfig
            row = {"layer": n.name, "weight_bits": q.weight_bits}
            if bc(n, q.weight_format) is None:
                row.update(applied=False, reason=f"{n.op_type} has no bias input to correct")
                rows.append(row)
                continue
            nb = bc.corrected_bias(n, q.weight_format, table.bias_format(n, n.inputs[0].qformat, q.weight_format))
            if nb is None:
                row.update(applied=False, reason="the corrected bias does not fit the accumulator at its scale")
                rows.append(row)
                continue
            corr = bc(n, q.weight_format)
            old = n.bias.const if n.bias is not None else np.zeros_like(nb)
            new_v = graph.constant(f"{n.name}_bias_corrected" if n.bias is None else n.bias.name + "_bc", nb)
            graph.set_input(n, 2, new_v)
            changed = True
            row.update(applied=True, max_abs_correction=float(np.max(np.abs(corr))),
                       mean_abs_correction=float(np.mean(np.abs(corr))),
                       bias_absmax=float(np.max(np.abs(old))) if old.size else 0.0)
            rows.append(row)
        if changed:
            apply_config(graph, plan, table, config)  # bias formats for the layers that gained a bias
            graph.metadata[META_KEY] = "calib-mean"
        sec["layers"] = rows
        sec["corrected"] = sum(1 for r in rows if r["applied"])
        return PassResult(changed)

