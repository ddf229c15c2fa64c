"""layer-influence: reports each variant's influences of the IR's network, caches them, changes nothing."""
from __future__ import annotations

import pytest

from mpqc.core.errors import OptionError
from mpqc.compiler.bitsearch import LayerInfluence

from tests.passes.test_assign_bit_widths import run_o2


def test_reports_the_requested_variants_and_leaves_the_graph_alone():
    g, ctx, pm = run_o2("layer-influence{variants=chained:isolated}")
    assert pm.timings[-1].modified is False  # the negative case of every run: it never modifies
    sec = ctx.report["passes"]["layer-influence"]
    assert set(sec) == {"chained", "isolated"}
    r = ctx.analyses.get(LayerInfluence, g, variant="chained", split=None, metric=None, layer_range=None,
                         min_bits=None)
    assert sec["chained"]["influence"] == {n.name: r.influence[n] for n in r.candidates}
    assert sec["chained"]["values"][0] == r.base_value and len(sec["chained"]["values"]) == 4
    assert sec["chained"]["from_bits"]["c1"] == [8, 8] and sec["chained"]["to_bits"]["c1"] == [4, 8]
    assert all((n.qconfig.weight_bits, n.qconfig.act_bits) == (8, 8) for n in g.layers())


def test_assign_reuses_the_cached_influences():
    g, ctx, pm = run_o2("layer-influence,assign-bit-widths{strategy=min-influence,max_drop=0.05}")
    sec = ctx.report["passes"]["assign-bit-widths"]
    # min-influence measures influences once: the three variants of the report came from the cache, the
    # search added no sweep of its own
    assert sec["influence_sweeps"] == 3
    assert sec["influence"]["chained"] == ctx.report["passes"]["layer-influence"]["chained"]["influence"]


def test_skipped_for_a_strategy_without_influences_and_bad_options():
    g, ctx, pm = run_o2("layer-influence", options={"strategy": "weight-diff-topk"})
    assert "does not rank layers by influence" in ctx.report["passes"]["layer-influence"]["skipped"]
    with pytest.raises(OptionError, match="variants=sideways"):
        run_o2("layer-influence{variants=sideways}")


def test_a_goal_the_start_misses_fails_before_any_sweep():
    from mpqc.core.errors import TargetError
    with pytest.raises(TargetError, match="not met even before"):
        run_o2("layer-influence", options={"target_score": 1.5, "strict": True})
    g, ctx, pm = run_o2("layer-influence", options={"target_score": 1.5})
    assert "already misses the accuracy goal" in ctx.report["passes"]["layer-influence"]["skipped"]
