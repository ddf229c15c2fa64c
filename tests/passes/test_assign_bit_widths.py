"""assign-bit-widths and the seed-000 strategies: stopping rules on crafted evaluation values (NN* is the
network before the step that fell below the goal), then the pass end to end on small graphs."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.bitsearch import SearchContext
from mpqc.compiler.options import CompileOptions, SearchOptions
from mpqc.compiler.strategies import get_strategy
from mpqc.compiler.data import Dataset
from mpqc.core.errors import OptionError, TargetError
from mpqc.compiler.passes import PassContext, PassManager
from mpqc.compiler.pipelines import parse_pipeline
from mpqc.compiler.quant import BitConfig, FormatTableAnalysis, QuantPlan, QuantPlanAnalysis, weight_bytes
from mpqc.compiler.targets import get_target
from mpqc.compiler.quantsim import QuantSim

from tests.graphs import GraphBuilder, randn


# ------------------------------------------------------------------ crafted evaluation values
def chain(n_layers=3, width=4):
    b = GraphBuilder("chain")
    v = b.input("x", ["N", width])
    for i in range(n_layers):
        v = b.op("MatMul", [v, b.const(f"w{i}", randn(width, width, seed=i))], name=f"L{i}")
    return b.output(v)


class Influence:
    def __init__(self, influence):
        self.influence = influence


class Crafted(SearchContext):
    """Evaluation value = 1 - sum of the penalties of every rung each layer went down; the influence of a
    layer is given by ``infl(config, layer)``. Counts the influence computations."""

    def __init__(self, target="npu4", penalties=None, infl=None, goal=0.98, **options):
        g = chain()
        plan = QuantPlan.build(g)
        tgt = get_target(target)
        super().__init__(graph=g, plan=plan, table=None, sim=None, target=tgt,
                         data=Dataset(np.zeros((1, 4), np.float32), None, "crafted"), metric="agreement",
                         reference=None, float_value=1.0, goal=goal, options=SearchOptions(**options))
        self.penalties = penalties  # {layer name: [penalty of rung 1, rung 2, ...]}
        self.infl = infl
        self.influence_calls = 0

    def rung(self, config, n):
        return self.target.ladder.index(tuple(config.bits[n]))

    def evaluate(self, config, stop_below=False):  # (one sample: nothing to stop early)
        self.evaluations += 1
        return 1.0 - sum(sum(self.penalties[n.name][:self.rung(config, n)]) for n in self.layers)

    def influence(self, config, variant="chained", candidates=None):
        self.influence_calls += 1
        return Influence({n: self.infl(config, n) for n in self.layers if self.lower(config, n) is not None})

    def start(self):
        return BitConfig.uniform(self.layers, *self.target.ladder[0])

    def reduced(self, config):
        return sorted(n.name for n in self.layers if self.rung(config, n) > 0)


def const_infl(values):
    return lambda config, n: values[n.name]


def test_min_influence_returns_nn_star_when_the_last_step_falls_below_the_goal():
    s = Crafted(penalties={"L0": [0.02], "L1": [0.005], "L2": [0.01]},
                infl=const_infl({"L0": 0.3, "L1": 0.1, "L2": 0.2}))
    final = get_strategy("min-influence")(s, s.start())
    # L1 (0.995 > 0.98) then L2 (0.985) are kept; L0 would give 0.965 < 0.98: NN* is the network before it
    assert s.reduced(final) == ["L1", "L2"]
    assert [(t.action, t.layers, t.accepted) for t in s.trace] == [
        ("start", [], True), ("reduce", ["L1"], True), ("reduce", ["L2"], True), ("reduce", ["L0"], False)]
    assert s.trace[-1].value == pytest.approx(0.965) and s.trace[-1].extra["verdict"] == "below"
    assert s.influence_calls == 1  # influences measured once (no update)
    assert final.bits[s.layers[1]] == (4, 8) and final.bits[s.layers[0]] == (8, 8)


def test_min_influence_stops_on_a_value_equal_to_the_goal_with_the_reduced_network():
    s = Crafted(penalties={"L0": [0.01], "L1": [0.005], "L2": [0.005]}, goal=0.99,
                infl=const_infl({"L0": 0.3, "L1": 0.1, "L2": 0.2}))
    final = get_strategy("min-influence")(s, s.start())
    # L1 -> 0.995 (above), L2 -> 0.990 == goal: the patent returns this reduced network and stops
    assert s.reduced(final) == ["L1", "L2"]
    assert s.trace[-1].extra["verdict"] == "equal" and s.trace[-1].accepted
    assert len(s.trace) == 3  # L0 is never tried


def test_min_influence_does_not_reduce_a_layer_twice_unless_repeat():
    pen = {"L0": [0.001, 0.001, 0.001], "L1": [0.001, 0.001, 0.001], "L2": [0.001, 0.001, 0.001]}
    s = Crafted(penalties=pen, infl=const_infl({"L0": 0.3, "L1": 0.1, "L2": 0.2}))
    final = get_strategy("min-influence")(s, s.start())
    assert all(final.bits[n] == (4, 8) for n in s.layers)  # one rung each, every step above the goal
    r = Crafted(penalties=pen, infl=const_infl({"L0": 0.3, "L1": 0.1, "L2": 0.2}), repeat=True)
    final = get_strategy("min-influence")(r, r.start())
    # [0168]: once all are reduced the walk starts again on the next rung: 9 steps of 0.001, all above 0.98
    assert all(final.bits[n] == (2, 4) for n in r.layers) and r.influence_calls == 3


def test_threshold_reduces_every_layer_under_k_then_raises_k_and_returns_nn_star():
    s = Crafted(penalties={"L0": [0.02], "L1": [0.005], "L2": [0.01]},
                infl=const_infl({"L0": 0.3, "L1": 0.1, "L2": 0.1}))
    final = get_strategy("threshold")(s, s.start())
    assert s.reduced(final) == ["L1", "L2"]
    steps = [(t.action, t.layers, t.accepted, t.extra.get("threshold")) for t in s.trace]
    assert steps == [("start", [], True, None), ("reduce", ["L1", "L2"], True, 0.1),
                     ("raise-threshold", [], True, 0.3), ("reduce", ["L0"], False, 0.3)]


def test_threshold_doubling_k():
    s = Crafted(penalties={"L0": [0.001], "L1": [0.001], "L2": [0.03]},
                infl=const_infl({"L0": 0.3, "L1": 0.1, "L2": 0.5}), k_step="double", k_init=0.05)
    final = get_strategy("threshold")(s, s.start())
    reduces = [(t.layers, t.extra["threshold"], t.accepted) for t in s.trace if t.action == "reduce"]
    # K = 0.05 selects nothing, 0.1 -> L1, 0.2 nothing, 0.4 -> L0, 0.8 -> L2 falls below: NN* has L0, L1
    assert reduces == [(["L1"], 0.1, True), (["L0"], 0.4, True), (["L2"], 0.8, False)]
    assert s.reduced(final) == ["L0", "L1"]


def test_influence_update_recomputes_influences_and_reduces_a_layer_again():
    # penalty of each rung (w8a8 -> w4a8 -> w4a4 -> w2a4); the influence of a layer is the penalty of its
    # next rung, as the update strategy would measure it on the current network
    pen = {"L0": [0.001, 0.002, 0.05], "L1": [0.0, 0.001, 0.003], "L2": [0.004, 0.03, 0.1]}
    def infl(config, n):
        return pen[n.name][s.rung(config, n)]
    s = Crafted(penalties=pen, infl=infl)
    final = get_strategy("influence-update")(s, s.start())
    steps = [(t.layers[0], t.bits[t.layers[0]], t.accepted) for t in s.trace if t.action == "reduce"]
    assert steps == [("L1", [4, 8], True),  # I = 0.0
                     ("L0", [4, 8], True),  # tie 0.001 with L1: L0's step saves weight bytes
                     ("L1", [4, 4], True),
                     ("L0", [4, 4], True),  # 0.002 < L1's 0.003 < L2's 0.004
                     ("L1", [2, 4], True),  # L1 reaches b_m = 2
                     ("L2", [4, 8], True),
                     ("L2", [4, 4], False)]  # 0.989 - 0.03 = 0.959 < 0.98
    assert s.influence_calls == 7  # recomputed before every step
    L0, L1, L2 = s.layers
    assert (final.bits[L0], final.bits[L1], final.bits[L2]) == ((4, 4), (2, 4), (4, 8))
    assert s.evaluate(final) == pytest.approx(0.989)


def test_influence_update_ends_when_every_layer_is_at_b_m():
    pen = {n: [0.001, 0.001, 0.001] for n in ("L0", "L1", "L2")}
    s = Crafted(penalties=pen, infl=lambda c, n: 0.0)
    final = get_strategy("influence-update")(s, s.start())
    assert all(final.bits[n] == (2, 4) for n in s.layers) and all(t.accepted for t in s.trace)
    b = Crafted(penalties=pen, infl=lambda c, n: 0.0, target="npu4")
    b.min_bits = 4  # b_m = 4: the w2a4 rung is out of reach
    final = get_strategy("influence-update")(b, b.start())
    assert all(final.bits[n] == (4, 4) for n in b.layers)


def test_starting_network_below_the_goal_is_a_target_error():
    s = Crafted(penalties={"L0": [0.0], "L1": [0.0], "L2": [0.0]}, infl=const_infl({"L0": 0, "L1": 0, "L2": 0}),
                goal=1.5)
    with pytest.raises(TargetError, match="not met even before any layer is reduced"):
        get_strategy("min-influence")(s, s.start())


def test_unknown_strategy_and_rank():
    with pytest.raises(OptionError, match="unknown strategy 'greedy'"):
        get_strategy("greedy")
    s = Crafted(penalties={"L0": [0.0], "L1": [0.0], "L2": [0.0]}, infl=None, rank="alphabetical")
    with pytest.raises(OptionError, match="rank='alphabetical'"):
        get_strategy("min-influence")(s, s.start())


def test_ablation_orders_are_deterministic():
    pen = {"L0": [0.001], "L1": [0.001], "L2": [0.001]}
    names = []
    for rank in ("random", "random", "weight-range"):
        s = Crafted(penalties=pen, infl=None, rank=rank)
        get_strategy("min-influence")(s, s.start())
        names.append([t.layers[0] for t in s.trace if t.action == "reduce"])
        assert s.influence_calls == 0
    assert names[0] == names[1] and sorted(names[0]) == ["L0", "L1", "L2"]
    ptp = {f"L{i}": float(np.ptp(randn(4, 4, seed=i))) for i in range(3)}
    assert names[2] == sorted(ptp, key=ptp.get)


# ------------------------------------------------------------------ the pass on real graphs
def classifier():
    """Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: 3 layers, 5 classes."""
    b = GraphBuilder("clf")
    x = b.input("x", ["N", 2, 6, 6])
    h = b.op("Relu", [b.op("Conv", [x, b.const("w1", randn(6, 2, 3, 3, seed=1, scale=0.5)),
                                    b.const("b1", randn(6, seed=2, scale=0.1))], name="c1", pads=[1, 1, 1, 1])])
    h = b.op("Relu", [b.op("Conv", [h, b.const("w2", randn(8, 6, 3, 3, seed=3, scale=0.3))], name="c2",
                           pads=[1, 1, 1, 1])])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    return b.output(b.op("Gemm", [h, b.const("w3", randn(5, 8, seed=4)), b.const("b3", randn(5, seed=5))],
                         name="fc", transB=1))


def run_o2(spec, target="npu4", options=None, eval_data=True):
    g = classifier()
    x = randn(60, 2, 6, 6, seed=9)
    ctx = PassContext(target=get_target(target), batch_size=32)
    ctx.calib = Dataset(x[:30], None, "calib")
    ctx.eval = Dataset(x[30:], None, "eval") if eval_data else None
    ctx.options = CompileOptions.from_dict(options)
    pm = PassManager(parse_pipeline("choose-formats{start=ladder}," + spec))
    pm.run(g, ctx)
    g.verify()
    return g, ctx, pm


def sim_value(g, ctx, config, data):
    from mpqc.compiler.metrics import agreement
    plan = ctx.analyses.get(QuantPlanAnalysis, g)
    sim = QuantSim(plan, ctx.analyses.get(FormatTableAnalysis, g, search=2))
    return agreement(sim.run(config, data.x)[0], sim.run(None, data.x)[0])


def test_pass_writes_nn_star_on_the_ir_and_reports_the_search():
    g, ctx, pm = run_o2("assign-bit-widths{strategy=influence-update,max_drop=0.05}")
    assert pm.timings[-1].modified is True
    sec = ctx.report["passes"]["assign-bit-widths"]
    plan = ctx.analyses.get(QuantPlanAnalysis, g)
    bits = {n.name: [n.qconfig.weight_bits, n.qconfig.act_bits] for n in plan.layers}
    assert bits == sec["final_bits"] and bits != {n: [8, 8] for n in bits}
    final = BitConfig({n: tuple(bits[n.name]) for n in plan.layers}, 8)
    # the reported value is the fake-quantized network's agreement with the float one on the eval data
    assert sec["metric"] == "agreement" and sec["data"]["split"] == "eval" and sec["data"]["samples"] == 30
    assert sec["final_value"] == sim_value(g, ctx, final, ctx.eval) >= sec["goal"]
    assert sec["goal"] == pytest.approx(0.95 * sec["float_value"]) and sec["float_value"] == 1.0
    assert sec["weight_bytes"] == weight_bytes(plan, final) < sec["weight_bytes_int8"]
    trace = sec["trace"]
    assert trace[0]["action"] == "start" and trace[0]["value"] == sec["start_value"]
    kept = [t for t in trace if t["accepted"]]
    assert kept[-1]["bits"] == sec["final_bits"]
    # the search ends on a rejected step, or with every layer at b_m = 2
    assert not trace[-1]["accepted"] or all(b == [2, 4] for b in bits.values())
    assert set(sec["influence"]) == {"chained", "isolated", "reversed"}
    assert set(sec["influence"]["chained"]) == {"c1", "c2", "fc"}
    assert sec["evaluations"] >= 1 and sec["influence_sweeps"] >= 3
    # every accepted step's network really has the value the trace shows
    for t in kept[1:]:
        cfg = BitConfig({n: tuple(t["bits"][n.name]) for n in plan.layers}, 8)
        assert sim_value(g, ctx, cfg, ctx.eval) == t["value"]


def test_pass_reads_strategy_and_goal_from_the_cli_options_and_uses_calib_without_eval():
    g, ctx, pm = run_o2("assign-bit-widths{report_variants=false}", eval_data=False,
                        options={"strategy": "threshold", "target_score": 0.9})
    sec = ctx.report["passes"]["assign-bit-widths"]
    assert sec["strategy"] == "threshold" and sec["goal"] == 0.9
    assert sec["data"]["split"] == "calib" and sec["metric"] == "agreement"
    assert "no --eval data" in sec["note"]
    assert set(sec["influence"]) == {"chained"}


def test_pass_negative_nothing_can_be_reduced_below_b_m():
    g, ctx, pm = run_o2("assign-bit-widths{min_bits=8}")
    assert pm.timings[-1].modified is False
    sec = ctx.report["passes"]["assign-bit-widths"]
    assert [t["action"] for t in sec["trace"]] == ["start"]
    plan = ctx.analyses.get(QuantPlanAnalysis, g)
    assert all((n.qconfig.weight_bits, n.qconfig.act_bits) == (8, 8) for n in plan.layers)
    assert sec["weight_bytes"] == sec["weight_bytes_start"]


def test_pass_layer_range_keeps_the_other_layers():
    g, ctx, pm = run_o2("assign-bit-widths{layers=1:1,max_drop=0.5,strategy=min-influence,repeat=true}")
    plan = ctx.analyses.get(QuantPlanAnalysis, g)
    c1, c2, fc = plan.layers
    assert (c1.qconfig.weight_bits, fc.qconfig.weight_bits) == (8, 8)
    sec = ctx.report["passes"]["assign-bit-widths"]
    assert sec["layer_range"] == ["c2", "c2"]
    assert all(t["layers"] in ([], ["c2"]) for t in sec["trace"])


def test_pass_errors():
    with pytest.raises(TargetError, match="not met even before"):
        run_o2("assign-bit-widths{target_score=1.5}", options={"strict": True})
    # without --strict the starting network (the top of the ladder) is kept and the miss reported
    g, ctx, _ = run_o2("assign-bit-widths{target_score=1.5}")
    missed = ctx.report["passes"]["assign-bit-widths"]["goal_missed"]
    assert missed["goal"] == 1.5 and missed["missed_by"] == pytest.approx(1.5 - missed["value"])
    assert all(n.qconfig.weight_bits == 8 for n in g.layers())
    with pytest.raises(OptionError, match="either max_drop or target_score"):
        run_o2("assign-bit-widths{target_score=0.5,max_drop=0.1}")
    with pytest.raises(OptionError, match="unknown strategy"):
        run_o2("assign-bit-widths{strategy=nope}")
    with pytest.raises(OptionError, match="layer range"):
        run_o2("assign-bit-widths{layers=2:7}")


def test_deterministic_report():
    import json
    a = run_o2("assign-bit-widths{max_drop=0.05}")[1].report
    b = run_o2("assign-bit-widths{max_drop=0.05}")[1].report
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def test_auto_strategy_picks_influence_update_unless_too_costly():
    from mpqc.passes.assign_bit_widths import AUTO_BUDGET_RUNS, auto_strategy
    s = Crafted(penalties={}, infl=None)
    # 3 layers x 3 rungs: 9 steps of (2 + 3/2) runs = 31.5 runs
    assert auto_strategy(s, s.start()) == ("influence-update", auto_strategy(s, s.start())[1])
    assert "about 32 network runs for 3 layers and 9 layer-rungs" in auto_strategy(s, s.start())[1]
    big = Crafted(penalties={}, infl=None)
    big.candidates = big.layers * 40  # as if 120 layers: 360 layer-rungs x (2 + 60) runs >> the budget
    assert auto_strategy(big, big.start())[0] == "min-influence" and AUTO_BUDGET_RUNS == 400
    g, ctx, pm = run_o2("assign-bit-widths{max_drop=0.05}")
    sec = ctx.report["passes"]["assign-bit-widths"]
    assert sec["strategy"] == "influence-update" and sec["strategy_choice"].startswith("auto: influence-update")


def test_mse_and_psnr_need_an_absolute_target():
    with pytest.raises(OptionError, match="give --target-score"):
        run_o2("assign-bit-widths{metric=mse,max_drop=0.1}")
    g, ctx, pm = run_o2("assign-bit-widths{metric=psnr,target_score=20,strategy=min-influence}")
    sec = ctx.report["passes"]["assign-bit-widths"]
    assert sec["metric"] == "psnr" and sec["goal"] == 20.0 and sec["final_value"] >= 20.0
    assert sec["float_value"] == "inf" or sec["float_value"] == float("inf")
    with pytest.raises(OptionError, match="give --target-score"):
        run_o2("assign-bit-widths{metric=mse}")  # no goal at all


def test_the_search_scores_the_exported_fixed_point_network():
    from mpqc.compiler.metrics import agreement
    from mpqc.compiler.lowering import run_emulator
    g, ctx, pm = run_o2("layer-influence{bias_correction=true},"
                        "assign-bit-widths{bias_correction=true,max_drop=0.05},bias-correction,insert-qdq")
    sec = ctx.report["passes"]["assign-bit-widths"]
    from mpqc.runtime.executor import run_batched
    float_out = run_batched(classifier(), ctx.eval.x)[0]
    assert agreement(run_emulator(g, ctx.eval.x), float_out) == sec["final_value"]
    assert sec["bias_correction"] is True and any(b != [8, 8] for b in sec["final_bits"].values())
