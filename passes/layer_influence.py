"""layer-influence: measure each layer's degree of influence and report it (US 2021/0201141 A1,
"Neural network optimization method, and neural network optimization device"; docs/LAYER_INFLUENCE.md).

Runs the ``LayerInfluence`` analysis on the network the IR describes (NN_T: the
widths ``choose-formats`` gave; NN_S: every layer of the range one rung lower on
the target's ladder) for each requested variant — ``chained`` (the patent's
FIG. 8/10/13: NN_S prefix, NN_T suffix), ``isolated`` and ``reversed`` ([0167]) —
and writes the influences and the evaluation values along the cuts to the report.
It changes nothing; the results stay cached for ``assign-bit-widths``.

Options: variants (colon-separated, default all three), layers (range S:G),
min_bits (b_m), metric, data (eval | calib; default eval when given), bias_correction
(both networks carry the bias correction of the bias-correction pass), signal (metric | kl | mse:
what influences are measured in; default ``--rank-signal``, else metric) and ranking_subset (how
many evaluation samples, evenly spaced; default ``--ranking-subset``, else all).
With ``--max-drop`` / ``--target-score`` given, a starting network that already misses the goal is a
``TargetError`` before any sweep. Skipped (nothing measured) when ``--strategy`` names a strategy that does not rank by
influence (the weight-difference ones). When ``--time-budget`` runs out during a sweep the pass
stops measuring (``time_budget_exceeded`` in its section) and the search keeps the starting network.
Requires: choose-formats, data, a target. Preserves: everything (it does not modify the graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpqc.compiler.bitsearch import (INFLUENCE_STRATEGIES, LayerInfluence, TimeBudgetExceeded, missed_goal,
                                     ranking_options, search_context)
from mpqc.compiler.options import VARIANTS
from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.compiler.quant import config_from_ir
from mpqc.core.errors import OptionError
from mpqc.core.ir import Graph


@dataclass(frozen=True)
class LayerInfluencePass(Pass):
    name = "layer-influence"
    requires = ("target", "formats", "data")

    variants: tuple[str, ...] = VARIANTS
    layers: tuple[int, int] | None = None
    min_bits: int | None = None
    metric: str | None = None
    data: str | None = None
    bias_correction: bool = False
    signal: Literal["metric", "kl", "mse"] | None = None
    ranking_subset: int | None = None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise OptionError(f"layer-influence: variants={':'.join(self.variants)} must name some of "
                              f"{', '.join(VARIANTS)} (separated by ':')")
        if self.data not in (None, "eval", "calib"):
            raise OptionError(f"layer-influence: data={self.data!r} must be eval or calib")
        signal, subset = ranking_options(self.signal, self.ranking_subset, ctx.options, self.name)
        sec = ctx.section(self.name)
        strategy = ctx.options.strategy
        if strategy is not None and strategy not in INFLUENCE_STRATEGIES + ("auto",):
            sec["skipped"] = f"--strategy {strategy} does not rank layers by influence"
            return PassResult(False)
        opts = ctx.options
        if opts.max_drop is not None or opts.target_score is not None:
            # an accuracy target the starting network already misses: fail before the sweeps
            sctx = search_context(graph, ctx, split=self.data, metric=self.metric, max_drop=opts.max_drop,
                                  target_score=opts.target_score, layer_range=self.layers,
                                  min_bits=self.min_bits, bias_correction=self.bias_correction)
            if missed_goal(sctx, config_from_ir(sctx.plan), opts.strict) is not None:
                sec["skipped"] = "the starting network already misses the accuracy goal: no layer can be reduced"
                return PassResult(False)
        for v in self.variants:
            try:
                res = ctx.analyses.get(LayerInfluence, graph, variant=v, split=self.data, metric=self.metric,
                                       layer_range=self.layers, min_bits=self.min_bits,
                                       bias_correction=self.bias_correction, signal=signal,
                                       ranking_subset=subset)
            except TimeBudgetExceeded:
                sec["time_budget_exceeded"] = f"the --time-budget ran out during the {v} sweep"
                break
            sec[v] = res.to_json()
        return PassResult(False)
