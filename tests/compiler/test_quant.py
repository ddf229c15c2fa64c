"""Quantization plan (host / input / layer / arith / layout points), format table, bit configs."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.data import Dataset
from mpqc.core.errors import CompilerError
from mpqc.compiler.passes import PassContext
from mpqc.core.qformat import QFormat, choose_frac_mse
from mpqc.compiler.quant import (BitConfig, FormatTableAnalysis, QuantPlan, QuantPlanAnalysis, apply_config,
                                 check_bias_fits, config_from_ir, float_act_format, float_weight_format,
                                 weight_axis, weight_bytes)
from mpqc.compiler.ranges import ActivationRanges
from mpqc.compiler.targets import get_target
from tests.graphs import GraphBuilder, randn


def residual():
    """Div (host) -> Conv -> Relu (fused) -> MaxPool (layout) -> Conv -> Add(with pooled) -> Relu -> Gemm."""
    b = GraphBuilder("res")
    x = b.input("x", ["N", 2, 8, 8])
    h = b.op("Div", [x, b.const("s", np.float32(4.0))], name="norm")
    c1 = b.op("Conv", [h, b.const("w1", randn(4, 2, 3, 3, seed=1)), b.const("b1", randn(4, seed=2))],
              name="c1", pads=[1, 1, 1, 1])
    r1 = b.op("Relu", [c1], name="r1")
    p = b.op("MaxPool", [r1], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    c2 = b.op("Conv", [p, b.const("w2", randn(4, 4, 3, 3, seed=3, scale=0.3))], name="c2", pads=[1, 1, 1, 1])
    a = b.op("Add", [c2, p], name="add")
    r2 = b.op("Relu", [a], name="r2")
    f = b.op("Flatten", [r2], name="flat")
    y = b.op("Gemm", [f, b.const("fw", randn(64, 3, seed=4, scale=0.1))], name="fc")
    return b.output(y)


def test_plan_points_by_kind():
    g = residual()
    plan = QuantPlan.build(g)
    v = g.value_by_name
    assert [n.name for n in plan.host] == ["norm"]
    assert [n.name for n in plan.layers] == ["c1", "c2", "fc"]
    kinds = {x.name: p.kind for x, p in plan.points.items()}
    assert kinds == {"norm_out": "input", "r1_out": "layer", "pool_out": "layout", "c2_out": "layer",
                     "add_out": "arith", "r2_out": "layout", "flat_out": "layout", "fc_out": "layer"}
    assert plan.layer_out[g.node_by_name("c1")] is v("r1_out")  # Relu fused
    assert plan.fused[g.node_by_name("c1")].name == "r1" and plan.fused[g.node_by_name("c2")] is None
    assert plan.points[v("pool_out")].source is v("r1_out")
    assert plan.points[v("flat_out")].source is v("add_out")  # through the unfused Relu
    assert set(plan.points[v("add_out")].inputs) == {v("c2_out"), v("pool_out")}
    assert "x" not in kinds  # the raw input stays float: the host normalises it


def test_relu_with_two_readers_is_not_fused_and_other_ops_are_arith_points():
    b = GraphBuilder("two")
    x = b.input("x", ["N", 3])
    y = b.op("MatMul", [x, b.const("w", randn(3, 3))], name="mm")
    r = b.op("Relu", [y], name="relu")
    g = b.output(r, y)  # the pre-activation is also a graph output
    plan = QuantPlan.build(g)
    assert plan.fused[g.node_by_name("mm")] is None
    assert plan.points[g.value_by_name("relu_out")].kind == "layout"
    b = GraphBuilder("bad")
    x = b.input("x", ["N", 3])
    y = b.op("MatMul", [x, b.const("w", randn(3, 3))], name="mm")
    s = b.op("Shape", [y], name="shape")
    c = b.op("Cast", [s], name="cast", to=1)
    g = b.output(b.op("Add", [y, c], name="add"))
    plan = QuantPlan.build(g)  # Cast of a shape is an arith point here: a quantized value
    assert plan.points[g.value_by_name("add_out")].kind == "arith"


def test_weight_axis():
    b = GraphBuilder("ax")
    x = b.input("x", ["N", 3])
    n1 = b.node("Gemm", [x, b.const("w1", randn(4, 3))], transB=1)
    n2 = b.node("Gemm", [n1.outputs[0], b.const("w2", randn(4, 5))])
    n3 = b.node("MatMul", [n2.outputs[0], b.const("w3", randn(5, 2))])
    b.output(n3.outputs[0])
    assert [weight_axis(n) for n in (n1, n2, n3)] == [0, 1, 1]


def table_for(g, target="npu8", n=16):
    ctx = PassContext(target=get_target(target), calib=Dataset(randn(n, 2, 8, 8, seed=5) * 4, None, "c"))
    return ctx.analyses.get(FormatTableAnalysis, g), ctx


def test_format_table_formats_by_hand():
    g = residual()
    table, ctx = table_for(g)
    stats = ctx.analyses.get(ActivationRanges, g)
    plan = table.plan
    v = g.value_by_name
    cfg = BitConfig.uniform(plan.layers, 8, 8)
    cfg = cfg.with_layer(g.node_by_name("c2"), (4, 16))
    fmts = table.formats(cfg)
    r1 = fmts[v("r1_out")]
    assert not r1.signed and r1.bits == 8
    assert r1.frac == choose_frac_mse(stats[v("r1_out")].sample, 8, False, absmax=stats[v("r1_out")].absmax)
    assert fmts[v("pool_out")] is r1  # layout shares its source's format
    assert fmts[v("c2_out")].bits == 16 and fmts[v("c2_out")].signed
    assert fmts[v("add_out")].bits == 16  # arith: the widest of its inputs
    assert fmts[v("norm_out")].bits == 8  # input points at config.input_bits
    wf = table.weight_format(g.node_by_name("c1"), 8)
    assert wf.axis == 0 and len(wf.frac) == 4
    bf = table.bias_format(g.node_by_name("c1"), fmts[v("norm_out")], wf)
    assert bf.bits == 32 and list(bf.frac) == [int(fmts[v("norm_out")].frac) + f for f in wf.frac]
    assert weight_bytes(plan, cfg) == 72 + 16 + 144 * 4 / 8 + 192


def test_apply_config_and_config_from_ir():
    g = residual()
    table, _ = table_for(g)
    plan = table.plan
    cfg = BitConfig.uniform(plan.layers, 8, 8).with_layer(plan.layers[1], (4, 8))
    apply_config(g, plan, table, cfg)
    c2 = g.node_by_name("c2")
    assert (c2.qconfig.weight_bits, c2.qconfig.act_bits) == (4, 8) and c2.qconfig.bias_format is None
    assert g.value_by_name("r1_out").qformat is not None and g.value_by_name("c1_out").qformat is None
    back = config_from_ir(plan)
    assert back.key(plan.layers) == cfg.key(plan.layers)
    apply_config(g, plan, table, BitConfig.uniform(plan.layers, 8, 8), note="test")
    assert c2.qconfig.history == [{"by": "test", "from": [4, 8], "to": [8, 8]}]


def test_bias_cap_keeps_the_bias_inside_the_accumulator():
    b = GraphBuilder("cap")
    x = b.input("x", ["N", 2])
    w = np.array([[1e-6, 1e-6], [0.5, -0.5]], np.float32)  # [K=2, N=2]: channel 0 tiny weights
    n = b.node("Gemm", [x, b.const("w", w), b.const("b", np.array([3000.0, 0.1], np.float32))], name="fc")
    g = b.output(n.outputs[0])
    ctx = PassContext(target=get_target("npu8"), calib=Dataset(randn(8, 2, seed=1), None, "c"))
    table = ctx.analyses.get(FormatTableAnalysis, g)
    wf = table.weight_format(n, 8)
    in_frac = max(int(table.act_format(g.inputs[0], a).frac) for a in (8, 16))
    cap0 = 30 - in_frac - int(np.ceil(np.log2(3000.0)))
    assert wf.frac[0] == cap0 < choose_frac_mse(w[:, 0], 8, True)
    bf = table.bias_format(n, table.act_format(g.inputs[0], 8), wf)
    check_bias_fits(n, n.bias.const, bf)  # fits
    with pytest.raises(CompilerError, match="fc.*does not fit"):
        check_bias_fits(n, n.bias.const, QFormat(32, (40, 10), True, 0))


def test_float_scale_formats_match_onnxruntime():
    from onnxruntime.quantization.quant_utils import compute_scale_zp
    for lo, hi in ((-1.3, 4.2), (0.5, 3.0), (-2.0, -0.1), (0.0, 0.0)):
        f = float_act_format(lo, hi, 8)
        zp, sc = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), np.array(0, np.uint8),
                                  np.array(255, np.uint8))
        assert (f.fscale, f.zero_point, f.signed) == (float(sc), int(zp), False)
    w = randn(3, 4, seed=7)
    f = float_weight_format(w, 8, 0)
    for c in range(3):
        zp, sc = compute_scale_zp(np.array(w[c].min()), np.array(w[c].max()), np.array(-127, np.int8),
                                  np.array(127, np.int8), symmetric=True)
        assert f.fscale[c] == float(sc) and int(zp) == 0
    assert float_weight_format(np.zeros((2, 2), np.float32), 8, None).fscale == 1.0


def test_float_scale_bias_adjustment_as_onnxruntime():
    b = GraphBuilder("fb")
    x = b.input("x", ["N", 2])
    w = np.array([[1e-7, 0.5], [-1e-7, -0.5]], np.float32)
    n = b.node("Gemm", [x, b.const("w", w), b.const("b", np.array([100.0, 0.1], np.float32))], name="fc")
    g = b.output(n.outputs[0])
    ctx = PassContext(target=get_target("ort-int8"), calib=Dataset(randn(8, 2, seed=1), None, "c"))
    table = ctx.analyses.get(FormatTableAnalysis, g)
    wf = table.weight_format(n, 8)
    s_in = float(table.act_format(g.inputs[0], 8).fscale)
    qrange = float(np.iinfo(np.int32).max) - float(np.iinfo(np.int32).min + 1)
    need = 1.0001 * 2 * 100.0 / qrange
    plain = float(np.float32(1e-7 / 127))
    assert wf.fscale[0] == float(np.float32(plain * need / (s_in * plain)))  # widened
    assert wf.fscale[1] == float(np.float32(0.5 / 127))  # untouched
    bf = table.bias_format(n, table.act_format(g.inputs[0], 8), wf)
    check_bias_fits(n, n.bias.const, bf)


def test_analyses_are_cached_per_graph():
    g = residual()
    ctx = PassContext(target=get_target("npu8"), calib=Dataset(randn(4, 2, 8, 8), None, "c"))
    p = ctx.analyses.get(QuantPlanAnalysis, g)
    assert p is ctx.analyses.get(QuantPlanAnalysis, g)
    with pytest.raises(CompilerError, match="--target"):
        PassContext(calib=ctx.calib).analyses.get(FormatTableAnalysis, g)
