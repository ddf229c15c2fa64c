"""finetune: training with fake quantization (clipped STE) recovers the accuracy lost to low widths."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.data import Dataset
from mpqc.core.errors import DataError
from mpqc.compiler.passes import PassContext
from mpqc.compiler.pipelines import make_pass
from mpqc.compiler.quant import FormatTable, QuantPlan
from mpqc.compiler.ranges import ActivationRanges
from mpqc.compiler.targets import get_target
from mpqc.runtime.autograd import GradEngine
from mpqc.runtime.executor import run_batched
from mpqc.runtime.fakequant import ir_node_fn
from mpqc.runtime.train import TrainOptions, fit
from tests.graphs import GraphBuilder, ops


def blobs(n: int, seed: int):
    """Eight Gaussian blobs in 8 dimensions (a small MLP learns them to ~99%; 2-bit weights do not)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(100).standard_normal((8, 8)) * 1.2
    y = rng.integers(0, 8, n)
    x = (centers[y] + rng.standard_normal((n, 8)) * 0.6).astype(np.float32)
    return x, y


def mlp(seed: int = 0):
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    x = b.input("x", ["N", 8])
    h = b.op("Gemm", [x, b.const("w1", (rng.standard_normal((16, 8)) * 0.5).astype(np.float32)),
                      b.const("b1", np.zeros(16, np.float32))], transB=1, name="fc1")
    h = b.op("Relu", [h], name="relu")
    y = b.op("Gemm", [h, b.const("w2", (rng.standard_normal((8, 16)) * 0.3).astype(np.float32)),
                      b.const("b2", np.zeros(8, np.float32))], transB=1, name="fc2")
    return b.output(y)


@pytest.fixture(scope="module")
def trained():
    """The MLP trained in float on the blobs, plus train / eval data."""
    g = mlp()
    xt, yt = blobs(400, 1)
    eng = GradEngine(g)
    fit(eng, xt, yt, TrainOptions(epochs=20, lr=0.05, batch_size=32, seed=0))
    eng.write_back()
    xe, ye = blobs(300, 2)
    return g, Dataset(xt, yt, "train"), Dataset(xe, ye, "eval")


def acc_ir(g, data) -> float:
    """Top-1 of the fake-quantized network per the IR's annotations (the simulator, not the engine)."""
    out = run_batched(g, data.x, node_fn=ir_node_fn(g))[0]
    return float(np.mean(np.argmax(out, 1) == data.y))


def quantized_copy(trained, w_bits=2, a_bits=4):
    g0, train, ev = trained
    g = g0.copy()
    ctx = PassContext(target=get_target("npu4"), calib=Dataset(train.x[:100], train.y[:100], "calib"),
                      train=train, eval=ev)
    make_pass("choose-formats", {"weight_bits": str(w_bits), "act_bits": str(a_bits)}).run(g, ctx)
    return g, ctx


def test_finetune_recovers_accuracy_at_two_bit_weights(trained):
    g, ctx = quantized_copy(trained)
    ev = ctx.eval
    float_acc = float(np.mean(np.argmax(run_batched(trained[0], ev.x)[0], 1) == ev.y))
    before = acc_ir(g, ev)
    assert float_acc >= 0.97 and before < float_acc - 0.1  # 2-bit weights cost accuracy
    names_before = ops(g)
    fmt0 = {n.name: n.qconfig.weight_format for n in g.layers()}
    res = make_pass("finetune", {"epochs": "4", "lr": "0.01"}).run(g, ctx)
    assert res.modified is True
    g.verify()
    assert ops(g) == names_before  # structure unchanged
    sec = ctx.report["passes"]["finetune"]
    after = acc_ir(g, ev)
    # the report's numbers are the simulator's numbers
    assert sec["before"] == pytest.approx(before) and sec["after"] == pytest.approx(after)
    assert after >= before + 0.1 and sec["reverted"] is False
    assert sec["train"]["steps"] == 4 * 13 and len(sec["train"]["loss"]) == 4
    # formats re-chosen for the new weights evaluate worse here than the ones the training used:
    # those are kept, and the report has both numbers
    table = FormatTable(QuantPlan.build(g), ctx.analyses.get(ActivationRanges, g), ctx.target)
    rechosen = {n.name: table.weight_format(n, 2) for n in g.layers()}
    assert sec["formats"] == "trained" and sec["after_rechosen_formats"] < sec["after_trained_formats"]
    assert any(rechosen[k] != fmt0[k] for k in fmt0)
    for n in g.layers():
        assert n.qconfig.weight_format is fmt0[n.name]
        assert (n.qconfig.weight_bits, n.qconfig.act_bits) == (2, 4)


def test_same_options_give_identical_weights(trained):
    g1, c1 = quantized_copy(trained)
    g2, c2 = quantized_copy(trained)
    for g, c in ((g1, c1), (g2, c2)):
        make_pass("finetune", {"epochs": "1", "revert_if_worse": "false"}).run(g, c)
    for n1, n2 in zip(g1.layers(), g2.layers()):
        assert np.array_equal(n1.weight.const, n2.weight.const) and np.array_equal(n1.bias.const, n2.bias.const)
    assert not np.array_equal(g1.layers()[0].weight.const, trained[0].layers()[0].weight.const)


def test_float_finetune_equals_the_training_loop(trained):
    g0, train, ev = trained
    g = g0.copy()
    ctx = PassContext(train=train, eval=ev, seed=3)
    res = make_pass("finetune", {"epochs": "1", "lr": "0.01", "revert_if_worse": "false"}).run(g, ctx)
    assert res.modified is True and ctx.report["passes"]["finetune"]["quantized"] is False
    eng = GradEngine(g0)
    fit(eng, train.x, train.y, TrainOptions(epochs=1, lr=0.01, batch_size=32, momentum=0.9, schedule="cosine",
                                            seed=3))
    for v, n in zip(eng.params, [x for n in g.layers() for x in (n.weight, n.bias)]):
        assert np.array_equal(eng.params[v], n.const)


def test_pruned_weights_stay_zero(trained):
    g, ctx = quantized_copy(trained, 4, 8)
    fc1 = g.node_by_name("fc1")
    w = fc1.weight.const.copy()
    w[::2] = 0.0  # every other output channel pruned
    fc1.weight.set_const(w)
    fc1.prune = {"channels": list(range(0, 16, 2))}
    make_pass("finetune", {"epochs": "1", "revert_if_worse": "false"}).run(g, ctx)
    assert np.all(fc1.weight.const[::2] == 0) and np.any(fc1.weight.const[1::2] != w[1::2])
    assert ctx.report["passes"]["finetune"]["frozen_weights"] == 8 * 8


def test_negative_epochs_zero_leaves_the_graph_alone(trained):
    g, ctx = quantized_copy(trained)
    consts = [n.weight.const for n in g.layers()]
    res = make_pass("finetune", {"epochs": "0"}).run(g, ctx)
    assert res.modified is False and ctx.report["passes"]["finetune"] == {"skipped": "epochs=0"}
    assert all(n.weight.const is c for n, c in zip(g.layers(), consts))


def test_negative_worse_result_is_reverted(trained):
    g, ctx = quantized_copy(trained, 8, 8)  # 8 bits: nothing to recover, a huge step only hurts
    consts = [(n.weight.const, n.bias.const, n.qconfig.weight_format) for n in g.layers()]
    before = acc_ir(g, ctx.eval)
    res = make_pass("finetune", {"epochs": "1", "lr": "5", "momentum": "0", "schedule": "constant"}).run(g, ctx)
    sec = ctx.report["passes"]["finetune"]
    assert res.modified is False and sec["reverted"] is True and sec["after"] < sec["before"]
    for n, (w, b, f) in zip(g.layers(), consts):
        assert n.weight.const is w and n.bias.const is b and n.qconfig.weight_format is f
    assert acc_ir(g, ctx.eval) == before


def test_needs_labelled_training_data(trained):
    g, ctx = quantized_copy(trained)
    ctx.train = None
    with pytest.raises(DataError, match="--train"):
        make_pass("finetune", {}).run(g, ctx)
    ctx.train = Dataset(trained[1].x, None, "t")
    with pytest.raises(DataError, match="no labels"):
        make_pass("finetune", {}).run(g, ctx)


def test_without_labelled_eval_data_the_formats_are_rechosen(trained):
    g, ctx = quantized_copy(trained, 2, 4)
    ctx.eval = None
    ctx.calib = Dataset(ctx.calib.x, None, "calib")  # unlabelled: nothing to compare formats on
    fmt0 = [n.qconfig.weight_format for n in g.layers()]
    res = make_pass("finetune", {"epochs": "2", "lr": "0.05"}).run(g, ctx)
    sec = ctx.report["passes"]["finetune"]
    assert res.modified is True and sec["formats"] == "re-chosen" and sec["before"] is None
    table = FormatTable(QuantPlan.build(g), ctx.analyses.get(ActivationRanges, g), ctx.target)
    for n in g.layers():
        wf = table.weight_format(n, 2)
        assert n.qconfig.weight_format == wf
        assert n.qconfig.bias_format == table.bias_format(n, n.inputs[0].qformat, wf)
    assert any(n.qconfig.weight_format != f for n, f in zip(g.layers(), fmt0))  # the weights outgrew a format


def test_pipelines_add_or_drop_finetune():
    from mpqc.core.errors import OptionError
    from mpqc.compiler.pipelines import pipeline_spec
    t = get_target("npu8")
    names = lambda spec: [s.split("{")[0] for s in spec]  # noqa: E731
    o2 = names(pipeline_spec(2, t))
    o2f = names(pipeline_spec(2, t, finetune=True))
    # fine-tuning is the last step before QDQ insertion (after the bias correction, which would otherwise
    # move the biases it learned)
    assert "finetune" not in o2 and o2f == o2[:-1] + ["finetune", "insert-qdq"]
    assert o2f[-5:] == ["assign-bit-widths", "optimize-rounding", "bias-correction", "finetune", "insert-qdq"]
    assert names(pipeline_spec(1, t, finetune=True))[-2:] == ["finetune", "insert-qdq"]
    o3 = names(pipeline_spec(3, t))
    # -O3 fine-tunes only when asked, then last before QDQ as well
    assert "finetune" not in o3 and names(pipeline_spec(3, t, finetune=False)) == o3
    assert names(pipeline_spec(3, t, finetune=True)) == o3[:-1] + ["finetune", "insert-qdq"]
    assert names(pipeline_spec(2, t, finetune=False)) == o2
    with pytest.raises(OptionError, match="-O0"):
        pipeline_spec(0, None, finetune=True)


def test_compile_o2_with_finetune_end_to_end(trained):
    from mpqc.compiler.driver import compile_model, report_json_bytes
    g0, train, ev = trained

    def comp():
        return compile_model(g0.copy(), level=2, target="npu4", calib=Dataset(train.x[:100], train.y[:100], "c"),
                             eval=ev, train=train, options={"finetune": True, "finetune_epochs": 1,
                                                            "strategy": "weight-diff-topk", "cycles": 5})
    res = comp()
    rep = res.report
    assert report_json_bytes(rep) == report_json_bytes(comp().report)  # deterministic, no wall times
    assert [p.split("{")[0] for p in rep["pipeline"]][-5:] == ["assign-bit-widths", "optimize-rounding",
                                                                "bias-correction", "finetune", "insert-qdq"]
    ft = rep["passes"]["finetune"]
    assert ft["train"]["steps"] == 13 and ft["before"] is not None and ft["after"] >= ft["before"]
    tr = rep["passes"]["assign-bit-widths"]["trace"]
    assert tr[0]["action"] == "rank" and tr[0]["cycles"] == 5 and tr[-1]["action"] == "topk"
