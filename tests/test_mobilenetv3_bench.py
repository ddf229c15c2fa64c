"""The MobileNetV3-style bench model made by bench/make_mobilenetv3.py (bench/models/): its structure
(unfused BatchNormalization, HardSwish, squeeze-and-excitation, symbolic N/H/W), its float accuracy
on the digits test split against the json written next to it, and -O1 on it: the emulator equals
onnxruntime on the exported QDQ model (digits data from ../shared/bench; skipped when absent)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from mpqc.compiler.driver import compile_model
from mpqc.compiler.lowering import run_emulator
from tests.conftest import bench_path
from tests.test_o1_models import lsb_of, ort_outputs

MODELS = Path(__file__).resolve().parents[1] / "bench" / "models"
MODEL = MODELS / "digits_mobilenetv3.onnx"
INFO = json.loads((MODELS / "digits_mobilenetv3.json").read_text())["digits_mobilenetv3"]


def float_session():
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(MODEL), so, providers=["CPUExecutionProvider"])


def test_structure():
    m = onnx.load(str(MODEL))
    onnx.checker.check_model(m, full_check=True)
    assert MODEL.stat().st_size < 1_000_000
    assert m.opset_import[0].version == 17
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 1, "H", "W"]
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("BatchNormalization") >= 10 and ops.count("HardSwish") >= 4
    assert {"HardSigmoid", "Mul", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Relu"} <= set(ops)
    bn_in = {n.input[0] for n in m.graph.node if n.op_type == "BatchNormalization"}
    assert all(n.op_type == "Conv" for n in m.graph.node if n.output[0] in bn_in)  # unfused: Conv -> BN
    assert any(n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
               for n in m.graph.node)  # depthwise
    # squeeze-and-excitation: GlobalAveragePool -> Conv -> Relu -> Conv -> HardSigmoid -> Mul
    prod = {o: n for n in m.graph.node for o in n.output}
    se = 0
    for n in m.graph.node:
        if n.op_type != "Mul":
            continue
        chain, t = [], n.input[1]
        while t in prod and len(chain) < 5:
            chain.append(prod[t].op_type)
            t = prod[t].input[0]
        if chain == ["HardSigmoid", "Conv", "Relu", "Conv", "GlobalAveragePool"] and t == n.input[0]:
            se += 1
    assert se == 3


def test_float_accuracy_is_the_recorded_one():
    d = np.load(bench_path("digits.npz"))
    s = float_session()
    for split in ("eval", "test"):
        out = s.run(None, {"input": d[f"x_{split}"].astype(np.float32)})[0]
        assert float(np.mean(np.argmax(out, 1) == d[f"y_{split}"])) == INFO[split], split
    assert INFO["test"] >= 0.97


def test_runs_at_other_heights_and_widths():
    s = float_session()
    x = np.random.default_rng(0).random((2, 1, 24, 20), dtype=np.float32)
    assert s.run(None, {"input": x})[0].shape == (2, 10)


def test_O1_npu8_emulator_equals_onnxruntime():
    """-O1 --target npu8 (about 1 s): bit-identical to onnxruntime on the whole test split (measured);
    test accuracy 0.9875 against the float 0.9850."""
    d = np.load(bench_path("digits.npz"))
    res = compile_model(MODEL, level=1, target="npu8", calib=(d["x_calib"], None))
    assert res.graph.inputs[0].shape == ("N", 1, 16, 16)  # H and W from the calibration data
    assert not any(n.op_type == "BatchNormalization" for n in res.graph.nodes)  # folded by -O1
    x, y = d["x_test"], d["y_test"]
    ref = ort_outputs(res.onnx_bytes(), x)
    emu = run_emulator(res.graph, x)
    assert np.array_equal(emu, ref), np.max(np.abs(emu - ref)) / lsb_of(res.graph)
    assert float(np.mean(np.argmax(emu, 1) == y)) >= INFO["test"] - 0.01
