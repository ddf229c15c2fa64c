"""prune-channels: channels removed to a MACs budget, the next layer refit; checked against
onnxruntime, brute force and exact cases."""
from __future__ import annotations

import numpy as np
import pytest

import mpqc
from mpqc.compiler.channel_prune import total_macs
from mpqc.compiler.data import Dataset
from mpqc.compiler.export import to_onnx
from mpqc.compiler.options import CompileOptions
from mpqc.compiler.passes import PassContext, PassManager
from mpqc.compiler.pipelines import make_pass, pipeline_spec
from mpqc.compiler.targets import get_target
from mpqc.core.errors import OptionError, PassError, TargetError
from mpqc.runtime.executor import Executor

from tests.conftest import bench_path
from tests.graphs import GraphBuilder, conv, ops, randn, rel_err, run_float, run_ort, set_shapes


def two_convs(dead=(1, 4)):
    """conv1 (6 channels, those in ``dead`` always 0 after the ReLU) -> relu -> conv2 (output)."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    w1 = randn(6, 3, 3, 3, seed=1, scale=0.4)
    b1 = randn(6, seed=2, scale=0.1)
    w1[list(dead)] = 0
    b1[list(dead)] = -1.0
    c1 = b.op("Conv", [x, b.const("w1", w1), b.const("b1", b1)], name="conv1", pads=[1, 1, 1, 1])
    r = b.op("Relu", [c1], name="relu")
    g = b.output(conv(b, r, 6, 4, "conv2", seed=3))
    set_shapes(g)
    return g


def calib(n=24, seed=5):
    return Dataset(np.abs(randn(n, 3, 8, 8, seed=seed)), None, "test:calib")


def run(g, options: dict, ctx: PassContext):
    PassManager([make_pass("prune-channels", {k: str(v) for k, v in options.items()})]).run(g, ctx)
    g.verify()
    return ctx.section("prune-channels")


@pytest.mark.parametrize("method", ["reap", "l1", "thinet"])
def test_dead_channels_go_first_and_the_output_is_unchanged(method):
    g = two_convs()
    before = to_onnx(g)
    macs0 = total_macs(g)
    # keeping 4 of conv1's 6 channels keeps 2/3 of the MACs (conv2 loses 2 of 6 input channels)
    sec = run(g, {"flops": 0.67, "method": method, "ratios": "uniform"}, PassContext(calib=calib()))
    c1, c2 = g.node_by_name("conv1"), g.node_by_name("conv2")
    assert ops(g) == ["Conv", "Relu", "Conv"]
    # every criterion drops the dead channels first (L1: their filters have norm 0)
    assert c1.prune.kept == (0, 2, 3, 5) and c1.prune.original_channels == 6 and c1.prune.method == method
    assert c1.weight.shape == (4, 3, 3, 3) and c2.weight.shape == (4, 4, 3, 3)
    assert sec["macs_before"] == macs0 and total_macs(g) == sec["macs_after"] == macs0 * 2 // 3
    assert sec["kept"] == {"conv1": 4}
    xs = np.abs(randn(7, 3, 8, 8, seed=9))
    want = run_ort(before, {"x": xs})[0]
    assert rel_err(run_ort(g, {"x": xs})[0], want) < 1e-4
    assert rel_err(run_float(g, {"x": xs})[0], want) < 1e-4


def test_refit_is_the_least_squares_solution():
    """REAP's refit of conv2 equals a brute-force least-squares fit on the same patches."""
    g = two_convs(dead=())
    ref = g.copy()
    data = calib(n=40)
    run(g, {"flops": 0.7, "ratios": "uniform", "samples": 100000}, PassContext(calib=data))
    kept = list(g.node_by_name("conv1").prune.kept)
    assert len(kept) == 4
    # brute force: im2col of every output position of conv2, inputs = kept channels of the original relu
    rv, yv = ref.node_by_name("relu").outputs[0], ref.outputs[0]
    res = Executor(ref).run({"x": data.x}, keep=[rv])
    h = np.pad(res[rv][:, kept], ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([h[:, :, i:i + 8, j:j + 8] for i in range(3) for j in range(3)], axis=2)  # N,C,9,8,8
    X = cols.transpose(0, 3, 4, 1, 2).reshape(-1, 4 * 9).astype(np.float64)
    X = np.concatenate([X, np.ones((len(X), 1))], axis=1)
    Y = res[yv].transpose(0, 2, 3, 1).reshape(-1, 4).astype(np.float64)
    sol = np.linalg.lstsq(X, Y, rcond=None)[0]
    c2 = g.node_by_name("conv2")
    np.testing.assert_allclose(c2.weight.const.reshape(4, -1), sol[:-1].T, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(c2.bias.const, sol[-1], rtol=1e-3, atol=1e-4)


def test_budget_and_options_are_checked():
    with pytest.raises(PassError, match=r"\[prune-channels\] needs calibration data"):
        run(two_convs(), {"flops": 0.5}, PassContext())
    with pytest.raises(OptionError, match="needs a MACs budget: give --flops"):
        run(two_convs(), {}, PassContext(calib=calib()))
    with pytest.raises(OptionError, match="method 'magic' is unknown"):
        run(two_convs(), {"flops": 0.5, "method": "magic"}, PassContext(calib=calib()))
    with pytest.raises(OptionError, match="must be in \\(0, 1\\]"):
        CompileOptions(flops=1.5).check()
    # one conv1 channel is the least the grid leaves: 1/6 of the MACs cannot go lower
    with pytest.raises(TargetError, match="--flops 0.05 cannot be met"):
        run(two_convs(), {"flops": 0.05}, PassContext(calib=calib()))
    g = two_convs()
    assert run(g, {"flops": 1.0}, PassContext(calib=calib()))["skipped"] == "already within the MACs budget"


def test_the_flops_option_comes_from_the_compile_options():
    g = two_convs()
    sec = run(g, {}, PassContext(calib=calib(), options=CompileOptions(flops=0.67, prune="l1", ratios="uniform")))
    assert (sec["flops"], sec["method"], sec["ratios"]) == (0.67, "l1", "uniform")
    assert g.node_by_name("conv1").weight.shape[0] == 4


def test_a_pruned_network_that_misses_the_accuracy_goal_names_flops():
    g = two_convs(dead=())
    xs = np.abs(randn(30, 3, 8, 8, seed=11))
    ctx = PassContext(calib=Dataset(xs, None, "c"), eval=Dataset(xs, None, "e"), float_graph=g.copy(),
                      options=CompileOptions(max_drop=0.0, strict=True))
    with pytest.raises(TargetError, match=r"at --flops 0.3 the pruned float network already scores .*raise --flops"):
        run(g, {"flops": 0.3, "ratios": "uniform"}, ctx)


def test_without_strict_a_missed_goal_keeps_the_pruned_network_and_says_so():
    g = two_convs(dead=())
    xs = np.abs(randn(30, 3, 8, 8, seed=11))
    ctx = PassContext(calib=Dataset(xs, None, "c"), eval=Dataset(xs, None, "e"), float_graph=g.copy(),
                      options=CompileOptions(max_drop=0.0))
    sec = run(g, {"flops": 0.3, "ratios": "uniform"}, ctx)
    assert sec["goal_missed"]["value"] < sec["goal_missed"]["goal"] and "--flops 0.3" in sec["goal_missed"]["message"]
    assert total_macs(g) <= 0.3 * sec["macs_before"]


def test_o3_pipeline():
    spec = pipeline_spec(3, get_target("npu4"))
    i = spec.index("prune-channels")
    assert spec[i - 1] == "serialize-residual" and spec[i + 1:i + 4] == ["eliminate-dead-code", "infer-shapes",
                                                                          "choose-formats{start=ladder}"]
    assert spec[-2:] == ["bias-correction", "insert-qdq"] and "finetune" not in spec
    assert pipeline_spec(3, get_target("npu4"), finetune=True)[-2:] == ["finetune", "insert-qdq"]


@pytest.mark.slow
@pytest.mark.parametrize("ratios", ["pro", "uniform"])
def test_real_vgg_pruned_to_half_the_macs(ratios):
    path = bench_path("digits_vgg.onnx")
    d = np.load(bench_path("digits.npz"))
    g = mpqc.load(path)
    PassManager([make_pass("fold-batchnorm")]).run(g, PassContext())
    macs0 = total_macs(g)
    ctx = PassContext(calib=Dataset(d["x_calib"], d["y_calib"], "digits:calib"))
    sec = run(g, {"flops": 0.5, "ratios": ratios, "samples": 2000}, ctx)
    assert total_macs(g) <= 0.5 * macs0 and sec["macs_fraction_of_float"] <= 0.5
    x = d["x_test"]
    ort_out = run_ort(g, {g.inputs[0].name: x})[0]
    assert rel_err(run_float(g, {g.inputs[0].name: x})[0], ort_out) < 1e-4
    acc = float(np.mean(ort_out.argmax(1) == d["y_test"]))
    assert acc >= 0.97, acc  # float 0.9975; PRO & REAP at x0.5 before retraining: 0.9975 measured
