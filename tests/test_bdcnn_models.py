"""--target bdcnn end to end on a real model: decomposition, Algorithm 1, the QDQ model in
onnxruntime against the popcount bundle, determinism, and the eval command on the bundle."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.driver import Outputs, compile_model
from mpqc.compiler.evaluate import evaluate_file, run_model, run_ort
from mpqc.core.errors import DataError, OptionError

from tests.conftest import bench_path


@pytest.fixture(scope="module")
def digits():
    return np.load(bench_path("digits.npz"))


def bd(level, digits, tmp_path, tag, **options):
    out = Outputs(tmp_path / f"{tag}.onnx", tmp_path / f"{tag}_report.json", None, tmp_path / f"{tag}.npz")
    res = compile_model(bench_path("digits_alexnet.onnx"), level=level, target="bdcnn",
                        calib=(digits["x_calib"], None), eval=(digits["x_eval"][:150], digits["y_eval"][:150]),
                        options={"restarts": 1, "iterations": 8, **options}, outputs=out)
    return res, out


@pytest.mark.slow
def test_o2_bdcnn_onnx_matches_the_popcount_bundle(digits, tmp_path):
    res, out = bd(2, digits, tmp_path, "a", max_drop=0.02, bases="3")
    rep = res.report["bdcnn"]
    assert rep["q_mode"] == "algorithm1" and len(rep["layers"]) == 8 and rep["not_decomposed"] == []
    assert all(r["k"] == 3 and 2 <= r["Q"] <= 8 for r in rep["layers"])
    acc = rep["accuracy"]
    assert {"predicted", "measured (popcount runtime)", "float"} <= set(acc)
    assert acc["measured (popcount runtime)"] >= 0.9 * acc["float"]
    assert rep["sizes"]["vs_float"] < 0.2  # the paper: about 80% smaller than float on AlexNet
    assert res.report["compiled_model"]["weight_bytes"] < 0.2 * res.report["float_model"]["weight_bytes"]
    x = digits["x_test"][:64]
    pop = run_model(str(out.bundle), x, runtime="popcount")
    ort_out = run_ort(str(out.model), x)
    np.testing.assert_array_equal(pop, ort_out)  # the integer form: the same bits
    assert rep["fit"]["mode"] == "outputs" and len(rep["fit"]["layers"]) == 8
    assert all(r["output_error"] <= r["output_error_weights_fit"] for r in rep["layers"])
    r = evaluate_file(str(out.bundle), f"{bench_path('digits.npz')}:test")
    assert r["runtime"] == "popcount" and r["value"] >= 0.9
    with pytest.raises(OptionError, match="--runtime popcount"):
        evaluate_file(str(out.bundle), f"{bench_path('digits.npz')}:test", runtime="emulator")
    # the same inputs and options give the same bytes
    _, out2 = bd(2, digits, tmp_path, "b", max_drop=0.02, bases="3")
    for a, b in ((out.model, out2.model), (out.bundle, out2.bundle), (out.report, out2.report)):
        assert a.read_bytes() == b.read_bytes(), a


def test_o1_bdcnn_fixes_q_and_needs_calibration(digits, tmp_path):
    res, _ = bd(1, digits, tmp_path, "o1", bases="2", planes=4)
    rep = res.report["bdcnn"]
    assert rep["q_mode"] == "fixed" and {r["Q"] for r in rep["layers"]} == {4}
    assert {r["k"] for r in rep["layers"]} == {2}
    with pytest.raises(DataError, match="--target bdcnn calibrates"):
        compile_model(bench_path("digits_alexnet.onnx"), level=1, target="bdcnn")
    with pytest.raises(DataError, match="give --eval"):
        compile_model(bench_path("digits_alexnet.onnx"), level=2, target="bdcnn", calib=digits["x_calib"])
    with pytest.raises(OptionError, match="pruning \\(-O3\\) is not combined"):
        compile_model(bench_path("digits_alexnet.onnx"), level=3, target="bdcnn", calib=digits["x_calib"])
    with pytest.raises(OptionError, match="--planes .* must be in 2..8"):
        compile_model(bench_path("digits_alexnet.onnx"), level=1, target="bdcnn", options={"planes": 9})
    with pytest.raises(OptionError, match="--bases: k=9 must be in 1..8"):
        compile_model(bench_path("digits_alexnet.onnx"), level=1, target="bdcnn", options={"bases": "3,/0/Conv=9"})


@pytest.mark.slow
def test_fitting_to_outputs_beats_fitting_to_weights_at_k2(digits, tmp_path):
    """The paper's weight-space fit loses digits_alexnet at k = 2; the output fit keeps it usable."""
    acc = {}
    for fit in ("weights", "outputs"):
        res, out = bd(1, digits, tmp_path, fit, bases="2", planes=8, fit=fit)
        acc[fit] = evaluate_file(str(out.bundle), f"{bench_path('digits.npz')}:test")["value"]
        assert res.report["bdcnn"]["settings"]["fit"] == fit
    assert acc["outputs"] >= acc["weights"] + 0.05 and acc["outputs"] >= 0.95, acc
