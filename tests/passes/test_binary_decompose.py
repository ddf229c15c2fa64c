"""binary-decompose: Conv/Gemm weights become M c, recorded in the graph metadata."""
from __future__ import annotations

import numpy as np

from mpqc.compiler.bdecomp import METADATA_PREFIX, Decomposition
from mpqc.compiler.export import to_onnx
from mpqc.compiler.passes import PassContext
from mpqc.passes.binary_decompose import BinaryDecomposePass

from tests.graphs import GraphBuilder, ops, randn, rel_err, run_float, run_ort


def net():
    b = GraphBuilder()
    x = b.input("x", ["N", 2, 6, 6])
    c = b.op("Conv", [x, b.const("w", randn(4, 2, 3, 3, seed=1)), b.const("b", randn(4, seed=2))], name="conv",
             pads=[1, 1, 1, 1])
    r = b.op("Relu", [c], name="relu")
    f = b.op("Flatten", [r], name="flat")
    y = b.op("Gemm", [f, b.const("wf", randn(144, 3, seed=3)), b.const("bf", randn(3, seed=4))], name="fc",
             alpha=0.5, beta=2.0)
    return b.output(y)


def test_decomposes_conv_and_gemm_and_records_the_bases():
    g = net()
    feed = {"x": randn(3, 2, 6, 6, seed=5)}
    before = run_float(g, feed)[0]
    w0 = g.node_by_name("conv").weight.const
    ctx = PassContext()
    res = BinaryDecomposePass(bases=3, restarts=2, iterations=10).run(g, ctx)
    g.verify()
    assert res.modified is True and res.info == {"decomposed": 2, "skipped": 0}
    assert ops(g) == ["Conv", "Relu", "Flatten", "Gemm"]
    fc = g.node_by_name("fc")
    assert fc.attrs == {"alpha": 1.0, "beta": 1.0, "transB": 1} and fc.weight.shape == (3, 144)
    d = Decomposition.from_metadata(g.metadata[METADATA_PREFIX + "conv"])
    assert d.k == 3 and d.M.shape == (4, 18, 3)
    np.testing.assert_array_equal(d.reconstructed().astype(np.float32), g.node_by_name("conv").weight.const)
    assert 0 < d.rel_error < 0.5
    w0 = w0.astype(np.float64)
    assert abs(d.rel_error - np.linalg.norm(d.reconstructed() - w0) / np.linalg.norm(w0)) < 1e-9
    after = run_float(g, feed)[0]
    assert 0 < rel_err(after, before) < 0.5  # an approximation of the same network
    assert rel_err(run_ort(to_onnx(g), feed)[0], after) < 1e-5
    sec = ctx.report["passes"]["binary-decompose"]
    assert [l["layer"] for l in sec["layers"]] == ["conv", "fc"] and sec["not_decomposed"] == []


def test_graph_without_layers_is_not_modified():
    b = GraphBuilder()
    x = b.input("x", ["N", 3])
    g = b.output(b.op("Relu", [x], name="relu"))
    before = g.summary()
    assert BinaryDecomposePass().run(g, PassContext()).modified is False
    assert g.summary() == before and not g.metadata


def test_undecomposable_layer_is_reported_not_crashed():
    b = GraphBuilder()
    x = b.input("x", ["N", 2, 3, 3])
    y = b.op("ConvTranspose", [x, b.const("w", randn(2, 2, 2, 2))], name="deconv")
    g = b.output(y)
    ctx = PassContext()
    res = BinaryDecomposePass().run(g, ctx)
    assert res.info == {"decomposed": 0, "skipped": 1}
    assert "ConvTranspose" in ctx.report["passes"]["binary-decompose"]["not_decomposed"][0]["reason"]


def test_fit_outputs_refits_to_the_calibration_outputs_and_records_the_final_bases():
    import pytest
    from mpqc.compiler.data import Dataset
    from mpqc.core.errors import DataError
    g0 = net()
    r = np.random.default_rng(8)
    xc = np.repeat(np.repeat(r.uniform(0, 1, (200, 2, 3, 3)), 2, axis=2), 2, axis=3).astype(np.float32)
    xt = np.repeat(np.repeat(r.uniform(0, 1, (50, 2, 3, 3)), 2, axis=2), 2, axis=3).astype(np.float32)
    want = run_float(g0, {"x": xt})[0]
    outs = {}
    for fit in ("weights", "outputs"):
        g = net()
        ctx = PassContext(batch_size=50)
        ctx.calib = Dataset(xc, None, "calib")
        BinaryDecomposePass(bases=1, restarts=1, iterations=5, fit=fit, samples=200).run(g, ctx)
        sec = ctx.report["passes"]["binary-decompose"]
        assert sec["fit"] == fit
        d = Decomposition.from_metadata(g.metadata[METADATA_PREFIX + "conv"])
        np.testing.assert_array_equal(d.reconstructed().astype(np.float32), g.node_by_name("conv").weight.const)
        if fit == "outputs":
            assert all(row["output_error"] <= row["output_error_weights_fit"] for row in sec["layers"])
        outs[fit] = run_float(g, {"x": xt})[0]
    assert np.mean((outs["outputs"] - want) ** 2) < 0.5 * np.mean((outs["weights"] - want) ** 2)
    with pytest.raises(DataError, match="give --calib"):
        BinaryDecomposePass(fit="outputs").run(net(), PassContext())
