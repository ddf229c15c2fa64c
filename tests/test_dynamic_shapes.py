"""Dynamic input shapes (issue #11): a PaddleOCR-style text-direction classifier exported at opset 11
(input ``[N, 3, H, W]`` with symbolic N/H/W, Constant-node weights, hard-swish, depthwise Conv + opset-11
Clip, squeeze-and-excitation, a Shape -> Slice/Gather -> Concat -> Reshape head) compiles at -O0, -O1
and -O2 (tests/models/dynamic_ocr.py builds it; docs/DYNAMIC_SHAPES.md)."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import pytest

from mpqc.compiler.driver import compile_model
from mpqc.compiler.frontend import load_graph
from mpqc.compiler.lowering import run_emulator
from mpqc.compiler.options import CompileOptions, parse_input_shape
from mpqc.compiler.quant import QuantPlan, integer_values
from mpqc.core.errors import OptionError
from tests.graphs import GraphBuilder, ort_session, randn
from tests.models import dynamic_ocr
from tests.test_cli import assert_user_error
from tests.test_o1_models import ort_outputs

SHAPE_OPS = {"Shape", "Slice", "Gather", "Concat", "Reshape", "Unsqueeze"}


@pytest.fixture
def mpqc(capsys):
    """The ``mpqc`` command run in this process (``mpqc.cli.main``): exit code and output as a
    subprocess would give them, without the interpreter's start-up."""
    from mpqc.cli import main

    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)
    return run


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    d = tmp_path_factory.mktemp("ocr")
    model = dynamic_ocr.build(d / "cls.onnx")
    data = dynamic_ocr.write_data(d / "data.npz", model)
    return model, data


def ort_float(path, x):
    s = ort_session(path)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def ops_of(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def input_dims(path) -> list:
    d = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [x.dim_value if x.HasField("dim_value") else x.dim_param for x in d]


def lsb(graph) -> float:
    return float(np.max(graph.outputs[0].qformat.scale()))


def test_the_model_is_built_as_the_issue_describes(ocr):
    model, _ = ocr
    m = onnx.load(str(model))
    assert m.opset_import[0].version == 11 and not m.graph.initializer
    assert input_dims(model) == ["N", 3, "H", "W"]
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Constant") >= 20 and {"Shape", "Slice", "Gather", "Concat", "Reshape", "HardSigmoid",
                                             "GlobalAveragePool", "Clip", "BatchNormalization"} <= set(ops)
    clip = next(n for n in m.graph.node if n.op_type == "Clip")
    assert len(clip.input) == 3 and not clip.attribute  # opset-11 Clip: min/max are inputs


# ----------------------------------------------------------------------------- -O0
def test_O0_without_a_shape_leaves_the_shape_subgraph(ocr, tmp_path, mpqc):
    model, _ = ocr
    out, rep = tmp_path / "o0.onnx", tmp_path / "r.json"
    res = mpqc(model, "-O0", "-o", out, "--report", rep)
    assert res.returncode == 0, res.stderr
    assert "note: input x has symbolic dims (Nx3xHxW), so its shape subgraph stays" in res.stderr
    assert "Shape" in ops_of(out)  # H and W are unknown: the head's shape cannot be computed
    x = np.load(ocr[1])["x_test"][:4]
    np.testing.assert_allclose(ort_float(out, x), ort_float(model, x), rtol=1e-4, atol=1e-5)
    assert json.loads(rep.read_text())["inputs"] == [
        {"name": "x", "model_shape": ["N", 3, "H", "W"], "shape": ["N", 3, "H", "W"], "source": "model"}]


@pytest.mark.parametrize("how", ["--input-shape", "--calib", "--eval"])
def test_O0_folds_the_shape_subgraph_once_the_shape_is_known(ocr, tmp_path, mpqc, how):
    model, data = ocr
    out, rep = tmp_path / "o0.onnx", tmp_path / "r.json"
    arg = ["--input-shape", "x:Nx3x48x192"] if how == "--input-shape" else [how, f"{data}:{how[2:]}"]
    res = mpqc(model, "-O0", "-o", out, "--report", rep, *arg)
    assert res.returncode == 0, res.stderr
    assert f"input x: shape Nx3x48x192 from {how}" in res.stderr and "note:" not in res.stderr
    assert not ops_of(out) & SHAPE_OPS and "Flatten" in ops_of(out)
    assert "Constant" not in ops_of(out) and "BatchNormalization" not in ops_of(out)
    assert input_dims(out) == ["N", 3, 48, 192]  # the batch stays free
    row = json.loads(rep.read_text())["inputs"][0]
    assert row["source"] == how and row["shape"] == ["N", 3, 48, 192]
    assert row.get("data") == (None if how == "--input-shape" else f"data.npz:{how[2:]}")
    x = np.load(data)["x_test"][:8]
    np.testing.assert_allclose(ort_float(out, x), ort_float(model, x), rtol=1e-4, atol=1e-5)


def test_O0_with_a_fixed_batch(ocr, tmp_path, mpqc):
    model, data = ocr
    out = tmp_path / "o0.onnx"
    res = mpqc(model, "-O0", "-o", out, "-q", "--input-shape", "x:1x3x48x192")
    assert res.returncode == 0, res.stderr
    assert input_dims(out) == [1, 3, 48, 192] and not ops_of(out) & {"Shape", "Gather", "Concat"}
    x = np.load(data)["x_test"][:1]
    np.testing.assert_allclose(ort_float(out, x), ort_float(model, x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- -O1 / -O2
def check_quantized(mpqc, out, bundle, data, rep, float_min: float, max_lsb: float | None):
    """QDQ model and bundle run; the emulator agrees with onnxruntime on the QDQ model (bit for bit
    when max_lsb is None); the ort/emulator/bundle evaluations print the same value."""
    z = np.load(data)
    x, y = z["x_test"], z["y_test"]
    ref = ort_outputs(out.read_bytes(), x)
    # the bundle (mpqc's importer reads no int4 QDQ model, and -O2 may export 4-bit weights as int4)
    emu = run_emulator(bundle, x)
    assert np.array_equal(np.argmax(emu, 1), np.argmax(ref, 1))
    if max_lsb is None:
        assert np.array_equal(emu, ref)
    else:
        assert np.max(np.abs(emu - ref)) <= max_lsb * lsb_of_output(out)
    agreement = float(np.mean(np.argmax(emu, 1) == y))  # labels: the float model's argmax
    assert agreement >= float_min, agreement
    values = []
    runs = ((out, "ort"), (bundle, "emulator")) if _has_int4(out) else ((out, "ort"), (out, "emulator"), (bundle, "emulator"))
    for model, runtime in runs:
        res = mpqc("eval", model, "--data", f"{data}:test", "--runtime", runtime, "--json", "-q")
        assert res.returncode == 0, res.stderr
        values.append(json.loads(res.stdout)["value"])
    assert all(v == agreement for v in values), values
    r = json.loads(rep.read_text())
    assert r["inputs"][0]["source"] == "--calib" and r["inputs"][0]["shape"] == ["N", 3, 48, 192]
    dims = [d.dim_value or d.dim_param for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, 48, 192]
    return agreement


def _has_int4(path) -> bool:
    return any(t.data_type == onnx.TensorProto.INT4 for t in onnx.load(str(path)).graph.initializer)


def lsb_of_output(out) -> float:
    """Scale of the output's QuantizeLinear in a QDQ file."""
    m = onnx.load(str(out))
    q = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == m.graph.output[0].name)
    init = {t.name: t for t in m.graph.initializer}
    return float(onnx.numpy_helper.to_array(init[q.input[1]]))


def test_O1_end_to_end(ocr, tmp_path, mpqc):
    model, data = ocr
    out, bundle, rep = tmp_path / "q.onnx", tmp_path / "q.npz", tmp_path / "r.json"
    res = mpqc(model, "-O1", "--target", "npu8", "--calib", f"{data}:calib", "-o", out, "--emit-bundle", bundle,
               "--report", rep, "-q")
    assert res.returncode == 0, res.stderr
    assert "Shape" not in ops_of(out)
    r = json.loads(rep.read_text())
    assert len(r["quantization"]["layers"]) == 6  # 5 Conv (the first with its folded BatchNorm) + MatMul
    # activations after hard-swish, the Clip (fused into the depthwise Conv), the SE gate and its Mul
    tensors = {t["tensor"] for t in r["quantization"]["tensors"]}
    assert {"se_gate_25", "se_scale_26", "hswish_10", "hswish_31", "relu6_16"} <= tensors
    check_quantized(mpqc, out, bundle, data, rep, float_min=0.95, max_lsb=None)  # measured: 47/48, 0 LSB


def test_O2_end_to_end(ocr, tmp_path, mpqc):
    model, data = ocr
    out, bundle, rep = tmp_path / "q.onnx", tmp_path / "q.npz", tmp_path / "r.json"
    res = mpqc(model, "-O2", "--target", "npu8", "--calib", f"{data}:calib", "--eval", f"{data}:eval",
               "--max-drop", "0.05", "-o", out, "--emit-bundle", bundle, "--report", rep, "-q")
    assert res.returncode == 0, res.stderr
    r = json.loads(rep.read_text())
    assert r["accuracy"]["quantized (emulator)"] >= 0.95 * r["accuracy"]["float"]
    # 16-bit activations (the ladder's top): onnxruntime's float32 Mul of two 16-bit tensors (the SE
    # scale, hard-swish's x * gate) rounds products above 2^24 that the emulator keeps exact
    # the goal is on the eval split (5% drop allowed): with the rounding optimisation the search lowers
    # layers to 4 bits; measured 44/48 on test (48/48 when nothing was lowered), within 2 LSB of onnxruntime
    check_quantized(mpqc, out, bundle, data, rep, float_min=0.9, max_lsb=4)


def test_HardSwish_op_at_opset_17_is_bit_exact_at_16_bits(tmp_path):
    """The HardSwish op (opset 14+) on 16-bit activations: evaluated in float32 as the QDQ model is,
    the emulator equals onnxruntime (in float64 it differed by 1 LSB)."""
    model = dynamic_ocr.build(tmp_path / "m.onnx", opset=17)
    x = dynamic_ocr.images(16, seed=5)
    res = compile_model(model, level=1, target="npu8", passes="fold-constants,fold-batchnorm,"
                        "reshape-to-flatten,choose-formats{act_bits=16},insert-qdq", calib=(x, None))
    assert "HardSwish" in {n.op_type for n in res.graph.nodes}
    xt = dynamic_ocr.images(16, seed=6)
    emu, ref = run_emulator(res.graph, xt), ort_outputs(res.onnx_bytes(), xt)
    # measured: 0 LSB; with HardSwish/HardSigmoid in float64, 3 logits differed by 1 LSB. (The SE
    # block's integer Mul of two 16-bit tensors could still round in onnxruntime's float32 Mul on
    # other data: see test_O2_end_to_end.)
    assert np.array_equal(emu, ref), np.max(np.abs(emu - ref)) / lsb(res.graph)


def test_shape_subgraph_left_in_place_still_quantizes(ocr):
    """A graph whose shape subgraph did not fold (an IR graph with symbolic H/W): the tensors that
    carry shapes get no format, and the emulator computes them as host integers."""
    model, data = ocr
    z = np.load(data)
    g = load_graph(model)
    assert {"Shape", "Concat", "Reshape"} <= {n.op_type for n in g.nodes}
    res = compile_model(g, level=1, target="npu8", calib=(z["x_calib"], None))
    q = res.graph
    shape_vals = [v for n in q.nodes if n.op_type in ("Shape", "Gather", "Concat", "Slice", "Unsqueeze")
                  for v in n.outputs]
    assert shape_vals and all(v.qformat is None for v in shape_vals)
    assert not any(n.op_type == "QuantizeLinear" and n.inputs[0] in shape_vals for n in q.nodes)
    x = z["x_test"]
    assert np.array_equal(run_emulator(q, x), ort_outputs(res.onnx_bytes(), x))


def test_integer_values_get_no_quantization_point():
    b = GraphBuilder("ints")
    x = b.input("x", ["N", 4, 2, 2])
    c = b.op("Conv", [x, b.const("w", randn(4, 4, 1, 1, seed=1))], name="conv")
    s = b.op("Shape", [c], name="shape")  # typed float32 by the builder: its op says it is a shape
    n = b.op("Gather", [s, b.const("i0", np.array([0], np.int64))], name="batch", axis=0)
    two = b.op("Mul", [n, b.const("two", np.array([2], np.int64))], name="twice")
    t = b.op("Concat", [two, b.const("rest", np.array([-1], np.int64))], name="target", axis=0)
    r = b.op("Reshape", [c, t], name="reshape")
    g = b.output(b.op("MatMul", [r, b.const("fw", randn(8, 3, seed=2))], name="fc"))
    ints = integer_values(g)
    assert {v.name for v in g.values() if id(v) in ints} == {"shape_out", "batch_out", "twice_out", "target_out"}
    plan = QuantPlan.build(g)
    kinds = {v.name: p.kind for v, p in plan.points.items()}
    assert kinds == {"x": "input", "conv_out": "layer", "reshape_out": "layout", "fc_out": "layer"}


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("spec, needles", [
    ("y:1x3x48x192", ["--input-shape", "'y'", "inputs are: 'x'"]),
    ("x:1x4x48x192", ["--input-shape x:1x4x48x192", "dim 1 of input 'x' is fixed to 3"]),
    ("x:1x3x48", ["--input-shape x:1x3x48", "input 'x'", "rank 4"]),
    ("x:1x3x40x192", ["input shape x:1x3x40x192 from --input-shape", "MatMul"]),
    ("x:1x3x0x192", ["--input-shape", "positive integer"]),
    ("x:1x3x48x1.5", ["--input-shape", "'1.5'"]),
])
def test_input_shape_errors(ocr, tmp_path, mpqc, spec, needles):
    model, _ = ocr
    out = tmp_path / "o.onnx"
    assert_user_error(mpqc(model, "-O0", "-o", out, "--input-shape", spec), *needles, out=out)


def test_calibration_data_the_model_does_not_fit(ocr, tmp_path, mpqc):
    model, data = ocr
    z = dict(np.load(data))
    bad = tmp_path / "small.npz"
    np.savez(bad, x_calib=z["x_calib"][:, :, :32])
    out = tmp_path / "o.onnx"
    assert_user_error(mpqc(model, "-O1", "--calib", f"{bad}:calib", "-o", out),
                      "input shape x:Nx3x32x192 from --calib small.npz:calib", out=out)


def test_input_shape_option_parsing():
    assert parse_input_shape("x:1x3x48x192") == ("x", (1, 3, 48, 192))
    assert parse_input_shape("input:0:Nx3x?x192") == ("input:0", (None, 3, None, 192))
    assert parse_input_shape("1x3x48x192") == (None, (1, 3, 48, 192))
    opts = CompileOptions.from_dict({"input_shape": {"x": (None, 3, 48, 192)}})
    assert opts.input_shape == ("x:?x3x48x192",) and opts.input_shapes == {"x": (None, 3, 48, 192)}
    for bad in ("x:", ":1x3", "x:1xx3"):
        with pytest.raises(OptionError, match="--input-shape"):
            parse_input_shape(bad)
    with pytest.raises(OptionError, match="twice"):
        CompileOptions(input_shape=("x:1x3", "x:1x4")).check()


def test_api_input_shape(ocr):
    import mpqc as api
    model, data = ocr
    g = api.load(model, input_shape={"x": (None, 3, 48, 192)})
    assert g.inputs[0].shape == ("N", 3, 48, 192) and not {n.op_type for n in g.nodes} & SHAPE_OPS
    x = np.load(data)["x_test"][:4]
    np.testing.assert_allclose(api.run(g, x), ort_float(model, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(OptionError, match="IR graph"):
        compile_model(g, level=0, options={"input_shape": ["x:1x3x48x192"]})
