"""optimize-rounding: on a tiny network, the exported QDQ model (onnxruntime, the oracle) is closer to the
float network than round-to-nearest is; the weights stay integers of the layer's format; a cached
result is written back identically; the pass runs once; bad options and a float graph are refused."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.cache import ResultCache
from mpqc.compiler.data import Dataset
from mpqc.compiler.export import to_onnx
from mpqc.compiler.passes import PassContext, PassManager
from mpqc.compiler.pipelines import parse_pipeline
from mpqc.compiler.targets import get_target
from mpqc.core.errors import OptionError
from mpqc.core.qformat import fake_quant
from mpqc.core.textir import print_graph
from mpqc.runtime.executor import Executor

from tests.graphs import GraphBuilder, randn


def graph():
    """Conv 3x3 (bias) -> Relu -> depthwise 3x3 stride 2 (no bias) -> Relu -> GAP -> Flatten -> Gemm."""
    b = GraphBuilder("r")
    x = b.input("x", ["N", 3, 8, 8])
    h = b.op("Relu", [b.op("Conv", [x, b.const("w1", randn(8, 3, 3, 3, seed=1, scale=0.5)),
                                    b.const("b1", randn(8, seed=2, scale=0.1))], name="c1", pads=[1, 1, 1, 1])])
    h = b.op("Relu", [b.op("Conv", [h, b.const("w2", randn(8, 1, 3, 3, seed=3, scale=0.5))], name="dw", group=8,
                           pads=[1, 1, 1, 1], strides=[2, 2])])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    return b.output(b.op("Gemm", [h, b.const("w3", randn(5, 8, seed=4)), b.const("b3", randn(5, seed=5))],
                         name="fc", transB=1))


def compile_(passes, store=None):
    g = graph()
    ctx = PassContext(target=get_target("npu4"), batch_size=8)
    ctx.calib = Dataset(randn(24, 3, 8, 8, seed=9) + 0.3, None, "calib")
    ctx.store = store
    PassManager(parse_pipeline(passes)).run(g, ctx)
    return g, ctx


def ort_outputs(g, x):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(to_onnx(g).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


FORMATS = "choose-formats{weight_bits=4,act_bits=8}"


def test_exported_network_is_closer_to_float_than_nearest_rounding():
    x = randn(40, 3, 8, 8, seed=11) + 0.3  # held-out samples, not the calibration ones
    ref = Executor(graph()).run({"x": x})
    ref = ref[next(iter(ref))]
    err = {}
    for name, spec in (("nearest", ""), ("optimised", ",optimize-rounding")):
        g, ctx = compile_(FORMATS + spec + ",insert-qdq")
        err[name] = float(np.mean((ort_outputs(g, x) - ref) ** 2))
    assert err["optimised"] < 0.7 * err["nearest"], err


def test_structure_weights_on_the_grid_and_report():
    g, ctx = compile_(FORMATS + ",optimize-rounding")
    assert g.metadata["mpqc.optimized_rounding"] == "1"
    layers = {n.name: n for n in g.layers()}
    assert [layers[n].weight.name for n in ("c1", "dw", "fc")] == ["w1_rounded", "w2_rounded", "w3_rounded"]
    assert layers["dw"].bias is not None and layers["dw"].bias.name == "dw_bias_rounded"  # gained a refitted bias
    for n in layers.values():
        q = n.qconfig
        np.testing.assert_array_equal(fake_quant(n.weight.const, q.weight_format), n.weight.const)
        assert q.bias_format is not None
        lo, hi = -(1 << (q.bias_format.bits - 1)), (1 << (q.bias_format.bits - 1)) - 1
        b = np.ldexp(n.bias.const.astype(np.float64), q.bias_format.frac_array())
        assert b.min() >= lo and b.max() <= hi
    sec = ctx.report["passes"]["optimize-rounding"]
    assert sec["samples"] == 24 and sec["options"]["inputs"] == "quantized"
    for r in sec["layers"]:
        assert r["applied"] and r["bias_refit"] and r["error_optimised"] <= r["error_nearest"]
    g.verify()


def test_runs_once_and_a_cached_result_is_written_back_identically(tmp_path):
    g1, _ = compile_(FORMATS + ",optimize-rounding", store=ResultCache(tmp_path))
    g2, ctx2 = compile_(FORMATS + ",optimize-rounding", store=ResultCache(tmp_path))
    assert ctx2.store.summary()["kinds"]["optimize-rounding"]["hits"] == 1
    assert print_graph(g2, elide_above=0) == print_graph(g1, elide_above=0)
    for a, b in zip(g1.layers(), g2.layers()):
        np.testing.assert_array_equal(a.weight.const, b.weight.const)
        np.testing.assert_array_equal(a.bias.const, b.bias.const)
    before = print_graph(g1, elide_above=0)
    ctx = PassContext(target=get_target("npu4"), batch_size=8)
    ctx.calib = Dataset(randn(24, 3, 8, 8, seed=9) + 0.3, None, "calib")
    assert PassManager(parse_pipeline("optimize-rounding")).run(g1, ctx) is False
    assert print_graph(g1, elide_above=0) == before


def test_float_inputs_mode_and_bad_options():
    g, ctx = compile_(FORMATS + ",optimize-rounding{inputs=float,finer=0,bias=false}")
    rows = ctx.report["passes"]["optimize-rounding"]["layers"]
    assert all(r["applied"] and not r["bias_refit"] and r["finer_channels"] == 0 for r in rows)
    assert g.layers()[1].bias is None
    with pytest.raises(OptionError, match="damp"):
        compile_(FORMATS + ",optimize-rounding{damp=0}")
    with pytest.raises(OptionError, match="samples"):
        compile_(FORMATS + ",optimize-rounding{samples=0}")


def _ctx_with_goal(**goal):
    from mpqc.compiler.options import CompileOptions
    ctx = PassContext(target=get_target("npu4"), batch_size=8, options=CompileOptions(**goal))
    ctx.calib = Dataset(randn(24, 3, 8, 8, seed=9) + 0.3, None, "calib")
    ctx.eval = Dataset(randn(40, 3, 8, 8, seed=12) + 0.3, None, "eval")  # no labels: agreement with float
    return ctx


@pytest.mark.parametrize("goal, applied", [({"max_drop": 0.5}, False), ({"target_score": 1.0}, True)])
def test_start_network_is_optimised_only_when_it_misses_the_goal(goal, applied):
    g = graph()
    ctx = _ctx_with_goal(**goal)
    w0 = [n.weight.const.copy() for n in g.layers()]
    PassManager(parse_pipeline("choose-formats{weight_bits=2,act_bits=4},"
                               "optimize-rounding{when=start-misses-goal}")).run(g, ctx)
    sec = ctx.report["passes"]["optimize-rounding"]["start_network"]
    assert 0 <= sec["value_before"] < 1.0  # 2-bit weights: some samples change class
    assert ("skipped" in sec) is not applied
    changed = any(not np.array_equal(a, n.weight.const) for a, n in zip(w0, g.layers()))
    assert changed is applied and bool(g.metadata.get("mpqc.optimized_rounding")) is applied


def test_guard_keeps_a_network_that_meets_the_goal_and_undoes_one_that_does_not():
    for goal, kept in (({"max_drop": 0.5}, True), ({"target_score": 1.0}, False)):
        g = graph()
        ctx = _ctx_with_goal(**goal)
        PassManager(parse_pipeline("choose-formats{weight_bits=2,act_bits=4}")).run(g, ctx)
        before = print_graph(g, elide_above=0)
        PassManager(parse_pipeline("optimize-rounding{guard=true}")).run(g, ctx)
        sec = ctx.report["passes"]["optimize-rounding"]
        assert "value_before" in sec and "value_after" in sec
        if kept:
            assert "reverted" not in sec and g.metadata["mpqc.optimized_rounding"] == "1"
        else:  # below the goal after (as before): everything back as it was
            assert "below the goal" in sec["reverted"]
            assert print_graph(g, elide_above=0) == before


ADAROUND = ",optimize-rounding{solver=adaround,iters=500}"


def test_adaround_solver_beats_nearest_and_the_emulator_equals_the_qdq_model():
    """solver=adaround: the exported model (onnxruntime) closer to float than round to nearest on held-out
    samples, the weights integers of their formats, the emulator equal to onnxruntime bit for bit, and
    the same weights on a second run."""
    from mpqc.compiler.lowering import run_emulator
    x = randn(40, 3, 8, 8, seed=11) + 0.3
    ref = Executor(graph()).run({"x": x})
    ref = ref[next(iter(ref))]
    g0, _ = compile_(FORMATS + ",insert-qdq")
    g, ctx = compile_(FORMATS + ADAROUND + ",insert-qdq")
    out = ort_outputs(g, x)
    assert np.mean((out - ref) ** 2) < 0.7 * np.mean((ort_outputs(g0, x) - ref) ** 2)
    np.testing.assert_array_equal(run_emulator(g, x), out)
    for n in g.layers():
        np.testing.assert_array_equal(fake_quant(n.weight.const, n.qconfig.weight_format), n.weight.const)
    sec = ctx.report["passes"]["optimize-rounding"]
    assert sec["options"]["solver"] == "adaround"
    assert all(r["applied"] and r["error_optimised"] <= r["error_nearest"] for r in sec["layers"])
    again, _ = compile_(FORMATS + ADAROUND + ",insert-qdq")
    for a, b in zip(g.layers(), again.layers()):
        np.testing.assert_array_equal(a.weight.const, b.weight.const)
        np.testing.assert_array_equal(a.bias.const, b.bias.const)


def test_adaround_needs_quantized_inputs_and_valid_options():
    with pytest.raises(OptionError, match="inputs=float"):
        compile_(FORMATS + ",optimize-rounding{solver=adaround,inputs=float}")
    with pytest.raises(OptionError, match="iters"):
        compile_(FORMATS + ",optimize-rounding{solver=adaround,iters=0}")


def test_levels_choose_the_solver_with_the_rounding_option():
    from mpqc.compiler.driver import compile_model
    from mpqc.compiler.pipelines import pipeline_spec
    t = get_target("npu8")
    rounds = {r: [p for lv in (1, 2, 3) for p in pipeline_spec(lv, t, rounding=r) if "rounding" in p]
              for r in (None, "obq", "adaround", "nearest")}
    o2 = ["optimize-rounding{when=start-misses-goal}", "optimize-rounding{guard=true}"]
    assert rounds[None] == rounds["obq"] == ["optimize-rounding"] + o2 * 2  # -O1, -O2, -O3
    assert rounds["adaround"][0] == "optimize-rounding{solver=adaround}"
    assert rounds["adaround"][1:3] == ["optimize-rounding{solver=adaround,when=start-misses-goal}",
                                       "optimize-rounding{solver=adaround,guard=true}"]
    assert rounds["nearest"] == []
    with pytest.raises(OptionError, match="--rounding must be one of obq, adaround, nearest"):
        pipeline_spec(1, t, rounding="gptq")
    with pytest.raises(OptionError, match="--rounding needs a quantizing level"):
        pipeline_spec(0, None, rounding="adaround")
    x = randn(24, 3, 8, 8, seed=9) + 0.3
    res = compile_model(graph(), level=1, target="npu4", calib=(x, None),
                        options={"rounding": "adaround"})
    assert res.report["passes"]["optimize-rounding"]["options"]["solver"] == "adaround"
    with pytest.raises(OptionError, match="--rounding chooses a level's pipeline"):
        compile_model(graph(), level=1, target="npu4", calib=(x, None), options={"rounding": "nearest"},
                      passes="choose-formats,insert-qdq")
    with pytest.raises(OptionError, match="--rounding must be one of"):
        compile_model(graph(), level=1, target="npu4", calib=(x, None), options={"rounding": "up"})
