"""bdcnn target end to end: QDQ ONNX export == popcount runtime, bad layers kept, a real model."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.bdcnn import compile_bdcnn, decomposable
from mpqc.runtime.bdcnn import run_bdcnn

from tests.conftest import bench_path
from tests.graphs import GraphBuilder, randn, rel_err, run_float
from tests.runtime.test_bdcnn import small_net


def ort_run(model_bytes: bytes, x: np.ndarray, level=None) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if level is not None:
        so.graph_optimization_level = level
    s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("q", [2, 5, 8])
@pytest.mark.parametrize("k", [1, 3])
def test_onnx_export_equals_popcount_runtime_bit_for_bit(q, k):
    import onnxruntime as ort
    g = small_net()
    x = np.random.default_rng(1).uniform(-1, 1, (32, 3, 8, 8)).astype(np.float32)
    res = compile_bdcnn(g, x, q_fixed=q, bases=k, restarts=1, iterations=5)
    ops = [n.op_type for n in res.graph.nodes]
    # the integer form: codes, q - zp, one +-1 Conv/Gemm per layer, a Gather and a Mul per base
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 0
    assert ops.count("Cast") == 3 and ops.count("Sub") == 3 and ops.count("Conv") == 2 and ops.count("Gemm") == 1
    assert ops.count("Gather") == 3 * k and ops.count("Mul") == 3 * k
    assert ops.count("Clip") == (3 if q < 8 else 0)
    conv = next(n for n in res.graph.nodes if n.op_type == "Conv")
    assert set(np.unique(conv.inputs[1].const)) == {-1.0, 1.0} and conv.inputs[1].const.shape[0] == 8 * k
    pop = run_bdcnn(res.program, x)[0]
    # onnxruntime's default session, and with no graph optimization at all: the same bits
    for level in (None, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        np.testing.assert_array_equal(ort_run(res.onnx_bytes(), x, level), pop)
    # and mpqc's own float runtime on the exported graph
    np.testing.assert_array_equal(run_float(res.graph, {"x": x})[0], pop)


def test_algorithm1_report_and_undecomposable_layer_is_kept():
    b = GraphBuilder()
    x = b.input("x", ["N", 2, 5, 5])
    c = b.op("Conv", [x, b.const("w", randn(4, 2, 3, 3, seed=1))], name="conv", pads=[1, 1, 1, 1])
    r = b.op("Relu", [c], name="relu")
    t = b.op("ConvTranspose", [r, b.const("wt", randn(4, 3, 2, 2, seed=2))], name="deconv", strides=[2, 2])
    f = b.op("Flatten", [t], name="flat")
    y = b.op("Gemm", [f, b.const("wf", randn(300, 3, seed=3, scale=0.1))], name="fc")  # transB = 0
    g = b.output(y)
    assert decomposable(g.node_by_name("deconv")) is not None
    xs = np.random.default_rng(2).normal(size=(40, 2, 5, 5)).astype(np.float32)
    res = compile_bdcnn(g, xs[:20], xs[20:], None, max_drop=0.05, bases={"*": 2, "fc": 3}, restarts=1,
                        iterations=5)
    rep = res.report
    assert [l["layer"] for l in rep["layers"]] == ["conv", "fc"]
    assert [l["k"] for l in rep["layers"]] == [2, 3]
    assert rep["not_decomposed"][0]["layer"] == "deconv" and "ConvTranspose" in rep["not_decomposed"][0]["reason"]
    acc = rep["accuracy"]
    assert acc["metric"] == "agreement" and acc["float"] == 1.0
    assert set(rep["q"].values()) <= set(range(2, 9)) and rep["q_mode"] == "algorithm1"
    assert acc["measured (popcount runtime)"] == pytest.approx(acc["qdq (float runtime)"])
    assert "predicted" in acc and len(rep["drop_rates"]) == 2
    assert rel_err(run_bdcnn(res.program, xs)[0], ort_run(res.onnx_bytes(), xs)) < 1e-5


@pytest.mark.slow
def test_digits_alexnet():
    from mpqc.compiler.frontend import load_graph
    from mpqc.compiler.passes import PassContext, PassManager
    from mpqc.compiler.pipelines import build_pipeline
    g = load_graph(bench_path("digits_alexnet.onnx"))
    PassManager(build_pipeline(0)).run(g, PassContext())
    d = np.load(bench_path("digits.npz"))
    res = compile_bdcnn(g, d["x_calib"], d["x_eval"][:150], d["y_eval"][:150], max_drop=0.02, bases=4,
                        restarts=1, iterations=10)
    rep = res.report
    assert len(rep["layers"]) == 8 and not rep["not_decomposed"]
    assert rep["sizes"]["vs_float"] < 0.2  # the paper: about 80% smaller than float on AlexNet
    acc = rep["accuracy"]
    assert acc["measured (popcount runtime)"] > 0.9
    assert acc["measured (popcount runtime)"] == pytest.approx(acc["qdq (float runtime)"], abs=1 / 150)
    x = d["x_test"][:32]
    assert rel_err(run_bdcnn(res.program, x)[0], ort_run(res.onnx_bytes(), x)) < 1e-4


@pytest.mark.parametrize("q", [5, 8])
def test_ort_agreement_same_input_is_bit_exact_quantizer_and_float_tolerance(q):
    """Teacher-forced comparison (compiler/bdcnn.py ort_agreement): fed ORT's own input, every
    decomposed layer's quantization sub-layer gives ORT's QuantizeLinear codes bit for bit and
    its output matches ORT's Conv/Gemm to float tolerance; end-to-end differences can only come
    from activations within ulps of a quantizer tie (counted in code_flips)."""
    pytest.importorskip("onnxruntime")
    from mpqc.compiler.bdcnn import ort_agreement
    g = small_net()
    x = np.random.default_rng(1).uniform(-1, 1, (8, 3, 8, 8)).astype(np.float32)
    res = compile_bdcnn(g, x, q_fixed=q, bases=2, restarts=1, iterations=5, measure=False)
    agr = ort_agreement(res, x)
    assert agr["code_diff"] == 0
    assert agr["layer_rel"] < 1e-5
    assert agr["codes"] > 0 and agr["code_flips"] <= agr["codes"]
    if agr["code_flips"] == 0:
        assert agr["end_to_end_rel"] < 1e-5


@pytest.mark.parametrize("inputs", ["decomposed", "float"])
def test_refine_in_place_fits_the_layer_outputs(inputs):
    from mpqc.compiler.bdcnn import decompose_in_place, refine_in_place
    g = small_net()
    r = np.random.default_rng(7)

    def images(n):  # smooth, correlated pixels, as in photos (2x2 blocks of noise plus a little detail)
        x = np.repeat(np.repeat(r.uniform(-1, 1, (n, 3, 4, 4)), 2, axis=2), 2, axis=3)
        return (x + 0.1 * r.normal(size=x.shape)).astype(np.float32)
    xc, xt = images(256), images(64)
    dg = g.copy()
    decs, _ = decompose_in_place(dg, bases=2, restarts=1, iterations=5)
    before = {n: d.M.copy() for n, d in decs.items()}
    y_f = run_float(g, {"x": xt})[0]
    y_w = run_float(dg, {"x": xt})[0]
    rows = refine_in_place(g, dg, decs, xc, inputs=inputs, rounds=3, batch_size=64)
    y_d = run_float(dg, {"x": xt})[0]
    assert [row["layer"] for row in rows] == ["conv1", "dw", "fc"]
    assert all(row["output_error_data_fit"] <= row["output_error_weights_fit"] for row in rows)
    assert any(not np.array_equal(before[n], decs[n].M) for n in decs)
    # the network's outputs on held-out data come closer to the float network's
    assert np.mean((y_d - y_f) ** 2) < 0.7 * np.mean((y_w - y_f) ** 2)
    # every layer of the graph is its decomposition (weights M c, a fitted bias)
    for n in ("conv1", "dw", "fc"):
        node = dg.node_by_name(n)
        np.testing.assert_allclose(node.weight.const, decs[n].reconstructed().reshape(node.weight.shape), rtol=1e-6)
        assert node.bias is not None


def test_fit_option_is_checked():
    from mpqc.core.errors import OptionError
    with pytest.raises(OptionError, match="fit must be one of"):
        compile_bdcnn(small_net(), np.zeros((4, 3, 8, 8), np.float32), q_fixed=4, fit="data")


@pytest.mark.slow
def test_efficientnet_onnx_export_equals_the_popcount_runtime():
    """49 requantizations of EfficientNet-Lite0 and not one code apart: the integer form is exact."""
    from mpqc.compiler.bdcnn import ort_agreement
    from mpqc import load
    ph = np.load(bench_path("photos.npz"))
    g = load(str(bench_path("efficientnet_lite0.onnx")))
    res = compile_bdcnn(g, ph["x_calib"][:4].astype(np.float32), q_fixed=4, bases=2, restarts=1, iterations=2,
                        fit="weights")
    x = ph["x_test"][:2].astype(np.float32)
    np.testing.assert_array_equal(ort_run(res.onnx_bytes(), x), run_bdcnn(res.program, x)[0])
    agr = ort_agreement(res, x)
    assert agr["code_flips"] == 0 and agr["codes"] > 10 ** 7 and agr["end_to_end_rel"] == 0.0


def test_reuse_takes_the_decompositions_and_says_how_they_were_fitted():
    g = small_net()
    x = np.random.default_rng(3).uniform(-1, 1, (16, 3, 8, 8)).astype(np.float32)
    base = compile_bdcnn(g, x, q_fixed=4, bases=2, restarts=1, iterations=5, fit="weights")
    res = compile_bdcnn(g, x, q_fixed=3, bases=3, reuse=base)  # bases and fit of this call are not used
    assert res.report["fit"] == base.report["fit"] and res.report["settings"]["fit"] == "weights"
    assert {n: d.k for n, d in res.decompositions.items()} == {"conv1": 2, "dw": 2, "fc": 2}
    for n, d in base.decompositions.items():
        np.testing.assert_array_equal(res.decompositions[n].M, d.M)
    assert {r["Q"] for r in res.report["layers"]} == {3}
