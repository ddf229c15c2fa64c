"""-O1 on the real benchmark models: accuracy against float, emulator against onnxruntime running
the exported QDQ model, bundle, determinism (../shared/bench; skipped when absent)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from mpqc.compiler.driver import compile_model, report_json_bytes, _clean_nan
from mpqc.compiler.bundle import bundle_bytes
from mpqc.compiler.lowering import lower, run_emulator
from tests.conftest import bench_path

DIGITS = ("digits_resnet", "digits_vgg", "digits_alexnet")


def ort_outputs(onnx_bytes: bytes, x: np.ndarray, batch: int = 100) -> np.ndarray:
    """onnxruntime executing the QDQ graph as ONNX defines it (QDQ fusion off: the fused u8s8
    kernels of AVX2-only CPUs saturate 16-bit pair sums, see docs/FIXED_POINT.md)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    s = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def lsb_of(graph) -> float:
    return float(np.max(graph.outputs[0].qformat.scale()))


@pytest.fixture(scope="module")
def digits():
    return np.load(bench_path("digits.npz"))


@pytest.fixture(scope="module", params=DIGITS)
def compiled(request, digits):
    name = request.param
    res = compile_model(bench_path(f"{name}.onnx"), level=1, target="npu8",
                        calib=(digits["x_calib"], None))
    return name, res, res.onnx_bytes()


def test_accuracy_within_half_a_point_of_float(compiled, digits):
    name, res, onnx_bytes = compiled
    ref = json.loads(bench_path("digits_models.json").read_text())[name]["test"]
    x, y = digits["x_test"], digits["y_test"]
    acc = float(np.mean(np.argmax(ort_outputs(onnx_bytes, x), 1) == y))
    assert acc >= ref - 0.005, (name, acc, ref)


def test_emulator_agrees_with_onnxruntime(compiled, digits):
    name, res, onnx_bytes = compiled
    x = digits["x_test"]
    ref = ort_outputs(onnx_bytes, x)
    emu = run_emulator(res.graph, x)
    assert np.array_equal(np.argmax(emu, 1), np.argmax(ref, 1))  # same top-1 on every test sample
    assert np.max(np.abs(emu - ref)) <= lsb_of(res.graph)  # within 1 LSB (measured: 0)


def test_bundle_runs_like_the_graph(compiled, digits, tmp_path):
    name, res, _ = compiled
    npz, manifest = bundle_bytes(res.graph, res.report)
    p = tmp_path / "b.npz"
    p.write_bytes(npz)
    x = digits["x_test"][:100]
    assert np.array_equal(run_emulator(p, x), run_emulator(res.graph, x))
    m = json.loads(manifest)
    assert m["summary"]["layers"] == len(res.report["quantization"]["layers"])


def test_byte_identical_outputs(digits):
    def once():
        r = compile_model(bench_path("digits_resnet.onnx"), level=1, target="npu8", calib=(digits["x_calib"], None),
                          eval=(digits["x_eval"], digits["y_eval"]))
        return r.onnx_bytes(), bundle_bytes(r.graph, r.report), report_json_bytes(_clean_nan(r.report))
    a, b = once(), once()
    assert a == b
    rep = json.loads(a[2])
    assert rep["accuracy"]["metric"] == "top1" and rep["accuracy"]["quantized (emulator)"] >= 0.99
    assert rep["quantization"]["totals"]["weight_bytes_vs_float"] < 0.26


@pytest.mark.slow
def test_efficientnet_emulator_agrees_with_onnxruntime():
    photos = np.load(bench_path("photos.npz"))
    xc = photos["x_calib"][:16].astype(np.float32)
    x = photos["x_test"][:16].astype(np.float32)
    res = compile_model(bench_path("efficientnet_lite0.onnx"), level=1, target="npu8", calib=(xc, None),
                        batch_size=16)
    ref = ort_outputs(res.onnx_bytes(), x, batch=16)
    emu = run_emulator(res.graph, x, batch_size=16)
    assert np.array_equal(np.argmax(emu, 1), np.argmax(ref, 1))
    assert np.max(np.abs(emu - ref)) <= lsb_of(res.graph)
    kinds = {s.kind for s in lower(res.graph).steps}
    assert "float" in kinds  # the host normalisation runs in float before the input quantizer


@pytest.mark.slow
def test_efficientnet_adaround_runs_every_layer_and_the_emulator_agrees_with_onnxruntime():
    """--rounding adaround on EfficientNet-Lite0 (4 calibration photos, 10 steps a layer: the machinery,
    not the accuracy, which bench/bench_mobile.py measures): every layer fitted or kept at nearest,
    the emulator equal to onnxruntime within 1 LSB."""
    photos = np.load(bench_path("photos.npz"))
    xc = photos["x_calib"][:4].astype(np.float32)
    x = photos["x_test"][:8].astype(np.float32)
    res = compile_model(bench_path("efficientnet_lite0.onnx"), target="npu8", calib=(xc, None), batch_size=4,
                        passes="fold-constants,fold-batchnorm,infer-shapes,choose-formats,"
                               "optimize-rounding{solver=adaround,iters=10},insert-qdq")
    rows = res.report["passes"]["optimize-rounding"]["layers"]
    assert len(rows) == 50 and all(r["applied"] for r in rows)  # 49 Convs and the Gemm
    assert all(r["error_optimised"] <= r["error_nearest"] for r in rows)
    ref = ort_outputs(res.onnx_bytes(), x, batch=8)
    emu = run_emulator(res.graph, x, batch_size=8)
    assert np.max(np.abs(emu - ref)) <= lsb_of(res.graph)
