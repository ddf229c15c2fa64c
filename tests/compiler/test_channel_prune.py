"""Channel pruning on the IR: prunable units, patches, applying a selection, REAP refit, PRO, a real model."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.channel_prune import (PruneRecord, apply_prune, collect_patches, find_units, pro_curves, prune_graph,
                                         prune_unit, total_macs)
from mpqc.compiler.reap import brute_force_prune, lstsq_refit, reap_prune

from tests.conftest import bench_path
from tests.graphs import GraphBuilder, conv, conv_pool_fc, randn, rel_err, run_float, run_ort, set_shapes


def chain3():
    """conv1 -> BN -> relu -> mul(const) -> conv2 -> relu -> maxpool -> conv3 (graph output)."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    c1 = conv(b, x, 3, 6, "conv1", seed=1)
    rng = np.random.default_rng(9)
    bn = b.op("BatchNormalization", [c1, b.const("g", rng.uniform(0.5, 2, 6).astype(np.float32)),
                                     b.const("be", rng.normal(size=6).astype(np.float32) * 0.1),
                                     b.const("mu", rng.normal(size=6).astype(np.float32) * 0.1),
                                     b.const("var", rng.uniform(0.5, 2, 6).astype(np.float32))], name="bn")
    r1 = b.op("Relu", [bn], name="relu1")
    m = b.op("Mul", [r1, b.const("scale", rng.uniform(0.5, 1.5, (6, 1, 1)).astype(np.float32))], name="mul")
    c2 = conv(b, m, 6, 5, "conv2", seed=2)
    r2 = b.op("Relu", [c2], name="relu2")
    p = b.op("MaxPool", [r2], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    c3 = conv(b, p, 5, 4, "conv3", k=1, seed=3, bias=False)
    g = b.output(c3)
    set_shapes(g)
    return g


def data(n=40, shape=(3, 8, 8), seed=5):
    return np.abs(randn(n, *shape, seed=seed))


def unit_of(g, name):
    units, _ = find_units(g)
    return next(u for u in units if u.name == name)


def test_units_and_refusals_of_a_chain():
    g = chain3()
    units, refused = find_units(g)
    assert [u.name for u in units] == ["conv1", "conv2"]
    u1, u2 = units
    assert [n.name for n in u1.coupled] == ["bn", "relu1", "mul"] and u1.consumer.name == "conv2"
    assert [n.name for n in u2.coupled] == ["relu2", "pool"] and u2.consumer.name == "conv3"
    assert u1.channels == 6 and u1.in_factor == 1 and u1.in_offset == 0
    assert u1.macs == 64 * (6 * 27 + 5 * 54)
    assert [r.node.name for r in refused] == ["conv3"] and "graph output" in refused[0].reason


def test_keep_all_changes_nothing():
    g = chain3()
    x = data()
    want = run_float(g, {"x": x})[0]
    rec = apply_prune(g, "conv1", range(6))
    g.verify()
    assert rec == PruneRecord(tuple(range(6)), 6, "manual") and g.node_by_name("conv1").prune is rec
    assert np.array_equal(run_float(g, {"x": x})[0], want)
    # REAP refit with every channel kept reproduces the original layer
    rec, res = prune_unit(g, "conv2", 0.0, "reap", x, n_samples=2000)
    assert res.removed == [] and rec.kept == tuple(range(5))
    assert rel_err(run_float(g, {"x": x})[0], want) < 1e-4


def test_pruning_a_channel_with_zero_contribution_is_exact():
    g = chain3()
    c2 = g.node_by_name("conv2")
    w = c2.weight.const.copy()
    w[:, 2] = 0.0
    g.set_input(c2, 1, g.constant("w2z", w))
    x = data()
    want = run_float(g, {"x": x})[0]
    macs = total_macs(g)
    h = g.copy()
    apply_prune(h, "conv1", [0, 1, 3, 4, 5])
    h.verify()
    assert h.node_by_name("conv1").weight.shape == (5, 3, 3, 3)
    assert h.node_by_name("conv2").weight.shape == (5, 5, 3, 3)
    assert h.value_by_name("scale_pruned").shape == (5, 1, 1)
    assert total_macs(h) == macs - 64 * (27 + 5 * 9)
    assert rel_err(run_float(h, {"x": x})[0], want) < 1e-6
    # REAP finds it: its removal costs nothing after the refit
    rec, res = prune_unit(g, "conv1", 0.0, "reap", x, n_keep=5)
    assert res.removed == [2] and res.delta_errors[0] < 1e-6 * max(res.error, 1.0)
    assert rel_err(run_float(g, {"x": x})[0], want) < 1e-4


def test_refit_equals_brute_force_and_ort():
    g = chain3()
    x = data()
    u = unit_of(g, "conv1")
    pt = collect_patches(g, u, x, n_samples=1500, seed=3)
    assert pt.X.shape == (1500, 6 * 9 + 1) and pt.Y.shape == (1500, 5) and pt.bias
    assert np.all(pt.X[:, -1] == 1.0) and [list(gr) for gr in pt.groups[:2]] == [list(range(9)), list(range(9, 18))]
    # the patches reproduce the consumer's outputs
    w2 = g.node_by_name("conv2").weight.const.reshape(5, -1).astype(np.float64)
    b2 = g.node_by_name("conv2").bias.const.astype(np.float64)
    np.testing.assert_allclose(pt.X[:, :-1] @ w2.T + b2, pt.Y, rtol=1e-5, atol=1e-5)
    ref = brute_force_prune(pt.X, pt.Y, pt.groups, 3)
    rec, res = prune_unit(g, "conv1", 0.5, "reap", patches=pt)
    g.verify()
    assert res.removed == ref.removed and list(rec.kept) == list(ref.keep)
    np.testing.assert_allclose(res.delta_errors, ref.delta_errors, rtol=1e-6)
    W = lstsq_refit(pt.X, pt.Y, ref.columns)
    c2 = g.node_by_name("conv2")
    assert c2.weight.shape == (5, 3, 3, 3)
    np.testing.assert_allclose(c2.weight.const.reshape(5, -1), W[:-1].T.astype(np.float32), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c2.bias.const, W[-1].astype(np.float32), rtol=1e-5, atol=1e-6)
    xt = data(7, seed=11)
    assert rel_err(run_float(g, {"x": xt})[0], run_ort(g, {"x": xt})[0]) < 1e-5


@pytest.mark.parametrize("method", ["reap", "l1", "l1-norefit", "thinet"])
def test_every_method_gives_a_valid_graph(method):
    g = chain3()
    x = data()
    orig = g.copy()
    rec, _ = prune_unit(g, "conv2", 0.4, method, x, n_samples=800)
    g.verify()
    assert len(rec.kept) == 3 and rec.method == method and rec.original_channels == 5
    xt = data(5, seed=12)
    got = run_float(g, {"x": xt})[0]
    assert rel_err(got, run_ort(g, {"x": xt})[0]) < 1e-5
    assert got.shape == run_float(orig, {"x": xt})[0].shape


def test_refit_beats_no_refit():
    g = chain3()
    x = data(60)
    want = run_float(g, {"x": x})[0]
    errs = {}
    for m in ["reap", "l1", "l1-norefit"]:
        h = g.copy()
        prune_unit(h, "conv1", 0.5, m, x, n_samples=2000)
        errs[m] = float(np.mean((run_float(h, {"x": x})[0] - want) ** 2))
    assert errs["reap"] <= errs["l1"] * 1.05 and errs["l1"] < errs["l1-norefit"]


def test_depthwise_coupling():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    c1 = conv(b, x, 3, 6, "conv1", seed=1)
    r1 = b.op("Relu", [c1], name="relu1")
    dw = b.op("Conv", [r1, b.const("dw_w", randn(6, 1, 3, 3, seed=4)), b.const("dw_b", randn(6, seed=5))],
              name="dw", group=6, pads=[1, 1, 1, 1])
    r2 = b.op("Clip", [dw, b.const("lo", np.float32(0)), b.const("hi", np.float32(6))], name="relu6")
    c2 = conv(b, r2, 6, 4, "conv2", k=1, seed=6)
    g = b.output(b.op("Relu", [c2], name="relu_out"))
    set_shapes(g)
    u = unit_of(g, "conv1")
    assert [n.name for n in u.coupled] == ["relu1", "dw", "relu6"] and u.consumer.name == "conv2"
    assert "dw" not in [r.node.name for r in find_units(g)[1]]  # a depthwise conv is coupled, not a unit
    # channel 1's depthwise filter is zero: removing it is exact
    dwn = g.node_by_name("dw")
    w = dwn.weight.const.copy()
    w[1] = 0
    bb = dwn.bias.const.copy()
    bb[1] = 0
    g.set_input(dwn, 1, g.constant("dwz", w))
    g.set_input(dwn, 2, g.constant("dwbz", bb))
    xs = data()
    want = run_float(g, {"x": xs})[0]
    h = g.copy()
    apply_prune(h, "conv1", [0, 2, 3, 4, 5])
    h.verify()
    assert h.node_by_name("dw").attrs["group"] == 5 and h.node_by_name("dw").weight.shape == (5, 1, 3, 3)
    assert rel_err(run_float(h, {"x": xs})[0], want) < 1e-6
    rec, res = prune_unit(g, "conv1", 0.5, "reap", xs, n_samples=1500)
    g.verify()
    assert 1 in res.removed
    assert rel_err(run_float(g, {"x": xs[:4]})[0], run_ort(g, {"x": xs[:4]})[0]) < 1e-5


def test_flatten_gemm_coupling():
    g = conv_pool_fc(alpha=0.5)
    u = unit_of(g, "conv1")
    assert u.consumer.name == "fc" and u.in_factor == 4 and [n.name for n in u.coupled] == ["relu1", "pool", "flat"]
    fcn = g.node_by_name("fc")
    w = fcn.weight.const.copy()
    w[:, 8:12] = 0  # channel 2 owns columns 8..11
    g.set_input(fcn, 1, g.constant("fcz", w))
    xs = data(80, (3, 4, 4))
    want = run_float(g, {"x": xs})[0]
    h = g.copy()
    apply_prune(h, "conv1", [0, 1, 3])
    h.verify()
    assert h.node_by_name("fc").weight.shape == (5, 12) and h.node_by_name("flat").outputs[0].shape == ("N", 12)
    assert rel_err(run_float(h, {"x": xs})[0], want) < 1e-6
    pt = collect_patches(g, "conv1", xs, n_samples=1000)
    assert pt.X.shape == (80, 17) and [list(gr) for gr in pt.groups] == [list(range(4 * c, 4 * c + 4))
                                                                        for c in range(4)]
    ref = brute_force_prune(pt.X, pt.Y, pt.groups, 2)
    rec, res = prune_unit(g, "conv1", 0.5, "reap", patches=pt)
    assert res.removed == ref.removed and res.removed[0] == 2
    fcn = g.node_by_name("fc")
    assert fcn.attrs["alpha"] == 1.0 and fcn.weight.shape == (5, 8)
    np.testing.assert_allclose(fcn.weight.const.T, lstsq_refit(pt.X, pt.Y, ref.columns)[:-1], rtol=1e-5, atol=1e-5)
    assert rel_err(run_float(g, {"x": xs[:6]})[0], run_ort(g, {"x": xs[:6]})[0]) < 1e-5


def test_concat_coupling():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 6, 6])
    ca = b.op("Relu", [conv(b, x, 3, 4, "conv_a", seed=1)], name="ra")
    cb = b.op("Relu", [conv(b, x, 3, 3, "conv_b", seed=2)], name="rb")
    cat = b.op("Concat", [ca, cb], name="cat", axis=1)
    c2 = conv(b, cat, 7, 5, "conv2", seed=3)
    g = b.output(b.op("Relu", [c2], name="r2"))
    set_shapes(g)
    units, refused = find_units(g)
    ua, ub = units
    assert (ua.name, ua.in_offset, ub.name, ub.in_offset) == ("conv_a", 0, "conv_b", 4)
    xs = data(40, (3, 6, 6))
    prune_unit(g, "conv_b", 0.4, "reap", xs, n_samples=1000)
    prune_unit(g, "conv_a", 0.5, "reap", xs, n_samples=1000)
    g.verify()
    assert g.node_by_name("conv2").weight.shape == (5, 4, 3, 3) and g.node_by_name("cat").outputs[0].shape[1] == 4
    assert rel_err(run_float(g, {"x": xs[:4]})[0], run_ort(g, {"x": xs[:4]})[0]) < 1e-5


def test_residual_add_is_refused():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 6, 6])
    r0 = b.op("Relu", [conv(b, x, 3, 4, "c0", seed=1)], name="r0")
    r1 = b.op("Relu", [conv(b, r0, 4, 4, "c1", seed=2)], name="r1")
    c2 = conv(b, r1, 4, 4, "c2", seed=3)
    add = b.op("Add", [c2, r0], name="add")
    c3 = conv(b, b.op("Relu", [add], name="r2"), 4, 2, "c3", seed=4)
    g = b.output(c3)
    set_shapes(g)
    units, refused = find_units(g)
    assert [u.name for u in units] == ["c1"]
    why = {r.node.name: r.reason for r in refused}
    assert set(why) == {"c0", "c2", "c3"}
    assert "Add node 'add'" in why["c0"] and "residual" in why["c0"] and "Add node 'add'" in why["c2"]
    from mpqc.core.errors import CompilerError
    with pytest.raises(CompilerError, match="residual"):
        apply_prune(g, "c2", [0, 1])


def test_pro_curves_and_prune_graph():
    g = chain3()
    x = data(40)
    units, _ = find_units(g)
    curves = pro_curves(g, units, x, ratios=(0.2, 0.5, 0.8), n_samples=800)
    assert [c.unit for c in curves] == ["conv1", "conv2"]
    c1 = curves[0]
    assert c1.ratios[0] == 0.0 and c1.macs_saved[0] == 0 and c1.errors[0] == 0.0
    assert c1.n_keep == [6, 5, 3, 1] and all(np.diff(c1.macs_saved) > 0) and all(e >= 0 for e in c1.errors)
    before = total_macs(g)
    for how in ("pro", "uniform"):
        h, rep = prune_graph(g, x, 0.6, ratios=how, grid=(0.2, 0.5, 0.8), n_samples=800)
        h.verify()
        assert rep.macs_before == before and rep.macs_after == total_macs(h) <= 0.6 * before
        assert total_macs(g) == before  # the input graph is untouched
        xt = data(4, seed=13)
        assert rel_err(run_float(h, {"x": xt})[0], run_ort(h, {"x": xt})[0]) < 1e-5
        if how == "uniform":
            assert len(set(rep.kept[u] / rep.channels[u] for u in rep.kept)) <= 2


def test_real_vgg_layer_reap_equals_brute_force():
    import mpqc
    g = mpqc.load(bench_path("digits_vgg.onnx"))
    d = np.load(bench_path("digits.npz"))
    units, _ = find_units(g)
    names = [u.name for u in units]
    assert len(units) == 6  # every conv (the last one through GAP and Flatten into the classifier)
    u = units[0]
    assert u.channels == 32 and u.consumer.op_type == "Conv"
    pt = collect_patches(g, u, d["x_calib"], n_samples=1200, seed=0)
    assert pt.X.shape == (1200, 32 * 9 + 1)
    fast = reap_prune(pt.X, pt.Y, pt.groups, 16)
    ref = brute_force_prune(pt.X, pt.Y, pt.groups, 16)
    assert fast.removed == ref.removed and np.array_equal(fast.keep, ref.keep)
    for a, b_ in zip(fast.candidate_errors, ref.candidate_errors):
        m = ~np.isnan(b_)
        np.testing.assert_allclose(a[m], b_[m], rtol=1e-6)
    h = g.copy()
    prune_unit(h, names[0], 0.5, "reap", patches=pt)
    h.verify()
    xt = d["x_test"][:64]
    logits = run_float(g, {"input": xt})[0]
    got = run_float(h, {"input": xt})[0]
    assert rel_err(got, run_ort(h, {"input": xt})[0]) < 1e-4
    assert np.mean(got.argmax(1) == logits.argmax(1)) >= 0.9
