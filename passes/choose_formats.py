"""choose-formats: profile activations and give every layer and tensor a Qm.n format.

Runs the ActivationRanges analysis on the calibration data, builds the
quantization plan (which tensors are quantized, which activations are fused) and
assigns every layer the same widths: the target's default (``-O1``), or the
options ``weight_bits`` / ``act_bits``, or the top of the target's ladder with
``start=ladder`` (what ``-O2`` searches down from). Fractional lengths are chosen by
minimum MSE around the range-derived value (docs/FIXED_POINT.md), per output channel
for weights when the target allows; tensors that are never negative on the
calibration data are unsigned. Writes ``node.qconfig`` and ``value.qformat`` and a
report section with each layer's formats and SQNR.

Options: weight_bits, act_bits (default: the target's), start ("default" or
"ladder"), search (MSE search half-width, default 2).
Requires: calibration data, a target. Preserves: activation ranges, quant plan, format table.
Method: fixed-point Qm.n formats (US 12,393,828 B2, FIG. 5-6; docs/FIXED_POINT.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpqc.core.errors import OptionError
from mpqc.core.ir import Graph
from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.core.qformat import fake_quant, sqnr_db
from mpqc.compiler.quant import (BitConfig, FormatTableAnalysis, QuantPlanAnalysis, apply_config,
                                 check_bias_fits)
from mpqc.compiler.ranges import ActivationRanges


@dataclass(frozen=True)
class ChooseFormatsPass(Pass):
    name = "choose-formats"
    preserves = frozenset({ActivationRanges, QuantPlanAnalysis, FormatTableAnalysis})

    weight_bits: int | None = None
    act_bits: int | None = None
    start: Literal["default", "ladder"] = "default"
    search: int = 2

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        tgt = ctx.target
        if tgt is None:
            raise OptionError("choose-formats needs a --target (see 'mpqc targets')")
        w, a = tgt.default_bits if self.start == "default" else tgt.ladder[0]
        w = self.weight_bits or w
        a = self.act_bits or a
        if w not in tgt.weight_bits:
            raise OptionError(f"weight_bits={w} is not offered by target {tgt.name} ({tgt.weight_bits})")
        if a not in tgt.act_bits:
            raise OptionError(f"act_bits={a} is not offered by target {tgt.name} ({tgt.act_bits})")
        plan = ctx.analyses.get(QuantPlanAnalysis, graph)
        table = ctx.analyses.get(FormatTableAnalysis, graph, search=self.search)
        config = BitConfig.uniform(plan.layers, w, a)
        before = _annotations(graph)
        apply_config(graph, plan, table, config)
        for n in plan.layers:
            if n.qconfig.bias_format is not None:
                check_bias_fits(n, n.bias.const, n.qconfig.bias_format)
        sec = ctx.section(self.name)
        sec["bits"] = {"weight": w, "act": a}
        sec["layers"] = layer_format_report(graph, plan, table)
        return PassResult(_annotations(graph) != before)


def _annotations(graph) -> list:
    """The decisions on the IR, comparable: running the pass again with the same result is no change."""
    out = []
    for n in graph.nodes:
        q = n.qconfig
        out.append(None if q is None else (q.weight_bits, q.act_bits, q.weight_format, q.bias_format))
    out.extend(v.qformat for v in graph.values() if not v.is_const)
    return out


def layer_format_report(graph, plan, table) -> list[dict]:
    """Per layer: widths, weight/activation formats and SQNR of weights and activations."""
    rows = []
    for n in plan.layers:
        q = n.qconfig
        out = plan.layer_out[n]
        st = table.stats.get(out)
        act_sqnr = sqnr_db(st.sample, fake_quant(st.sample, out.qformat)) if st is not None and st.count else None
        rows.append({
            "layer": n.name, "op": n.op_type, "weight_bits": q.weight_bits, "act_bits": q.act_bits,
            "weight_format": q.weight_format.to_json(), "act_format": out.qformat.to_json(),
            "act_format_text": out.qformat.describe(), "output": out.name,
            "fused_activation": plan.fused[n].op_type if plan.fused[n] is not None else None,
            "weight_sqnr_db": sqnr_db(n.weight.const, fake_quant(n.weight.const, q.weight_format)),
            "act_sqnr_db": act_sqnr,
        })
    return rows
