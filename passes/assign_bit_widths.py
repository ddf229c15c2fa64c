"""assign-bit-widths: mixed precision by layer influence (US 2021/0201141 A1; docs/LAYER_INFLUENCE.md).

Starts from the network the IR describes (after ``choose-formats{start=ladder}``
every layer is at the top rung of the target's ladder: npu8 w8a16, npu4 w8a8) and
walks layers down the ladder, one rung per step, with a search strategy of
``compiler.bitsearch`` (``threshold``, ``min-influence``, ``influence-update``, or one
registered by another module), keeping the evaluation value at or above the goal.
The result, NN*, is written on the IR (``node.qconfig``, ``value.qformat``).

The evaluation data is ``--eval`` when given (metric: ``--metric``, default top1
with labels), else the calibration data with agreement with the float model as
the metric; the report says which. The goal is ``float * (1 - max_drop)``
(``--max-drop``, default 0.01) or ``target_score`` (``--target-score``, absolute).

Options: strategy (default: ``--strategy``, else ``auto``: influence-update, the most
thorough, unless its estimated cost exceeds AUTO_BUDGET_RUNS network runs -- e.g.
EfficientNet-Lite0's 50 layers -- then min-influence), variant
(chained | isolated | reversed: how influences are measured), max_drop,
target_score, layers (the range [S, G] as ``S:G``, layer indices in graph order,
G may be negative), min_bits (b_m; default the target's), metric, data (eval |
calib), k_step (next | double) and k_init (threshold strategy), repeat (go on
with the next rung once every layer has been reduced: [0168]; threshold and
min-influence), rank (influence | random | weight-range: the ordering, random and
weight-range for ablations), signal (metric | kl | mse: what influences are measured in -- the
evaluation value, or the KL divergence / mean squared error against the float network's outputs,
which one rung always moves; default ``--rank-signal``, else metric; the goal stays on the
metric), ranking_subset (measure influences on this many evaluation samples, evenly spaced;
candidates are still judged on the whole split; default ``--ranking-subset``, else all), early_stop
(default true: a candidate's evaluation stops, batch by batch, once the samples left could not bring
a top1/top5/agreement value up to the goal; the verdict is the same, the trace step's value is then an
upper bound and its ``early_stop`` says after how many samples), report_variants (also measure the other influence
variants on the starting network, for the report), format_search, bias_correction
(score every network with the bias correction the bias-correction pass applies
afterwards: set it when that pass follows, as in -O2); for the
weight-difference strategies (weight-diff-bsearch, weight-diff-topk: US 12,393,828 B2,
``compiler.weight_diff``, docs/WEIGHT_DIFFERENCE.md): cycles (default ``--cycles``, else
50), statistic, floor, count, keep_smallest, max_loss, mode (binary | halving), quantized
(train with fake quantization), train_lr, train_batch_size, train_momentum (they train on
``--train``).
Requires: choose-formats (formats and starting widths), data, a target.
Preserves: activation ranges, quant plan, format table.
``--time-budget`` stops the search (an influence sweep between batches, or before an
evaluation) and keeps the smallest network a step accepted (``time_budget_exceeded``).
Report: goal, float/start/final values, each layer's influence under each variant,
the full search trace, final bits, weight bytes and estimated MAC cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpqc.compiler.bitsearch import (INFLUENCE_STRATEGIES, LayerInfluence, TimeBudgetExceeded, missed_goal,
                                     ranking_options, search_context, search_goal)
from mpqc.compiler.influence import lower_rung
from mpqc.compiler.info import layer_macs
from mpqc.compiler.options import VARIANTS, SearchOptions
from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.compiler.quant import (BitConfig, FormatTableAnalysis, QuantPlanAnalysis, apply_config, check_bias_fits,
                                 config_from_ir, weight_bytes)
from mpqc.compiler.ranges import ActivationRanges
from mpqc.compiler.strategies import get_strategy
from mpqc.core.errors import OptionError
from mpqc.core.ir import Graph

#: ``strategy=auto`` (the default) runs influence-update, the most thorough strategy, unless its cost --
#: about (layers x rungs) steps of one influence sweep (1 + layers / 2 network runs) and one evaluation
#: each -- exceeds this many full network runs; then min-influence (one sweep, one run per step)
AUTO_BUDGET_RUNS = 400


def auto_strategy(sctx, start) -> tuple[str, str]:
    n_layers = rungs = 0
    for n in sctx.range_layers:
        r, b = 0, start.bits[n]
        while (b := lower_rung(sctx.target, b, sctx.min_bits)) is not None:
            r += 1
        n_layers += r > 0
        rungs += r
    est = rungs * (2 + n_layers / 2)
    strategy = "influence-update" if est <= AUTO_BUDGET_RUNS else "min-influence"
    return strategy, (f"auto: {strategy} (influence-update would take about {est:.0f} network runs for "
                      f"{n_layers} layers and {rungs} layer-rungs; budget {AUTO_BUDGET_RUNS})")


@dataclass(frozen=True)
class AssignBitWidthsPass(Pass):
    name = "assign-bit-widths"
    preserves = frozenset({ActivationRanges, QuantPlanAnalysis, FormatTableAnalysis})
    requires = ("target", "formats", "data")

    strategy: str | None = None
    variant: Literal["chained", "isolated", "reversed"] = "chained"
    max_drop: float | None = None
    target_score: float | None = None
    layers: tuple[int, int] | None = None
    min_bits: int | None = None
    metric: str | None = None
    data: str | None = None
    k_step: Literal["next", "double"] = "next"
    k_init: float | None = None
    repeat: bool = False
    rank: Literal["influence", "random", "weight-range"] = "influence"
    signal: Literal["metric", "kl", "mse"] | None = None
    ranking_subset: int | None = None
    early_stop: bool = True
    report_variants: bool = True
    format_search: int = 2
    bias_correction: bool = False
    # weight-difference strategies (US 12,393,828 B2, compiler.weight_diff): training cycles on --train, the
    # statistic, the binary search's floor, weight-diff-topk's count, claim 6, and the largest accuracy
    # loss against the all-high network (default: the goal above)
    cycles: int | None = None
    statistic: Literal["mean-square", "mean", "variance", "std"] = "mean-square"
    floor: int = 0
    count: int | None = None
    keep_smallest: bool = False
    max_loss: float | None = None
    train_lr: float = 0.01
    train_batch_size: int = 32
    train_momentum: float = 0.9
    quantized: bool = False
    mode: Literal["binary", "halving"] = "binary"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.data not in (None, "eval", "calib"):
            raise OptionError(f"assign-bit-widths: data={self.data!r} must be eval or calib")
        if self.min_bits is not None and self.min_bits < 1:
            raise OptionError(f"assign-bit-widths: min_bits={self.min_bits} must be at least 1")
        strategy = self.strategy or ctx.options.strategy or "auto"
        max_drop, target_score = search_goal(self.max_drop, self.target_score, ctx.options, self.name)
        signal, subset = ranking_options(self.signal, self.ranking_subset, ctx.options, self.name)
        if strategy != "auto":
            get_strategy(strategy)  # an unknown name fails before any work
        sopts = SearchOptions(variant=self.variant, k_step=self.k_step, k_init=self.k_init, repeat=self.repeat,
                              rank=self.rank, strategy=strategy, signal=signal, ranking_subset=subset,
                              early_stop=self.early_stop,
                              cycles=self.cycles if self.cycles is not None else ctx.options.cycles,
                              statistic=self.statistic, floor=self.floor, count=self.count,
                              keep_smallest=self.keep_smallest, max_loss=self.max_loss, train=ctx.train,
                              train_lr=self.train_lr, train_batch_size=self.train_batch_size,
                              train_momentum=self.train_momentum, quantized=self.quantized, mode=self.mode)
        sctx = search_context(graph, ctx, split=self.data, metric=self.metric, max_drop=max_drop,
                              target_score=target_score, layer_range=self.layers, min_bits=self.min_bits,
                              format_search=self.format_search, options=sopts,
                              bias_correction=self.bias_correction)
        plan, table = sctx.plan, sctx.table
        start = config_from_ir(plan)
        missed = missed_goal(sctx, start, ctx.options.strict)  # before measuring anything else
        if missed is not None:  # the best network there is: the start; the driver says by how much
            ctx.section(self.name).update({"goal_missed": missed, "strategy": strategy, "goal": sctx.goal,
                                           "float_value": sctx.float_value, "metric": sctx.metric})
            return PassResult(False)
        choice = None
        if strategy == "auto":
            strategy, choice = auto_strategy(sctx, start)
            sctx.options.strategy = strategy
        fn = get_strategy(strategy)
        # influences of the starting network: from the analysis cache (the layer-influence pass), so
        # the strategy's first ranking does not measure them again
        ana = dict(split=self.data, metric=self.metric, layer_range=self.layers, min_bits=self.min_bits,
                   bias_correction=self.bias_correction, signal=signal, ranking_subset=subset)
        ranked = self.rank == "influence" and strategy in INFLUENCE_STRATEGIES
        variants = (VARIANTS if self.report_variants else (self.variant,)) if ranked else ()
        initial = {}
        stopped = None
        try:
            for v in variants:
                res = ctx.analyses.get(LayerInfluence, graph, variant=v, **ana)
                initial[v] = res
                sctx.add_influence(res)
            final = fn(sctx, start)
        except TimeBudgetExceeded:  # --time-budget: the best network accepted so far
            if not sctx.trace:  # stopped before the strategy began: the starting network (measured)
                sctx.record("start", [], start, sctx.evaluate(start), True, goal=sctx.goal)
            final = sctx.best_accepted() or start
            stopped = {"seconds": ctx.options.time_budget, "steps": len(sctx.trace),
                       "message": f"the --time-budget of {ctx.options.time_budget:g} s ran out after "
                                  f"{len(sctx.trace)} search step(s); the best network accepted so far is kept"}
        modified = final.key(plan.layers) != start.key(plan.layers)
        if modified:
            apply_config(graph, plan, table, final, note=self.name)
            for n in plan.layers:
                if n.qconfig.bias_format is not None:
                    check_bias_fits(n, n.bias.const, n.qconfig.bias_format)
        ctx.section(self.name).update(search_report(sctx, start, final, initial, strategy),
                                      strategy_choice=choice or "given")
        if stopped is not None:
            ctx.section(self.name)["time_budget_exceeded"] = stopped
        return PassResult(modified)


def mac_cost(plan, target, config: BitConfig) -> float:
    return float(sum(layer_macs(n) * target.mac_cost(*config.bits[n]) for n in plan.layers))


def ranking_savings(sctx) -> dict:
    """What the influence sweeps ran on, and what the ranking subset skipped: per sweep, one suffix run
    per cut and batch over the ranking samples instead of the whole split (sample-runs: samples times
    network runs, the prefix counted as one run)."""
    full = len(sctx.data)
    done = skipped = 0
    for r in sctx.influences:
        if not r.candidates:
            continue
        runs = 1 + (r.stats.suffix_runs // max(r.stats.batches, 1))  # the prefix and one suffix per cut
        done += runs * r.samples
        skipped += runs * (full - r.samples)
    samples = sctx.ranking_data()[0]
    return {"signal": sctx.options.signal, "samples": len(samples), "of": full,
            "subset": sctx.options.ranking_subset, "sweeps": sctx.influence_sweeps,
            "sample_runs": done, "sample_runs_skipped": skipped}


def search_report(sctx, start: BitConfig, final: BitConfig, initial: dict, strategy: str) -> dict:
    """The pass's report section (JSON-ready)."""
    plan, tgt = sctx.plan, sctx.target
    int8 = BitConfig.uniform(plan.layers, 8, 8)
    wb_final, wb_int8 = weight_bytes(plan, final), weight_bytes(plan, int8)
    rows = []
    for i, n in enumerate(plan.layers):
        w, a = final.bits[n]
        rows.append({"index": i, "layer": n.name, "op": n.op_type, "params": int(n.weight.const.size),
                     "macs": int(layer_macs(n)), "start_bits": list(start.bits[n]), "weight_bits": w, "act_bits": a,
                     "weight_bytes": n.weight.const.size * w / 8,
                     "in_range": any(n is m for m in sctx.range_layers),
                     "influence": {v: (float(r.influence[n]) if n in r.influence else None)
                                   for v, r in initial.items()}})
    final_value = sctx.evaluate(final)
    return {
        "strategy": strategy, "variant": sctx.options.variant, "rank": sctx.options.rank,
        "signal": sctx.options.signal, "ranking": ranking_savings(sctx),
        "early_stop": {"enabled": bool(sctx.options.early_stop), "evaluations": len(sctx.early_stops),
                       "samples_run": sum(a for a, _ in sctx.early_stops),
                       "samples_skipped": sum(b - a for a, b in sctx.early_stops)},
        "bias_correction": bool(sctx.options.bias_correction),
        "metric": sctx.metric, "data": {"split": sctx.options.split, "source": sctx.data.source,
                                        "samples": len(sctx.data)},
        "note": sctx.options.note,
        "goal": sctx.goal, "float_value": sctx.float_value, "start_value": sctx.evaluate(start),
        "final_value": final_value, "min_bits": tgt.min_bits if sctx.min_bits is None else sctx.min_bits,
        "ladder": [list(x) for x in tgt.ladder],
        "layer_range": [sctx.range_layers[0].name, sctx.range_layers[-1].name] if sctx.range_layers else None,
        "influence": {v: {n.name: float(i) for n, i in r.influence.items()} for v, r in initial.items()},
        "influence_values": {v: {"points": r.value_layers, "values": [float(x) for x in r.values],
                                 "base": float(r.base_value)} for v, r in initial.items()},
        "trace": [s.to_json() for s in sctx.trace],
        "final_bits": {n.name: list(final.bits[n]) for n in plan.layers},
        "layers": rows,
        "weight_bytes": wb_final, "weight_bytes_start": weight_bytes(plan, start), "weight_bytes_int8": wb_int8,
        "weight_ratio_int8": wb_final / wb_int8 if wb_int8 else None,
        "mac_cost": mac_cost(plan, tgt, final), "mac_cost_start": mac_cost(plan, tgt, start),
        "mac_cost_int8": mac_cost(plan, tgt, int8),
        "evaluations": sctx.evaluations, "influence_sweeps": sctx.influence_sweeps,
        "suffix_runs": sctx.suffix_runs,
    }
