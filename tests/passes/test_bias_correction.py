"""bias-correction: b' = b - (W_q - W) E[x] per output channel, checked against brute-force convolutions of
the weight error on the calibration data; the search's simulation equals the corrected, exported network."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.data import Dataset
from mpqc.compiler.passes import PassContext, PassManager
from mpqc.compiler.pipelines import parse_pipeline
from mpqc.core.qformat import fake_quant
from mpqc.compiler.quant import BitConfig, FormatTableAnalysis, QuantPlanAnalysis
from mpqc.compiler.targets import get_target
from mpqc.runtime.executor import Executor
from mpqc.compiler.quantsim import QuantSim
from mpqc.compiler.bias_correction import BiasCorrection, LayerInputMeans

from tests.graphs import GraphBuilder, randn


def graph():
    """Conv (pads, stride 2, 2 groups, bias) -> Relu -> Conv 1x1 (no bias) -> GAP -> Flatten -> Gemm -> MatMul."""
    b = GraphBuilder("bc")
    x = b.input("x", ["N", 4, 7, 7])
    h = b.op("Relu", [b.op("Conv", [x, b.const("w1", randn(6, 2, 3, 3, seed=1, scale=0.4)),
                                    b.const("b1", randn(6, seed=2, scale=0.1))], name="c1",
                           pads=[1, 1, 1, 1], strides=[2, 2], group=2)])
    h = b.op("Conv", [h, b.const("w2", randn(5, 6, 1, 1, seed=3, scale=0.5))], name="c2")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    h = b.op("Gemm", [h, b.const("w3", randn(3, 5, seed=4)), b.const("b3", randn(3, seed=5))], name="fc",
             transB=1, alpha=0.5, beta=2.0)
    return b.output(b.op("MatMul", [h, b.const("w4", randn(3, 2, seed=6))], name="mm"))


def setup(weight_bits=4):
    g = graph()
    x = randn(24, 4, 7, 7, seed=8) + 0.7  # inputs with a clear mean: the weight error biases the outputs
    ctx = PassContext(target=get_target("npu4"), batch_size=10)
    ctx.calib = Dataset(x, None, "calib")
    PassManager(parse_pipeline(f"choose-formats{{weight_bits={weight_bits},act_bits=8}}")).run(g, ctx)
    return g, ctx, x


def brute_force_correction(g, node, x):
    """Mean over samples and positions of the layer run with weights W_q - W (and no bias) on its float input."""
    inp = Executor(g).run({g.inputs[0]: x}, outputs=[node.inputs[0]])[node.inputs[0]]
    dw = fake_quant(node.weight.const, node.qconfig.weight_format) - node.weight.const.astype(np.float64)
    from mpqc.runtime.ops import KERNELS
    y = KERNELS[node.op_type](node, inp.astype(np.float64), dw)
    return y.mean(axis=(0, 2, 3)) if y.ndim == 4 else y.mean(axis=0)


def test_corrected_biases_equal_brute_force_weight_error_means():
    g, ctx, x = setup()
    layers = {n.name: n for n in g.layers()}
    want = {n: brute_force_correction(g, layers[n], x) for n in ("c1", "c2", "fc")}
    b1, b3 = layers["c1"].bias.const.copy(), layers["fc"].bias.const.copy()
    res = PassManager(parse_pipeline("bias-correction")).run(g, ctx)
    assert res is True
    np.testing.assert_allclose(layers["c1"].bias.const, b1 - want["c1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layers["c2"].bias.const, -want["c2"], rtol=1e-5, atol=1e-6)  # gained a bias
    # Gemm: y = alpha * x W^T + beta * C: the kernel's output error (alpha included) divided by beta
    np.testing.assert_allclose(layers["fc"].bias.const, b3 - want["fc"] / 2.0, rtol=1e-5, atol=1e-6)
    assert layers["mm"].bias is None and len(layers["mm"].inputs) == 2
    sec = ctx.report["passes"]["bias-correction"]
    assert sec["corrected"] == 3
    assert [r["applied"] for r in sec["layers"]] == [True, True, True, False]
    assert "MatMul has no bias input" in sec["layers"][3]["reason"]
    assert g.metadata["mpqc.bias_correction"] == "calib-mean"
    assert layers["c2"].qconfig.bias_format is not None  # the new bias has its accumulator format
    g.verify()


def test_corrected_layers_have_no_mean_error_on_the_calibration_data():
    g, ctx, x = setup()
    c1 = g.layers()[0]
    ref = Executor(g).run({g.inputs[0]: x}, outputs=[c1.outputs[0]])[c1.outputs[0]]
    PassManager(parse_pipeline("bias-correction")).run(g, ctx)
    wq = fake_quant(c1.weight.const, c1.qconfig.weight_format)
    from mpqc.runtime.ops import KERNELS
    before = KERNELS["Conv"](c1, x, wq, c1.inputs[2].const + 0)  # corrected bias
    err = (before - ref).mean(axis=(0, 2, 3))
    assert np.max(np.abs(err)) < 1e-5
    # ... whereas the plain quantized weights leave a clear per-channel shift
    plain = BiasCorrection({c1: ctx.analyses.get(LayerInputMeans, g)[c1]})(c1, c1.qconfig.weight_format)
    assert np.max(np.abs(plain)) > 1e-2


def test_search_simulation_equals_the_corrected_network():
    g, ctx, x = setup(weight_bits=8)
    plan = ctx.analyses.get(QuantPlanAnalysis, g)
    table = ctx.analyses.get(FormatTableAnalysis, g, search=2)
    from mpqc.compiler.bias_correction import bias_correction_for
    sim = QuantSim(plan, table, bias_correction_for(g, ctx).corrected_bias)
    cfg = BitConfig({n: (n.qconfig.weight_bits, n.qconfig.act_bits) for n in plan.layers}, 8)
    simulated = sim.run(cfg, x)[0]
    PassManager(parse_pipeline("bias-correction,insert-qdq")).run(g, ctx)
    from mpqc.compiler.lowering import run_emulator
    exported = run_emulator(g, x)  # the fixed-point network, in integers
    np.testing.assert_array_equal(simulated, exported)


def test_negative_second_run_and_graph_without_correctable_layers():
    g, ctx, x = setup()
    pm = PassManager(parse_pipeline("bias-correction,bias-correction"))
    pm.run(g, ctx)
    assert [t.modified for t in pm.timings] == [True, False]
    assert "already corrected" in ctx.report["passes"]["bias-correction"]["skipped"]
    b = GraphBuilder("mm")
    v = b.input("x", ["N", 3])
    g2 = b.output(b.op("MatMul", [v, b.const("w", randn(3, 2, seed=1))], name="mm"))
    ctx2 = PassContext(target=get_target("npu4"))
    ctx2.calib = Dataset(randn(8, 3, seed=2), None, "calib")
    pm2 = PassManager(parse_pipeline("choose-formats,bias-correction"))
    pm2.run(g2, ctx2)
    assert pm2.timings[-1].modified is False and "mpqc.bias_correction" not in g2.metadata


def test_needs_widths_and_calibration_data():
    from mpqc.core.errors import CompilerError, DataError
    g = graph()
    ctx = PassContext(target=get_target("npu4"))
    with pytest.raises(CompilerError, match="no bit widths yet"):
        PassManager(parse_pipeline("bias-correction")).run(g, ctx)
    g, ctx, x = setup()
    ctx.calib = None
    ctx.analyses.clear()
    with pytest.raises(DataError, match="calibration data"):
        PassManager(parse_pipeline("bias-correction")).run(g, ctx)
