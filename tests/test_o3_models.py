"""-O3 (channel pruning to a MACs budget, then the -O2 mixed-precision search) on the real
digits models: both budgets met, the model runs in onnxruntime, the report's stages."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.driver import compile_model
from mpqc.compiler.evaluate import run_ort
from mpqc.compiler.lowering import run_emulator
from mpqc.core.errors import TargetError

from tests.conftest import bench_path


@pytest.fixture(scope="module")
def digits():
    return np.load(bench_path("digits.npz"))


def o3(name, digits, **options):
    return compile_model(bench_path(f"{name}.onnx"), level=3, target="npu4",
                         calib=(digits["x_calib"], digits["y_calib"]), eval=(digits["x_eval"], digits["y_eval"]),
                         options=options)


@pytest.mark.slow
def test_resnet_half_the_macs_within_one_point(digits, tmp_path):
    res = o3("digits_resnet", digits, flops=0.5, max_drop=0.01)
    rep = res.report
    stages = {s["stage"]: s for s in rep["stages"]}
    assert list(stages) == ["float", "serialize-residual", "prune-channels", "compiled"]
    assert stages["serialize-residual"]["macs"] > stages["float"]["macs"]  # the carried channels
    assert stages["compiled"]["macs_fraction"] <= 0.5 and stages["prune-channels"]["macs_fraction"] <= 0.5
    assert stages["compiled"]["weight_bytes"] < stages["prune-channels"]["weight_bytes"] / 4  # int8 and less
    acc = rep["accuracy"]
    assert acc["quantized (emulator)"] >= 0.99 * acc["float"]
    assert stages["compiled"]["accuracy"] == acc["quantized (emulator)"]
    prune = rep["passes"]["prune-channels"]
    assert prune["method"] == "reap" and prune["ratios"] == "pro" and prune["curves"]
    search = rep["passes"]["assign-bit-widths"]
    assert search["float_value"] == acc["float"]  # the goal is relative to the unpruned model
    out = tmp_path / "r3.onnx"
    out.write_bytes(res.onnx_bytes())
    x = digits["x_test"]
    ort_out = run_ort(str(out), x)
    emu = run_emulator(res.graph, x)
    assert np.mean(ort_out.argmax(1) == emu.argmax(1)) >= 0.995
    assert np.mean(ort_out.argmax(1) == digits["y_test"]) >= 0.98


@pytest.mark.slow
def test_an_impossible_pair_of_budgets_names_flops(digits):
    with pytest.raises(TargetError, match="--flops 0.05"):
        o3("digits_vgg", digits, flops=0.05, max_drop=0.001)
