"""The ranking signal (--rank-signal) and the ranking subset (--ranking-subset) of the influence sweeps."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.bitsearch import LayerInfluence, search_context
from mpqc.compiler.influence import compute_influence, cut_positions, mixed_config, reduced_config, stream_order
from mpqc.compiler.metrics import agreement, neg_kl, signal_value
from mpqc.compiler.options import CompileOptions, SearchOptions
from mpqc.compiler.quant import BitConfig
from mpqc.core.errors import OptionError

from tests.compiler.test_influence import branchy_ctx
from tests.passes.test_assign_bit_widths import run_o2, sim_value


# ------------------------------------------------------------------ the signals, by hand
def test_kl_of_logits_equals_the_hand_formula():
    ref = np.array([[0.0, np.log(3.0)], [np.log(2.0), np.log(2.0)]])  # softmax: (1/4, 3/4), (1/2, 1/2)
    out = np.array([[0.0, 0.0], [0.0, np.log(4.0)]])  # softmax: (1/2, 1/2), (1/5, 4/5)
    kl0 = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    kl1 = 0.5 * np.log(0.5 / 0.2) + 0.5 * np.log(0.5 / 0.8)
    assert neg_kl(out, ref) == pytest.approx(-(kl0 + kl1) / 2, rel=1e-12)
    assert neg_kl(ref, ref) == pytest.approx(0.0, abs=1e-15)
    # logits shifted by a constant per sample are the same distribution
    assert neg_kl(out + np.array([[5.0], [-3.0]]), ref) == pytest.approx(neg_kl(out, ref), rel=1e-12)


def test_kl_of_probabilities_uses_them_as_they_are():
    ref = np.array([[0.25, 0.75], [0.5, 0.5]])  # a network that ends in Softmax
    out = np.array([[0.5, 0.5], [0.2, 0.8]])
    kl0 = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    kl1 = 0.5 * np.log(0.5 / 0.2) + 0.5 * np.log(0.5 / 0.8)
    assert neg_kl(out, ref) == pytest.approx(-(kl0 + kl1) / 2, rel=1e-12)


def test_mse_signal_and_errors():
    ref = np.array([[1.0, 2.0]])
    assert signal_value("mse", np.array([[2.0, 0.0]]), ref) == pytest.approx(-2.5)
    with pytest.raises(OptionError, match="choose metric, kl or mse"):
        signal_value("l1", ref, ref)
    with pytest.raises(OptionError, match="--rank-signal 'l1' is unknown"):
        CompileOptions(rank_signal="l1").check()
    with pytest.raises(OptionError, match="--ranking-subset .* at least 1, got 0"):
        CompileOptions(ranking_subset=0).check()
    with pytest.raises(OptionError, match="ranking_subset"):
        SearchOptions(ranking_subset=-3).check()


# ------------------------------------------------------------------ influences in a signal: brute force
@pytest.mark.parametrize("signal", ["kl", "mse"])
def test_chained_influence_in_a_signal_equals_full_runs_of_the_mixed_networks(signal):
    g, ctx, plan, sim, x = branchy_ctx()
    T = BitConfig.uniform(plan.layers, 8, 8)
    S, _ = reduced_config(ctx.target, T, plan.layers)
    ref = sim.run(None, x)[0]
    res = compute_influence(sim, ctx.target, T, x, lambda o: signal_value(signal, o, ref), signal=signal,
                            value_score=lambda o: agreement(o, ref), batch_size=16)
    # P_k = signal of the network with layers < k from NN_S and the others from NN_T, run whole
    p = [signal_value(signal, sim.run(mixed_config(plan.layers, S, T, k), x, batch_size=16)[0], ref)
         for k in range(len(plan.layers) + 1)]
    assert res.values == pytest.approx(p, rel=1e-12, abs=0)
    for k, n in enumerate(plan.layers):
        assert res.influence[n] == pytest.approx(p[k] - p[k + 1], rel=1e-9, abs=1e-300)
    assert res.signal == signal and res.samples == len(x)
    assert res.metric_value == agreement(sim.run(T, x, batch_size=16)[0], ref)
    assert len(cut_positions(plan, stream_order(plan))) == len(p)


def test_the_kl_signal_is_never_flat_where_agreement_is():
    """One rung down on one layer seldom flips an argmax on a few samples; it always moves the KL."""
    g, ctx, plan, sim, x = branchy_ctx(n=12, target="npu8")
    T = BitConfig.uniform(plan.layers, *ctx.target.ladder[0])
    ref = sim.run(None, x)[0]
    flat = compute_influence(sim, ctx.target, T, x, lambda o: agreement(o, ref))
    kl = compute_influence(sim, ctx.target, T, x, lambda o: neg_kl(o, ref), signal="kl")
    assert sum(v == 0.0 for v in flat.influence.values()) >= 1  # a tie decided by the tie-break alone
    assert all(v != 0.0 for v in kl.influence.values())
    assert len(set(kl.influence.values())) == len(plan.layers)


# ------------------------------------------------------------------ the ranking subset
def test_ranking_subset_measures_influences_on_evenly_spaced_samples_only():
    g, ctx, plan, sim, x = branchy_ctx(n=40)
    sctx = search_context(g, ctx, target_score=0.0, options=SearchOptions(signal="kl", ranking_subset=9))
    xs, score, value_score = sctx.ranking_data()
    idx = [0, 5, 10, 15, 20, 24, 29, 34, 39]  # round(k * 39 / 8)
    np.testing.assert_array_equal(xs, x[idx])
    assert value_score is None  # a subset's outputs say nothing of the whole split's value
    T = BitConfig.uniform(plan.layers, 8, 8)
    res = sctx.influence(T)
    ref = sctx.reference[idx]
    brute = compute_influence(sctx.sim, ctx.target, T, x[idx], lambda o: neg_kl(o, ref), signal="kl",
                              batch_size=sctx.batch_size)
    assert res.samples == 9 and res.influence == brute.influence and res.metric_value is None
    assert sctx.evaluations == 0  # the sweep did not stand in for an evaluation on the whole split
    # the full split's ranking data under the metric: the context's own score
    full = search_context(g, ctx, target_score=0.0, options=SearchOptions(ranking_subset=40))
    assert full.ranking_data()[0] is full.data.x and full.ranking_data()[1] == full.score


def test_the_pass_ranks_on_the_subset_and_judges_every_candidate_on_the_whole_split():
    g, ctx, pm = run_o2("layer-influence{variants=chained},"
                        "assign-bit-widths{strategy=influence-update,max_drop=0.05,report_variants=false}",
                        options={"rank_signal": "kl", "ranking_subset": 10})
    sec = ctx.report["passes"]["assign-bit-widths"]
    assert sec["signal"] == "kl" and ctx.report["passes"]["layer-influence"]["chained"]["samples"] == 10
    r = sec["ranking"]
    assert (r["signal"], r["samples"], r["of"], r["subset"]) == ("kl", 10, 30, 10)
    # the layer-influence pass's sweep is the search's first ranking: not measured twice
    first = ctx.report["passes"]["layer-influence"]["chained"]["influence"]
    assert sec["influence"]["chained"] == first
    # each sweep: the prefix and one suffix per cut (3 layers: 4 cuts), on 10 samples instead of 30
    assert r["sweeps"] == sec["influence_sweeps"] >= 2
    assert r["sample_runs"] == 5 * 10 * r["sweeps"] and r["sample_runs_skipped"] == 5 * 20 * r["sweeps"]
    from mpqc.compiler.quant import QuantPlanAnalysis
    plan = ctx.analyses.get(QuantPlanAnalysis, g)
    for t in sec["trace"]:  # every step's value is the whole eval split's agreement
        cfg = BitConfig({n: tuple(t["bits"][n.name]) for n in plan.layers}, 8)
        assert sim_value(g, ctx, cfg, ctx.eval) == t["value"]


def test_pass_option_overrides_the_compile_option_and_the_analysis_keeps_them_apart():
    g, ctx, pm = run_o2("assign-bit-widths{strategy=min-influence,max_drop=0.05,report_variants=false,"
                        "signal=mse}", options={"rank_signal": "kl"})
    assert ctx.report["passes"]["assign-bit-widths"]["signal"] == "mse"
    a = ctx.analyses.get(LayerInfluence, g, variant="chained", signal="kl")
    b = ctx.analyses.get(LayerInfluence, g, variant="chained", signal="metric")
    assert a.signal == "kl" and b.signal == "metric" and a.influence != b.influence
    with pytest.raises(OptionError, match="option signal='x' must be one of metric, kl, mse"):
        run_o2("assign-bit-widths{signal=x}")
    with pytest.raises(OptionError, match="assign-bit-widths: ranking_subset is a number of evaluation samples"):
        run_o2("assign-bit-widths{ranking_subset=0}")


# ------------------------------------------------------------------ early stop of a rejected candidate
def _search(early_stop: bool, batch_size: int = 4, jobs: int = 1):
    from mpqc.compiler.data import Dataset
    from mpqc.compiler.passes import PassContext, PassManager
    from mpqc.compiler.pipelines import parse_pipeline
    from mpqc.compiler.targets import get_target
    from tests.passes.test_assign_bit_widths import classifier
    g = classifier()
    x = np.random.default_rng(9).standard_normal((60, 2, 6, 6)).astype(np.float32)
    ctx = PassContext(target=get_target("npu4"), batch_size=batch_size)
    ctx.jobs = jobs
    ctx.calib, ctx.eval = Dataset(x[:30], None, "calib"), Dataset(x[30:], None, "eval")
    spec = ("choose-formats{start=ladder},assign-bit-widths{strategy=min-influence,repeat=true,max_drop=0.02,"
            f"report_variants=false,early_stop={'true' if early_stop else 'false'}}}")
    PassManager(parse_pipeline(spec)).run(g, ctx)
    return g, ctx, ctx.report["passes"]["assign-bit-widths"]


def test_a_candidate_that_can_only_miss_the_goal_stops_early_with_the_same_decision():
    g, ctx, sec = _search(True)
    _, _, full = _search(False)
    assert sec["final_bits"] == full["final_bits"] and len(sec["trace"]) == len(full["trace"])
    last, last_full = sec["trace"][-1], full["trace"][-1]
    assert not last["accepted"] and last["bits"] == last_full["bits"] and "early_stop" not in last_full
    es = last["early_stop"]
    n = es["of"]
    assert n == 30 and es["samples"] < n and es["samples"] % 4 == 0
    # brute force: the whole run's hits over the samples run, plus every sample left counted as a hit
    from mpqc.compiler.quant import BitConfig, QuantPlanAnalysis
    plan = ctx.analyses.get(QuantPlanAnalysis, g)
    cfg = BitConfig({m: tuple(last["bits"][m.name]) for m in plan.layers}, 8)
    from tests.passes.test_assign_bit_widths import sim_value
    from mpqc.compiler.quant import FormatTableAnalysis
    from mpqc.compiler.quantsim import QuantSim
    sim = QuantSim(plan, ctx.analyses.get(FormatTableAnalysis, g, search=2))
    out, ref = sim.run(cfg, ctx.eval.x, batch_size=4)[0], sim.run(None, ctx.eval.x, batch_size=4)[0]
    hit = np.argmax(out, 1) == np.argmax(ref, 1)
    m = es["samples"]
    assert es["value_at_most"] == last["value"] == pytest.approx((hit[:m].sum() + n - m) / n, abs=1e-12)
    assert last_full["value"] == sim_value(g, ctx, cfg, ctx.eval) <= last["value"] < sec["goal"]
    # the first batch at which the bound fell below the goal, not later
    assert (hit[:m - 4].sum() + n - (m - 4)) / n >= sec["goal"] - 1e-12
    assert sec["early_stop"] == {"enabled": True, "evaluations": 1, "samples_run": m, "samples_skipped": n - m}
    assert full["early_stop"]["evaluations"] == 0


def test_early_stop_is_the_same_for_any_number_of_jobs():
    _, _, one = _search(True, jobs=1)
    _, _, two = _search(True, jobs=2)
    assert one["trace"] == two["trace"] and one["early_stop"] == two["early_stop"]
