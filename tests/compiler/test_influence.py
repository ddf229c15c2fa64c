"""LayerInfluence (seed 000, ALGORITHMS.md §2): hand-computed influences on a 3-layer chain, cuts and
sweeps on a graph with branches, batching, and the analysis through a PassContext."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.data import Dataset
from mpqc.core.errors import OptionError
from mpqc.compiler.bitsearch import LayerInfluence
from mpqc.compiler.influence import (VARIANTS, compute_influence, crossing_values,
                                     cut_positions, layer_range, lower_rung, reduced_config, stream_order,
                                     sweep)
from mpqc.compiler.metrics import agreement, neg_mse
from mpqc.compiler.passes import PassContext, PassManager
from mpqc.compiler.pipelines import parse_pipeline
from mpqc.core.qformat import QFormat
from mpqc.compiler.quant import BitConfig, FormatTable, QuantPlan
from mpqc.compiler.targets import get_target
from mpqc.compiler.quantsim import QuantSim

from tests.graphs import GraphBuilder, randn

# ------------------------------------------------------------------ the hand-built 3-layer chain
# y = w2 * (w1 * (w0 * x)), three 1x1 MatMuls, one sample x = 1.
# NN_T: weights 8 bit Q0.7 (exact: 88/128, 72/128, 104/128); NN_S: weights 4 bit Q0.3:
#   w0 = 0.6875 -> 5.5 -> 6/8 = 0.75, w1 = 0.5625 -> 4.5 -> 5/8 = 0.625, w2 = 0.8125 -> 6.5 -> 7/8 = 0.875
# (round half up). Activations stay 8 bit: x in Q1.6, y0 in Q0.7, y1 and y2 in Q(-1).8 (steps 1/64, 1/128,
# 1/256). y0 = w0 and y1 = w0*w1 are exact on their grids for every mix; y2 = w0*w1*w2 is rounded to 1/256:
W = (0.6875, 0.5625, 0.8125)
WS = (0.75, 0.625, 0.875)
REF = 0.6875 * 0.5625 * 0.8125  # the float output 0.314208984375
# y2 * 256 before and after rounding, for each mix (T = 8-bit weights, S = 4-bit), by hand:
#   TTT 80.4375 -> 80   STT 87.75 -> 88   TST 89.375 -> 89   TTS 86.625 -> 87
#   SST 97.5    -> 98   STS 94.5  -> 94   TSS 96.25  -> 96   SSS 105    -> 105
# (activation ties go to the even neighbour: npu4 rounds requantization shifts half to even)
CODE = {"TTT": 80, "STT": 88, "TST": 89, "TTS": 87, "SST": 98, "STS": 94, "TSS": 96, "SSS": 105}


def P(mix: str) -> float:
    """Evaluation value (negative MSE against the float output) of one mix."""
    return -((CODE[mix] / 256 - REF) ** 2)


class HandTable(FormatTable):
    """Formats fixed by hand (independent of the MSE choice of fractional lengths)."""

    def __init__(self, plan, target, act_frac):
        super().__init__(plan, {}, target)
        self.act_frac = act_frac

    def weight_format(self, node, bits):
        return QFormat(bits, 7 if bits == 8 else 3, True)

    def act_format(self, v, bits):
        return QFormat(bits, self.act_frac[v.name], True)


def chain3():
    b = GraphBuilder("chain3")
    x = b.input("x", ["N", 1])
    y0 = b.op("MatMul", [x, b.const("w0", np.array([[W[0]]], np.float32))], name="L0")
    y1 = b.op("MatMul", [y0, b.const("w1", np.array([[W[1]]], np.float32))], name="L1")
    y2 = b.op("MatMul", [y1, b.const("w2", np.array([[W[2]]], np.float32))], name="L2")
    g = b.output(y2)
    plan = QuantPlan.build(g)
    tgt = get_target("npu4")  # ladder w8a8 -> w4a8 -> ...: the first rung changes weights only
    table = HandTable(plan, tgt, {"x": 6, "L0_out": 7, "L1_out": 8, "L2_out": 8})
    return g, plan, tgt, QuantSim(plan, table)


def score_mse(out):
    return neg_mse(out, np.array([[REF]], np.float32))


def influence3(variant, **kw):
    g, plan, tgt, sim = chain3()
    T = BitConfig.uniform(plan.layers, 8, 8)
    return plan, compute_influence(sim, tgt, T, np.ones((1, 1), np.float32), score_mse, variant=variant, **kw)


def test_hand_chain_every_mix_matches_the_hand_codes():
    g, plan, tgt, sim = chain3()
    x = np.ones((1, 1), np.float32)
    for mix, code in CODE.items():
        cfg = BitConfig({n: ((4, 8) if c == "S" else (8, 8)) for n, c in zip(plan.layers, mix)}, 8)
        assert sim.run(cfg, x)[0][0, 0] == code / 256, mix


def test_chained_influence_equals_hand_computation():
    plan, r = influence3("chained")
    L0, L1, L2 = plan.layers
    # P_0 = eval(NN_T); P_1: L0 from NN_S; P_2: L0, L1 from NN_S; P_3 = eval(NN_S)
    assert r.values == pytest.approx([P("TTT"), P("STT"), P("SST"), P("SSS")], abs=0, rel=1e-12)
    assert r.influence[L0] == pytest.approx(P("TTT") - P("STT"), rel=1e-12)
    assert r.influence[L1] == pytest.approx(P("STT") - P("SST"), rel=1e-12)
    assert r.influence[L2] == pytest.approx(P("SST") - P("SSS"), rel=1e-12)
    assert r.base_value == P("TTT") and r.reduced_value == P("SSS")
    assert r.stats.prefix_runs == 1 and r.stats.suffix_runs == 4  # one prefix, one suffix per cut
    # telescoping: the influences add up to eval(NN_T) - eval(NN_S)
    assert sum(r.influence.values()) == pytest.approx(P("TTT") - P("SSS"), rel=1e-12)
    # (88/256 - REF)^2 - (80/256 - REF)^2 = 0.0295410^2 - 0.0017090^2
    assert r.influence[L0] == pytest.approx(0.000869750976562, rel=1e-9)


def test_isolated_influence_equals_hand_computation():
    plan, r = influence3("isolated")
    L0, L1, L2 = plan.layers
    assert r.influence[L0] == pytest.approx(P("TTT") - P("STT"), rel=1e-12)
    assert r.influence[L1] == pytest.approx(P("TTT") - P("TST"), rel=1e-12)
    assert r.influence[L2] == pytest.approx(P("TTT") - P("TTS"), rel=1e-12)
    assert r.values == pytest.approx([P("STT"), P("TST"), P("TTS")], rel=1e-12)


def test_reversed_influence_equals_hand_computation():
    plan, r = influence3("reversed")
    L0, L1, L2 = plan.layers
    # Q_0 = eval(NN_S), Q_1: L0 from NN_T, rest NN_S; Q_2: L0, L1 from NN_T; Q_3 = eval(NN_T)
    assert r.values == pytest.approx([P("SSS"), P("TSS"), P("TTS"), P("TTT")], rel=1e-12)
    assert r.influence[L0] == pytest.approx(P("TSS") - P("SSS"), rel=1e-12)
    assert r.influence[L1] == pytest.approx(P("TTS") - P("TSS"), rel=1e-12)
    assert r.influence[L2] == pytest.approx(P("TTT") - P("TTS"), rel=1e-12)


def test_variants_rank_the_layers_differently():
    # the hand numbers make the point of [0167]: the variants disagree on which layer is least harmful
    order = {}
    for v in VARIANTS:
        plan, r = influence3(v)
        order[v] = [n.name for n in sorted(r.influence, key=lambda n: r.influence[n])]
    assert order["chained"] == ["L0", "L1", "L2"]
    assert order["isolated"] == ["L2", "L0", "L1"]
    assert order["reversed"] == ["L2", "L1", "L0"]


def test_range_restricts_the_candidates_and_cuts():
    plan, r = influence3("chained", candidates=None)
    g, plan2, tgt, sim = chain3()
    T = BitConfig.uniform(plan2.layers, 8, 8)
    rng = layer_range(plan2.layers, (1, 2))
    r2 = compute_influence(sim, tgt, T, np.ones((1, 1), np.float32), score_mse, candidates=rng)
    assert [n.name for n in r2.candidates] == ["L1", "L2"]
    # NN_S reduces only L1 and L2: P_1 = eval(TTT), P_2 = TST, P_3 = TSS
    assert r2.values == pytest.approx([P("TTT"), P("TST"), P("TSS")], rel=1e-12)
    assert r2.reduced.bits[plan2.layers[0]] == (8, 8)
    with pytest.raises(OptionError, match="layer range"):
        layer_range(plan2.layers, (2, 1))
    assert [n.name for n in layer_range(plan2.layers, (0, -2))] == ["L0", "L1"]


def test_layers_at_the_bottom_or_at_b_m_get_no_influence():
    g, plan, tgt, sim = chain3()
    L0, L1, L2 = plan.layers
    cfg = BitConfig({L0: (2, 4), L1: (4, 8), L2: (4, 4)}, 8)
    assert lower_rung(tgt, (2, 4)) is None and lower_rung(tgt, (4, 4)) == (2, 4)
    assert lower_rung(tgt, (4, 4), min_bits=4) is None
    s, moved = reduced_config(tgt, cfg, plan.layers)
    assert moved == [L1, L2] and s.bits[L1] == (4, 4) and s.bits[L0] == (2, 4)
    s4, moved4 = reduced_config(tgt, cfg, plan.layers, min_bits=4)
    assert moved4 == [L1]
    bottom = BitConfig({n: (2, 4) for n in plan.layers}, 8)
    r = compute_influence(sim, tgt, bottom, np.ones((1, 1), np.float32), score_mse)
    assert r.candidates == [] and r.influence == {} and r.stats.suffix_runs == 0  # no sweep at all


def test_unknown_variant_is_an_option_error():
    with pytest.raises(OptionError, match="variant"):
        influence3("sideways")


# ------------------------------------------------------------------ a graph with branches
def branchy():
    """x -> Conv A -> Relu -> {Conv B -> Relu, Conv C} -> Add -> Conv D -> output."""
    b = GraphBuilder("branchy")
    x = b.input("x", ["N", 2, 5, 5])
    a = b.op("Relu", [b.op("Conv", [x, b.const("wa", randn(4, 2, 3, 3, seed=1, scale=0.4)),
                                    b.const("ba", randn(4, seed=2, scale=0.1))], name="A", pads=[1, 1, 1, 1])],
             name="ra")
    c = b.op("Conv", [a, b.const("wc", randn(4, 4, 1, 1, seed=3, scale=0.5))], name="C")
    bb = b.op("Relu", [b.op("Conv", [a, b.const("wb", randn(4, 4, 3, 3, seed=4, scale=0.3))], name="B",
                            pads=[1, 1, 1, 1])], name="rb")
    s = b.op("Add", [bb, c], name="add")
    d = b.op("Conv", [s, b.const("wd", randn(3, 4, 1, 1, seed=5, scale=0.5))], name="D")
    g = b.output(b.op("Flatten", [d], name="flat"))
    return g


def branchy_ctx(n=40, target="npu4"):
    g = branchy()
    x = randn(n, 2, 5, 5, seed=7)
    ctx = PassContext(target=get_target(target), batch_size=16)
    ctx.calib = Dataset(x[:20], None, "calib")
    ctx.eval = Dataset(x, None, "eval")
    PassManager(parse_pipeline("choose-formats{start=ladder}")).run(g, ctx)
    from mpqc.compiler.quant import FormatTableAnalysis, QuantPlanAnalysis
    plan = ctx.analyses.get(QuantPlanAnalysis, g)
    table = ctx.analyses.get(FormatTableAnalysis, g, search=2)
    return g, ctx, plan, QuantSim(plan, table), x


def test_cuts_follow_topological_order_and_keep_fused_activations_with_their_layer():
    g, ctx, plan, sim, x = branchy_ctx()
    order = stream_order(plan)
    names = [n.name for n in order]
    assert [n.name for n in plan.layers] == ["A", "C", "B", "D"]
    assert names.index("ra") == names.index("A") + 1 and names.index("rb") == names.index("B") + 1
    cuts = cut_positions(plan, order)
    assert cuts == [names.index("A"), names.index("C"), names.index("B"), names.index("D"), len(order)]
    # the cut before B is crossed by A's activation (read by B) and C's output (read by the Add)
    cross = {v.name for v in crossing_values(order, g, cuts[2])}
    assert cross == {"ra_out", "C_out"}
    assert {v.name for v in crossing_values(order, g, cuts[1])} == {"ra_out"}
    assert {v.name for v in crossing_values(order, g, 0)} == {"x"}


@pytest.mark.parametrize("target", ["npu4", "npu8"])
def test_sweep_values_equal_full_runs_of_the_mixed_networks(target):
    """Each cut of a sweep is the network whose layers before the cut are NN_S's and after it NN_T's."""
    g, ctx, plan, sim, x = branchy_ctx(target=target)
    tgt = ctx.target
    T = BitConfig.uniform(plan.layers, *tgt.ladder[0])
    S, _ = reduced_config(tgt, T, plan.layers)
    order = stream_order(plan)
    cuts = cut_positions(plan, order)
    mixed = [BitConfig({n: (S.bits[n] if i < k else T.bits[n]) for i, n in enumerate(plan.layers)},
                       T.input_bits) for k in range(len(cuts))]
    mixed_r = [BitConfig({n: (T.bits[n] if i < k else S.bits[n]) for i, n in enumerate(plan.layers)},
                         T.input_bits) for k in range(len(cuts))]
    outs = sweep(sim, x, S, list(zip(cuts, mixed)), batch_size=16)
    rev = sweep(sim, x, T, list(zip(cuts, mixed_r)), batch_size=7)
    for k in range(len(cuts)):
        np.testing.assert_array_equal(outs[k], sim.run(mixed[k], x, batch_size=16)[0])
        np.testing.assert_array_equal(rev[k], sim.run(mixed_r[k], x, batch_size=7)[0])
    np.testing.assert_array_equal(outs[0], sim.run(T, x, batch_size=16)[0])
    np.testing.assert_array_equal(outs[-1], sim.run(S, x, batch_size=16)[0])


def test_batching_does_not_change_influences():
    g, ctx, plan, sim, x = branchy_ctx()
    T = BitConfig.uniform(plan.layers, 8, 8)
    ref = sim.run(None, x)[0]
    def score(o):
        return neg_mse(o, ref)
    a = compute_influence(sim, ctx.target, T, x, score, batch_size=40)
    b = compute_influence(sim, ctx.target, T, x, score, batch_size=3)
    assert b.stats.batches == 14 and b.stats.prefix_runs == 14 and b.stats.suffix_runs == 14 * 5
    for n in plan.layers:
        assert a.influence[n] == pytest.approx(b.influence[n], rel=1e-6, abs=1e-12)


def test_analysis_through_the_pass_context_uses_the_ir_bits_and_agreement_on_calib():
    g, ctx, plan, sim, x = branchy_ctx()
    ctx.eval = None  # only --calib: agreement with the float model on the calibration data
    r = ctx.analyses.get(LayerInfluence, g, variant="chained")
    assert r.config.bits == {n: (8, 8) for n in plan.layers}
    calib = ctx.calib.x
    T = BitConfig.uniform(plan.layers, 8, 8)
    assert r.base_value == agreement(sim.run(T, calib)[0], sim.run(None, calib)[0])
    S, _ = reduced_config(ctx.target, T, plan.layers)
    assert r.reduced_value == agreement(sim.run(S, calib)[0], sim.run(None, calib)[0])
    assert ctx.analyses.get(LayerInfluence, g, variant="chained") is r  # cached
    assert set(r.influence) == set(plan.layers)
    assert sum(r.influence.values()) == pytest.approx(r.base_value - r.reduced_value, abs=1e-12)
