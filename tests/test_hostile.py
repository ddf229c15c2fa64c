"""Hostile input (issue 14): every bad model, data file, bundle, option or path gives exit 2 with
exactly one ``mpqc: error:`` line and no traceback; no input is ever modified; a failed run
leaves no output (and changes no pre-existing file); a valid odd input gives a correct result.

The CLI runs in-process (``mpqc.cli.main``) for speed; ``run_cli`` captures stdout, stderr and
warnings (a numpy warning printed before the error line counts as a second line).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import pickle
import traceback
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpqc.cli import main

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "digits_resnet.onnx"
DIGITS = ROOT / "examples" / "digits.npz"


@dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    exc: str | None  # a traceback when an exception escaped main()

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


def run_cli(*argv) -> Result:
    out, err = io.StringIO(), io.StringIO()
    exc = None
    rc = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                rc = e.code
            except BaseException:
                exc = traceback.format_exc()
    stderr = err.getvalue() + "".join(f"warning: {w.category.__name__}: {w.message}\n" for w in caught
                                      if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)))
    return Result(rc, out.getvalue(), stderr, exc)


def assert_error(res: Result, *needles: str) -> str:
    assert res.exc is None, res.exc
    assert res.rc == 2, (res.rc, res.stderr)
    assert len(res.lines) == 1, res.stderr
    line = res.lines[0]
    assert line.startswith("mpqc: error: "), line
    assert "Traceback" not in res.stderr and "mpqc bug" not in line, line
    for n in needles:
        assert n in line, (n, line)
    return line


def digest(*paths) -> dict:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


def tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


# ----------------------------------------------------------------------------- model builders
def base_model() -> onnx.ModelProto:
    return onnx.load(str(RESNET))


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def init(model, name):
    for t in model.graph.initializer:
        if t.name == name:
            return t
    raise KeyError(name)


def node(model, op, k=0):
    return [n for n in model.graph.node if n.op_type == op][k]


def set_attr(n, name, value):
    for a in list(n.attribute):
        if a.name == name:
            n.attribute.remove(a)
    if value is not None:
        n.attribute.append(helper.make_attribute(name, value))


def replace_init(model, name, arr):
    t = init(model, name)
    t.CopyFrom(numpy_helper.from_array(np.asarray(arr), name))


def tiny_model(*, conv_attrs=None, w_shape=(4, 1, 3, 3), bias_shape=(4,), in_shape=("N", 1, 8, 8),
               in_type=TensorProto.FLOAT, opset=17, gemm_alpha=1.0) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm (10 classes): small and fast."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, w_shape).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    conv_in = ["x", "w"]
    if bias_shape is not None:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, bias_shape).astype(np.float32), "b"))
        conv_in.append("b")
    oc = w_shape[0]
    inits += [numpy_helper.from_array(rng.normal(0, 0.3, (10, oc)).astype(np.float32), "fw"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fb")]
    nodes = []
    x_name = "x"
    if in_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="cast"))
        conv_in[0] = x_name = "xf"
    attrs = {"kernel_shape": list(w_shape[2:]), "pads": [1, 1, 1, 1]} if conv_attrs is None else conv_attrs
    nodes += [helper.make_node("Conv", conv_in, ["c"], name="conv", **attrs),
              helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1, alpha=gemm_alpha)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", in_type, list(in_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.fixture(scope="module")
def data8(tmp_path_factory) -> Path:
    """Data for tiny_model: x_calib/x_eval/x_test (N, 1, 8, 8) with labels."""
    rng = np.random.default_rng(1)
    p = tmp_path_factory.mktemp("data") / "d8.npz"
    arrs = {}
    for s, n in (("calib", 100), ("eval", 40), ("test", 40)):
        arrs[f"x_{s}"] = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
        arrs[f"y_{s}"] = rng.integers(0, 10, n)
    np.savez(p, **arrs)
    return p


def check_all_commands(model_path: Path, data: Path, tmp_path: Path, *needles: str) -> None:
    """info, float eval, ort eval and compile -O0/-O1 each give the same one-line error."""
    before = digest(model_path, data)
    out = tmp_path / "o" / "out.onnx"
    for argv in (["info", model_path], ["eval", model_path, "--data", f"{data}:test", "-q"],
                 ["eval", model_path, "--data", f"{data}:test", "-q", "--runtime", "ort"],
                 [model_path, "-O0", "-o", out, "-q"],
                 [model_path, "-O1", "--calib", f"{data}:calib", "-o", out, "-q"]):
        assert_error(run_cli(*argv), *needles)
        assert not (tmp_path / "o").exists()
    assert digest(model_path, data) == before


# ----------------------------------------------------------------------------- invalid models
def test_tiny_model_is_valid(tmp_path, data8):
    p = save(tiny_model(), tmp_path / "t.onnx")
    assert run_cli("info", p).rc == 0
    res = run_cli(p, "-O1", "--calib", f"{data8}:calib", "-o", tmp_path / "q.onnx", "-q")
    assert res.rc == 0, (res.stderr, res.exc)


def test_nan_in_weights(tmp_path, data8):
    m = base_model()
    t = init(m, m.graph.node[0].input[1])
    a = numpy_helper.to_array(t).copy()
    a.flat[3] = np.nan
    replace_init(m, t.name, a)
    check_all_commands(save(m, tmp_path / "m.onnx"), DIGITS, tmp_path, "NaN", t.name)


def test_inf_in_weights(tmp_path, data8):
    m = tiny_model()
    a = numpy_helper.to_array(init(m, "fw")).copy()
    a[0, 0] = np.inf
    replace_init(m, "fw", a)
    check_all_commands(save(m, tmp_path / "m.onnx"), data8, tmp_path, "fw", "infinite")


def test_inf_in_gemm_alpha(tmp_path, data8):
    check_all_commands(save(tiny_model(gemm_alpha=float("inf")), tmp_path / "m.onnx"), data8, tmp_path,
                       "'fc'", "alpha")


def test_nan_in_base_model_gemm_alpha(tmp_path):
    m = base_model()
    set_attr(node(m, "Gemm"), "alpha", float("nan"))
    check_all_commands(save(m, tmp_path / "m.onnx"), DIGITS, tmp_path, "/fc/Gemm", "alpha")


def test_kernel_shape_disagrees_with_weights(tmp_path, data8):
    m = tiny_model(conv_attrs={"kernel_shape": [5, 5], "pads": [1, 1, 1, 1]})
    check_all_commands(save(m, tmp_path / "m.onnx"), data8, tmp_path, "'conv'", "kernel_shape")


def test_group_does_not_divide_channels(tmp_path, data8):
    m = tiny_model(conv_attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": 3})
    check_all_commands(save(m, tmp_path / "m.onnx"), data8, tmp_path, "'conv'", "group")


def test_group_negative(tmp_path, data8):
    m = tiny_model(conv_attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": -1})
    check_all_commands(save(m, tmp_path / "m.onnx"), data8, tmp_path, "'conv'", "group")


def test_strides_zero(tmp_path, data8):
    m = tiny_model(conv_attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [0, 1]})
    check_all_commands(save(m, tmp_path / "m.onnx"), data8, tmp_path, "'conv'", "strides")


def test_auto_pad_with_pads(tmp_path, data8):
    m = tiny_model(conv_attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "auto_pad": "SAME_UPPER"})
    check_all_commands(save(m, tmp_path / "m.onnx"), data8, tmp_path, "'conv'", "auto_pad", "pads")


def test_bias_of_wrong_shape(tmp_path, data8):
    check_all_commands(save(tiny_model(bias_shape=(5,)), tmp_path / "m.onnx"), data8, tmp_path, "'conv'", "bias")


@pytest.mark.parametrize("dim", [0, 2 ** 62])
def test_zero_or_huge_input_dim(tmp_path, data8, dim):
    check_all_commands(save(tiny_model(in_shape=("N", 1, dim, 8)), tmp_path / "m.onnx"), data8, tmp_path,
                       "'x'", "dim")


def test_zero_dim_weight(tmp_path, data8):
    check_all_commands(save(tiny_model(w_shape=(0, 1, 3, 3), bias_shape=(0,)), tmp_path / "m.onnx"), data8,
                       tmp_path, "'w'")


def test_no_graph_output(tmp_path):
    m = base_model()
    del m.graph.output[:]
    check_all_commands(save(m, tmp_path / "m.onnx"), DIGITS, tmp_path, "no graph output")


def test_unsupported_opset(tmp_path):
    m = base_model()
    m.opset_import[0].version = 999
    check_all_commands(save(m, tmp_path / "m.onnx"), DIGITS, tmp_path, "opset 999")


def test_invalid_utf8_node_name(tmp_path):
    m = base_model()
    raw = m.SerializeToString()
    name = m.graph.node[1].name.encode()
    bad = name[:-1] + b"\xff"
    assert raw.count(name) >= 1
    p = tmp_path / "m.onnx"
    p.write_bytes(raw.replace(name, bad, 1))
    check_all_commands(p, DIGITS, tmp_path, "UTF-8")


def test_initializer_raw_data_longer_than_dims(tmp_path):
    m = base_model()
    t = init(m, m.graph.node[0].input[1])
    t.raw_data = t.raw_data + b"\0" * 16
    check_all_commands(save(m, tmp_path / "m.onnx"), DIGITS, tmp_path, t.name, "raw data")


def test_initializer_raw_data_shorter_than_dims(tmp_path):
    m = base_model()
    t = init(m, m.graph.node[0].input[1])
    t.raw_data = t.raw_data[:-8]
    check_all_commands(save(m, tmp_path / "m.onnx"), DIGITS, tmp_path, t.name, "raw data")


def test_ort_exception_is_one_error(tmp_path, data8, monkeypatch):
    import onnxruntime as ort

    def boom(self, *a, **k):
        raise ort.capi.onnxruntime_pybind11_state.Fail("[ONNXRuntimeError] : 1 : FAIL : kernel exploded\nline 2")
    monkeypatch.setattr(ort.InferenceSession, "run", boom)
    p = save(tiny_model(), tmp_path / "m.onnx")
    assert_error(run_cli("eval", p, "--data", f"{data8}:test", "--runtime", "ort", "-q"), "onnxruntime",
                 "kernel exploded")


def test_ort_rejects_model(tmp_path, data8, monkeypatch):
    import onnxruntime as ort

    def boom(*a, **k):
        raise ort.capi.onnxruntime_pybind11_state.InvalidGraph("[ONNXRuntimeError] : 10 : INVALID_GRAPH : bad")
    monkeypatch.setattr(ort, "InferenceSession", boom)
    p = save(tiny_model(), tmp_path / "m.onnx")
    assert_error(run_cli("eval", p, "--data", f"{data8}:test", "--runtime", "ort", "-q"), "onnxruntime",
                 "INVALID_GRAPH")


# ----------------------------------------------------------------------------- data files
def _data_case(tmp_path, data: Path, *needles, model=RESNET):
    before = digest(data, model)
    assert_error(run_cli("eval", model, "--data", f"{data}:test", "-q"), *needles)
    out = tmp_path / "o" / "q.onnx"
    assert_error(run_cli(model, "-O1", "--calib", f"{data}:calib", "-o", out, "-q"), *needles)
    assert not out.parent.exists()
    assert digest(data, model) == before


def test_empty_npz_file(tmp_path):
    p = tmp_path / "d.npz"
    p.write_bytes(b"")
    _data_case(tmp_path, p, "'" + str(p) + "'", "empty")


def test_empty_zip(tmp_path):
    p = tmp_path / "d.npz"
    with zipfile.ZipFile(p, "w"):
        pass
    _data_case(tmp_path, p, "no array")


def test_npz_member_not_npy(tmp_path):
    p = tmp_path / "d.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x_test.npy", b"hello, this is not an npy file")
        z.writestr("x_calib.npy", b"hello, this is not an npy file")
    _data_case(tmp_path, p, "not a valid .npy array")


def test_npz_member_corrupted(tmp_path):
    src = np.load(DIGITS)
    p = tmp_path / "d.npz"
    np.savez_compressed(p, **{k: src[k] for k in src.files})
    raw = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:
        infos = {i.filename: i for i in z.infolist()}
    for key in ("x_test.npy", "x_calib.npy"):
        off = infos[key].header_offset + 30 + len(key) + infos[key].compress_size // 2
        raw[off] ^= 0xFF
    p.write_bytes(bytes(raw))
    _data_case(tmp_path, p, "corrupt")


@pytest.mark.parametrize("kind", ["text", "gzip", "pickle"])
def test_text_gzip_pickle_as_data(tmp_path, kind):
    p = tmp_path / "d.npz"
    if kind == "text":
        p.write_text("1,2,3\n4,5,6\n")
    elif kind == "gzip":
        p.write_bytes(gzip.compress(b"1,2,3\n" * 100))
    else:
        p.write_bytes(pickle.dumps({"x_test": [1, 2, 3]}))
    line = _data_case(tmp_path, p, "not an .npz archive") or ""
    res = run_cli("eval", RESNET, "--data", f"{p}:test", "-q")
    assert "unsafely" not in res.stderr and "pickled" not in res.stderr


def test_npy_given_as_data(tmp_path):
    p = tmp_path / "d.npz"
    with open(p, "wb") as f:
        np.save(f, np.zeros((3, 1, 16, 16), np.float32))
    _data_case(tmp_path, p, "single array")


def _npy_with_header(shape, dtype="<f4") -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": dtype, "fortran_order": False, "shape": shape})
    return b.getvalue() + b"\0" * 1024


def test_huge_header_sample_count(tmp_path):
    p = tmp_path / "d.npz"
    with zipfile.ZipFile(p, "w") as z:
        for s in ("test", "calib"):
            z.writestr(f"x_{s}.npy", _npy_with_header((10 ** 10, 1, 16, 16)))
    line = _data_case(tmp_path, p, "x_test" if False else "10000000000")
    res = run_cli("eval", RESNET, "--data", f"{p}:test", "-q")
    assert "--batch-size" not in res.stderr


def test_header_longer_than_file(tmp_path):
    p = tmp_path / "d.npz"
    with zipfile.ZipFile(p, "w") as z:
        for s in ("test", "calib"):
            z.writestr(f"x_{s}.npy", _npy_with_header((10, 1, 16, 16)))
    _data_case(tmp_path, p, "x_")


def test_object_array_in_data(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x_test=np.array([1, "a"], dtype=object), x_calib=np.array([1, "a"], dtype=object))
    _data_case(tmp_path, p, "x_")


def test_float64_data_overflowing_float32(tmp_path):
    x = np.load(DIGITS)["x_test"].astype(np.float64)
    x[0, 0, 0, 0] = 1e300
    p = tmp_path / "d.npz"
    np.savez(p, x_test=x, x_calib=x)
    _data_case(tmp_path, p, "infinite", "float32")


def test_integer_model_input(tmp_path, data8):
    m = save(tiny_model(in_type=TensorProto.INT64), tmp_path / "m.onnx")
    d = tmp_path / "di.npz"
    rng = np.random.default_rng(0)
    np.savez(d, x_calib=rng.integers(-3, 3, (20, 1, 8, 8)), x_test=rng.integers(-3, 3, (20, 1, 8, 8)),
             y_test=rng.integers(0, 10, 20))
    res = run_cli("eval", m, "--data", f"{d}:test", "-q")
    assert res.rc == 0, (res.stderr, res.exc)
    res = run_cli(m, "-O0", "-o", tmp_path / "o0.onnx", "-q")
    assert res.rc == 0, (res.stderr, res.exc)
    assert_error(run_cli(m, "-O1", "--calib", f"{d}:calib", "-o", tmp_path / "o1.onnx", "-q"), "int64", "'x'")


def test_fixed_batch_one_model_calibrates_with_100_samples(tmp_path):
    m = base_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    flat = node(m, "Flatten")  # as a batch-1 export writes it: a Reshape to the fixed shape [1, 64]
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 64], np.int64), "flat_shape"))
    flat.CopyFrom(helper.make_node("Reshape", [flat.input[0], "flat_shape"], list(flat.output), name=flat.name))
    p = save(m, tmp_path / "b1.onnx")
    out = tmp_path / "q.onnx"
    res = run_cli(p, "-O1", "--calib", f"{DIGITS}:calib", "--eval", f"{DIGITS}:eval", "-o", out, "-q")
    assert res.rc == 0, (res.stderr, res.exc)
    assert out.exists()
    for model, runtime in ((p, "float"), (p, "ort"), (out, "ort"), (out, "float")):
        res = run_cli("eval", model, "--data", f"{DIGITS}:test", "-q", "--json", "--runtime", runtime)
        assert res.rc == 0, (res.stderr, res.exc)
        assert json.loads(res.stdout)["value"] > 0.98


def test_fixed_batch_needs_a_multiple_of_samples(tmp_path):
    m = base_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 3
    p = save(m, tmp_path / "b3.onnx")
    assert_error(run_cli("eval", p, "--data", f"{DIGITS}:test", "-q"), "fixed batch of 3", "400")


# ----------------------------------------------------------------------------- bundles
@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("bundles")
    fx, bd = d / "fx.npz", d / "bd.npz"
    res = run_cli(RESNET, "-O1", "--calib", f"{DIGITS}:calib", "--emit-bundle", fx, "-q")
    assert res.rc == 0, (res.stderr, res.exc)
    res = run_cli(RESNET, "-O1", "--target", "bdcnn", "--calib", f"{DIGITS}:calib", "--emit-bundle", bd, "-q",
                  "--restarts", "1", "--iterations", "3")
    assert res.rc == 0, (res.stderr, res.exc)
    return {"emulator": fx, "popcount": bd}


def read_npz_members(p: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(p) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_members(p: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, b in members.items():
            z.writestr(n, b)
    return p


def npy_bytes(a, allow_pickle=False) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array(b, a, allow_pickle=allow_pickle)
    return b.getvalue()


def manifest_of(members) -> dict:
    return json.loads(np.load(io.BytesIO(members["__manifest__.npy"])).tobytes())


def with_manifest(members, m) -> dict:
    members = dict(members)
    members["__manifest__.npy"] = npy_bytes(np.frombuffer(json.dumps(m).encode(), np.uint8))
    return members


def _bundle_case(bundle: Path, runtime: str, *needles):
    before = digest(bundle)
    assert_error(run_cli("eval", bundle, "--data", f"{DIGITS}:test", "--runtime", runtime, "-q"), *needles)
    assert digest(bundle) == before


@pytest.mark.parametrize("runtime", ["emulator", "popcount"])
def test_bundles_evaluate(bundles, runtime):
    res = run_cli("eval", bundles[runtime], "--data", f"{DIGITS}:test", "--runtime", runtime, "-q", "--json")
    assert res.rc == 0, (res.stderr, res.exc)
    assert json.loads(res.stdout)["value"] > 0.9


@pytest.mark.parametrize("runtime", ["emulator", "popcount"])
def test_bundle_corrupted_member(bundles, runtime, tmp_path):
    raw = bytearray(bundles[runtime].read_bytes())
    with zipfile.ZipFile(bundles[runtime]) as z:
        big = max(z.infolist(), key=lambda i: i.compress_size)
    off = big.header_offset + 30 + len(big.filename) + big.compress_size // 2
    raw[off] ^= 0xFF
    p = tmp_path / "b.npz"
    p.write_bytes(bytes(raw))
    _bundle_case(p, runtime, "corrupt")


@pytest.mark.parametrize("runtime", ["emulator", "popcount"])
def test_bundle_manifest_without_steps(bundles, runtime, tmp_path):
    mem = read_npz_members(bundles[runtime])
    m = manifest_of(mem)
    del m["steps"]
    _bundle_case(write_members(tmp_path / "b.npz", with_manifest(mem, m)), runtime, "steps")


@pytest.mark.parametrize("runtime", ["emulator", "popcount"])
@pytest.mark.parametrize("field", ["inputs", "constants", "outputs", "model"])
def test_bundle_manifest_missing_field(bundles, runtime, tmp_path, field):
    mem = read_npz_members(bundles[runtime])
    m = manifest_of(mem)
    del m[field]
    _bundle_case(write_members(tmp_path / "b.npz", with_manifest(mem, m)), runtime, field)


@pytest.mark.parametrize("runtime", ["emulator", "popcount"])
def test_bundle_manifest_not_an_object(bundles, runtime, tmp_path):
    mem = read_npz_members(bundles[runtime])
    mem["__manifest__.npy"] = npy_bytes(np.frombuffer(b"[1, 2]", np.uint8))
    _bundle_case(write_members(tmp_path / "b.npz", mem), runtime, "manifest")


@pytest.mark.parametrize("runtime", ["emulator", "popcount"])
def test_bundle_constant_of_wrong_shape(bundles, runtime, tmp_path):
    mem = read_npz_members(bundles[runtime])
    m = manifest_of(mem)
    name, c = max(m["constants"].items(), key=lambda kv: int(np.prod(kv[1]["shape"])))
    a = np.load(io.BytesIO(mem[c["key"] + ".npy"]))
    mem[c["key"] + ".npy"] = npy_bytes(a.reshape(-1)[: max(1, a.size // 2)].copy())
    _bundle_case(write_members(tmp_path / "b.npz", mem), runtime, name, "shape")


@pytest.mark.parametrize("runtime", ["emulator", "popcount"])
def test_bundle_object_array(bundles, runtime, tmp_path):
    mem = read_npz_members(bundles[runtime])
    m = manifest_of(mem)
    name, c = next(iter(m["constants"].items()))
    mem[c["key"] + ".npy"] = npy_bytes(np.array([1, "a", None], dtype=object), allow_pickle=True)
    _bundle_case(write_members(tmp_path / "b.npz", mem), runtime, name)


# ----------------------------------------------------------------------------- options
def test_finetune_epochs_inf(tmp_path):
    out = tmp_path / "q.onnx"
    assert_error(run_cli(RESNET, "-O1", "--calib", f"{DIGITS}:calib", "--train", f"{DIGITS}:calib", "--finetune",
                         "--finetune-epochs", "inf", "-o", out, "-q"), "--finetune-epochs")
    assert not out.exists()


@pytest.mark.parametrize("opt", ["--max-drop", "--target-score", "--flops"])
def test_float_options_nan(tmp_path, opt):
    assert_error(run_cli(RESNET, "-O3", "--calib", f"{DIGITS}:calib", "--eval", f"{DIGITS}:eval", opt, "nan",
                         "-o", tmp_path / "q.onnx", "-q"), opt)


@pytest.mark.parametrize("opt", ["-o", "--report", "--html", "--emit-bundle"])
def test_empty_output_path(tmp_path, opt):
    assert_error(run_cli(RESNET, "-O0", opt, "", "-q"), opt, "empty")


def test_output_is_a_directory(tmp_path):
    assert_error(run_cli(RESNET, "-O0", "-o", tmp_path, "-q"), "-o", "directory")


# ----------------------------------------------------------------------------- paths
def _path_case(tmp_path: Path, argv: list, *needles):
    before = tree(tmp_path)
    assert_error(run_cli(*argv), *needles)
    assert tree(tmp_path) == before


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "m.onnx").write_bytes(RESNET.read_bytes())
    (tmp_path / "d.npz").write_bytes(DIGITS.read_bytes())
    return tmp_path


def test_output_equals_calib_file(work):
    _path_case(work, ["m.onnx" if False else work / "m.onnx", "-O1", "--calib", f"{work / 'd.npz'}:calib",
                      "-o", work / "d.npz", "-q"], "--output", "--calib")


def test_report_equals_eval_file(work):
    (work / "c.npz").write_bytes(DIGITS.read_bytes())
    _path_case(work, [work / "m.onnx", "-O1", "--calib", f"{work / 'c.npz'}:calib", "--eval",
                      f"{work / 'd.npz'}:eval", "--report", work / "d.npz", "-q"], "--report", "--eval")


def test_output_equals_model(work):
    _path_case(work, [work / "m.onnx", "-O0", "-o", work / "m.onnx", "-q"], "--output", "model")


def test_output_same_file_by_other_spelling(work):
    _path_case(work, [work / "m.onnx", "-O0", "-o", work / "sub" / ".." / "m.onnx", "-q"], "--output", "model")


def test_json_model_with_bundle_manifest(work):
    m = onnx.load(str(work / "m.onnx"))
    onnx.save(m, str(work / "m.json"), format="json")
    (work / "m.onnx").unlink()
    _path_case(work, [work / "m.json", "-O1", "--calib", f"{work / 'd.npz'}:calib", "--emit-bundle",
                      work / "m.npz", "-q"], "--emit-bundle", "model", "m.json")


def test_json_model_compiles(work):
    onnx.save(onnx.load(str(work / "m.onnx")), str(work / "m.json"), format="json")
    res = run_cli(work / "m.json", "-O0", "-o", work / "o.onnx", "-q")
    assert res.rc == 0, (res.stderr, res.exc)


def test_bundle_manifest_equals_report(work):
    _path_case(work, [work / "m.onnx", "-O1", "--calib", f"{work / 'd.npz'}:calib", "--emit-bundle",
                      work / "b.npz", "--report", work / "b.json", "-q"], "--report", "--emit-bundle")


def test_bundle_named_json(work):
    _path_case(work, [work / "m.onnx", "-O1", "--calib", f"{work / 'd.npz'}:calib", "--emit-bundle",
                      work / "b.json", "-q"], "--emit-bundle", ".json")


def test_existing_output_untouched_when_report_fails(work):
    out = work / "q.onnx"
    out.write_bytes(b"old model")
    (work / "rep").mkdir()
    (work / "rep" / "r.json").mkdir()  # the report path is a directory: cannot be written
    before = tree(work)
    res = run_cli(work / "m.onnx", "-O0", "-o", out, "--report", work / "rep" / "r.json", "-q")
    assert_error(res, "r.json")
    assert tree(work) == before


def test_failed_write_leaves_no_new_file_nor_folder(work, monkeypatch):
    from mpqc.compiler import driver

    real = driver.render_html

    def bad(*a, **k):
        raise OSError(28, "No space left on device")
    out = work / "new" / "deep" / "q.onnx"
    before = tree(work)
    import mpqc.compiler.export as export
    real_replace = export.os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(export.os, "replace", replace)
    res = run_cli(work / "m.onnx", "-O0", "-o", out, "--report", work / "new" / "r" / "r.json", "-q")
    assert_error(res, "No space left")
    assert tree(work) == before


def test_existing_outputs_all_replaced_on_success(work):
    out, rep = work / "q.onnx", work / "r.json"
    out.write_bytes(b"old")
    rep.write_bytes(b"old")
    res = run_cli(work / "m.onnx", "-O0", "-o", out, "--report", rep, "-q")
    assert res.rc == 0, (res.stderr, res.exc)
    assert out.read_bytes() != b"old" and json.loads(rep.read_text())
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []


def test_eval_data_equals_model(work):
    _path_case(work, ["eval", work / "m.onnx", "--data", f"{work / 'm.onnx'}:test", "-q"], "--data")


# ----------------------------------------------------------------------------- found by tests/test_fuzz.py
def test_weight_of_absurd_magnitude(tmp_path, data8):
    m = tiny_model()
    a = numpy_helper.to_array(init(m, "w")).copy()
    a.flat[0] = 3e38  # a flipped exponent bit: finite, but the outputs overflow to inf
    replace_init(m, "w", a)
    check_all_commands(save(m, tmp_path / "m.onnx"), data8, tmp_path, "'w'", "magnitude")


def test_conv_with_dynamic_weight(tmp_path):
    m = base_model()
    add = node(m, "Add")
    add.op_type = "Conv"  # Conv(x, residual): a weight whose shape depends on the batch
    check_all_commands(save(m, tmp_path / "m.onnx"), DIGITS, tmp_path, add.name, "weight")


def test_negative_seed(tmp_path):
    assert_error(run_cli(RESNET, "-O1", "--calib", f"{DIGITS}:calib", "--seed", "-1", "-o", tmp_path / "q.onnx",
                         "-q"), "--seed")


def test_weight_type_differs_from_input(tmp_path):
    m = base_model()
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    check_all_commands(save(m, tmp_path / "m.onnx"), DIGITS, tmp_path, "inconsistent", "/stem/stem.0/Conv")
