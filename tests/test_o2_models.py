"""-O2 (mixed precision by layer influence) on the real benchmark models (../shared/bench; skipped when
absent): the issue's done criteria on the digits models, -O2 with only calibration data, and a small
EfficientNet-Lite0 run (depthwise convolutions, branches, bias correction) on 16 images."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mpqc.compiler.driver import _clean_nan, compile_model
from mpqc.compiler.html_report import render_html
from mpqc.compiler.lowering import run_emulator
from tests.conftest import bench_path


@pytest.fixture(scope="module")
def digits():
    return np.load(bench_path("digits.npz"))


def o2(name, digits, **kw):
    return compile_model(bench_path(f"{name}.onnx"), level=2, target="npu4",
                         calib=(digits["x_calib"], digits["y_calib"]), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_resnet", "digits_vgg"])
def test_done_criteria_npu4_max_drop_1pct(name, digits):
    res = o2(name, digits, eval=(digits["x_eval"], digits["y_eval"]), options={"max_drop": 0.01})
    sec = res.report["passes"]["assign-bit-widths"]
    float_test = json.loads(bench_path("digits_models.json").read_text())[name]["test"]
    acc = float(np.mean(np.argmax(run_emulator(res.graph, digits["x_test"]), 1) == digits["y_test"]))
    assert acc >= float_test - 0.015, (name, acc, float_test)  # within 1.5 points of float
    assert sec["weight_bytes"] <= 0.6 * sec["weight_bytes_int8"], sec["weight_ratio_int8"]
    assert sec["strategy"] == "influence-update" and sec["bias_correction"] is True
    assert sec["final_value"] >= sec["goal"] == pytest.approx(0.99 * sec["float_value"])
    assert set(sec["influence"]) == {"chained"}  # the variant the search ranks by, nothing for the report alone
    assert len(sec["influence"]["chained"]) == len(sec["layers"])
    tr = sec["trace"]
    assert tr[0]["action"] == "start" and all(t["action"] == "reduce" for t in tr[1:])
    assert [t["accepted"] for t in tr[1:-1]] == [True] * (len(tr) - 2)  # only the last step may fail
    # the search ends on a step below the goal (NN* is the network before it), on one equal to it, or with
    # every layer at b_m
    assert (not tr[-1]["accepted"] or tr[-1]["verdict"] == "equal"
            or all(b == [2, 4] for b in sec["final_bits"].values()))
    # the rounding fitted at the final widths (kept: it still meets the goal) leaves nothing to correct
    rnd, bc = res.report["passes"]["optimize-rounding"], res.report["passes"]["bias-correction"]
    if "reverted" in rnd:
        assert bc["corrected"] == len(sec["layers"])
    else:
        assert "grid" in bc["skipped"] and rnd["value_after"] >= sec["goal"]
    page = render_html(_clean_nan(res.report))
    assert page.count("data:image/png;base64,") == 2


def test_o2_with_only_calibration_data_scores_agreement_on_it(digits):
    res = compile_model(bench_path("digits_resnet.onnx"), level=2, target="npu4",
                        calib=(digits["x_calib"], digits["y_calib"]),
                        options={"max_drop": 0.02, "strategy": "min-influence"},
                        passes=None)
    sec = res.report["passes"]["assign-bit-widths"]
    assert sec["data"] == {"split": "calib", "source": "<array>--calib", "samples": 100}
    assert sec["metric"] == "agreement" and sec["float_value"] == 1.0 and sec["goal"] == pytest.approx(0.98)
    assert "no --eval data" in sec["note"]
    assert sec["final_value"] >= sec["goal"] and sec["weight_bytes"] < sec["weight_bytes_int8"]
    assert sec["influence_sweeps"] == 1  # min-influence: one chained sweep (no variants for the report alone)
    # the scored agreement is what the exported fixed-point network does on the calibration data
    from mpqc.runtime.executor import run_batched
    ref = run_batched(res.float_graph, digits["x_calib"])[0]
    emu = run_emulator(res.graph, digits["x_calib"])
    assert abs(float(np.mean(np.argmax(emu, 1) == np.argmax(ref, 1))) - sec["final_value"]) <= 0.02


@pytest.mark.slow
def test_efficientnet_o2_small():
    photos = np.load(bench_path("photos.npz"))
    xc = photos["x_calib"][:16].astype(np.float32)
    xe = photos["x_eval"][:16].astype(np.float32)
    from mpqc.compiler.pipelines import CANONICALIZE
    passes = ",".join(CANONICALIZE + [
        "choose-formats{start=ladder}", "layer-influence{variants=chained,layers=0:5,bias_correction=true}",
        "assign-bit-widths{strategy=min-influence,layers=0:5,report_variants=false,bias_correction=true,"
        "max_drop=0.2}", "bias-correction", "insert-qdq"])
    res = compile_model(bench_path("efficientnet_lite0.onnx"), target="npu8", calib=(xc, None), eval=(xe, None),
                        passes=passes, batch_size=16)
    sec = res.report["passes"]["assign-bit-widths"]
    assert sec["metric"] == "agreement" and sec["final_value"] >= sec["goal"]
    names = [r["layer"] for r in sec["layers"]]
    assert len(names) == 50 and set(sec["influence"]["chained"]) == set(names[:6])
    assert all(sec["final_bits"][n] == [8, 16] for n in names[6:])  # outside the range: untouched
    assert res.report["passes"]["bias-correction"]["corrected"] == 50
