"""ONNX import/export on the real benchmark models, opset upgrade, and import errors."""
from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpqc.core.errors import ModelError, UnsupportedOpError
from mpqc.compiler.export import save_onnx, to_onnx
from mpqc.compiler.frontend import from_onnx, load_graph
from mpqc.compiler.passes import PassContext, PassManager
from mpqc.compiler.pipelines import build_pipeline
from mpqc.runtime.executor import run_batched

from tests.conftest import bench_path
from tests.graphs import ort_session, rel_err

MODELS = {  # model -> (data file, number of eval samples used)
    "digits_resnet": ("digits.npz", None),
    "digits_vgg": ("digits.npz", None),
    "digits_alexnet": ("digits.npz", None),
    "efficientnet_lite0": ("photos.npz", 16),
}


@functools.lru_cache(maxsize=None)
def eval_data(model: str) -> np.ndarray:
    data, n = MODELS[model]
    x = np.load(bench_path(data))["x_eval"]
    return np.ascontiguousarray(x[:n].astype(np.float32))


@functools.lru_cache(maxsize=None)
def reference(model: str) -> np.ndarray:
    """onnxruntime outputs of the original file on the eval split."""
    sess = ort_session(bench_path(f"{model}.onnx"))
    return sess.run(None, {sess.get_inputs()[0].name: eval_data(model)})[0]


@functools.lru_cache(maxsize=None)
def imported(model: str):
    return load_graph(bench_path(f"{model}.onnx"))


def ort_outputs(model_proto, x) -> np.ndarray:
    sess = ort_session(model_proto)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("model", list(MODELS))
def test_import_export_roundtrip_matches_original(model):
    g = imported(model)
    g.verify()
    assert [v.name for v in g.inputs] == ["input"] and g.inputs[0].shape[1:] == eval_data(model).shape[1:]
    exported = to_onnx(g)
    orig = onnx.load(str(bench_path(f"{model}.onnx")))
    assert [o.name for o in exported.graph.output] == [o.name for o in orig.graph.output]
    got = ort_outputs(exported, eval_data(model))
    ref = reference(model)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("model", list(MODELS))
def test_float_runtime_matches_onnxruntime(model):
    g = imported(model)
    got = run_batched(g, eval_data(model), batch_size=64)[0]
    assert rel_err(got, reference(model)) < 1e-4


def test_efficientnet_O0_canonical_form():
    g = load_graph(bench_path("efficientnet_lite0.onnx"))
    PassManager(build_pipeline(0), verify_each=True).run(g, PassContext())
    model = to_onnx(g)
    counts = Counter(n.op_type for n in model.graph.node)
    assert counts["Shape"] == 0 and counts["Gather"] == 0 and counts["Pad"] == 0
    assert counts["Conv"] == 49
    assert set(counts) <= {"Conv", "Clip", "Add", "Sub", "Div", "GlobalAveragePool", "Flatten", "Gemm"}
    # the batch stays free
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = eval_data("efficientnet_lite0")
    assert rel_err(ort_outputs(model, x), reference("efficientnet_lite0")) < 1e-5
    assert rel_err(ort_outputs(model, x[:1]), reference("efficientnet_lite0")[:1]) < 1e-5


@pytest.mark.parametrize("model", ["digits_resnet", "digits_alexnet"])
def test_digits_O0_matches_and_is_deterministic(model, tmp_path):
    outs = []
    for i in range(2):
        g = load_graph(bench_path(f"{model}.onnx"))
        PassManager(build_pipeline(0), verify_each=True).run(g, PassContext())
        save_onnx(g, tmp_path / f"{i}.onnx")
        outs.append((tmp_path / f"{i}.onnx").read_bytes())
    assert outs[0] == outs[1]
    assert rel_err(ort_outputs(outs[0], eval_data(model)), reference(model)) < 1e-5


# ----------------------------------------------------------------------------- opset upgrade
def opset9_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w", rng.normal(size=(4, 2, 3, 3)).astype(np.float32)),
        ("b", rng.normal(size=4).astype(np.float32)),
        ("gamma", rng.uniform(0.5, 2, 4).astype(np.float32)),
        ("beta", rng.normal(size=4).astype(np.float32)),
        ("mean", rng.normal(size=4).astype(np.float32)),
        ("var", rng.uniform(0.5, 2, 4).astype(np.float32)),
        ("shape", np.array([0, -1], np.int64)),
    ]]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn",
                         epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 100])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.checker.check_model(model)
    return model


def test_opset9_model_is_upgraded_and_runs(tmp_path):
    old = opset9_model()
    path = tmp_path / "old.onnx"
    onnx.save(old, path)
    x = np.random.default_rng(1).normal(size=(3, 2, 5, 5)).astype(np.float32)
    want = ort_outputs(old, x)
    g = load_graph(path)
    assert g.opset == 17 and g.name == "old"
    assert [n.op_type for n in g.nodes] == ["Conv", "BatchNormalization", "Relu", "Reshape"]
    exported = to_onnx(g)
    assert [(o.domain, o.version) for o in exported.opset_import] == [("", 17)]
    assert rel_err(ort_outputs(exported, x), want) < 1e-5
    assert rel_err(run_batched(g, x)[0], want) < 1e-5
    PassManager(build_pipeline(0), verify_each=True).run(g, PassContext())
    assert [n.op_type for n in g.nodes] == ["Conv", "Relu", "Flatten"]
    assert rel_err(ort_outputs(to_onnx(g), x), want) < 1e-5
    assert rel_err(run_batched(g, x)[0], want) < 1e-5


# ----------------------------------------------------------------------------- import errors
def test_unsupported_op_names_node_op_and_supported_list(tmp_path):
    k = numpy_helper.from_array(np.array([3], np.int64), "k")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("TopK", ["r", "k"], ["v", "i"], name="pick_top")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 3]),
                               helper.make_tensor_value_info("i", TensorProto.INT64, ["N", 3])], [k])
    path = tmp_path / "topk.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UnsupportedOpError) as e:
        load_graph(path)
    msg = str(e.value)
    assert msg.startswith("node 'pick_top' uses operator TopK, which mpqc does not support. Supported: ")
    assert "Conv" in msg and "Relu" in msg and "\n" not in msg
    g = load_graph(path, check_ops=False)  # the check can be skipped
    assert [n.op_type for n in g.nodes] == ["Relu", "TopK"]


def test_custom_domain_op_is_unsupported():
    node = helper.make_node("Relu", ["x"], ["y"], name="mine", domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedOpError, match="node 'mine' uses operator com.example::Relu"):
        from_onnx(model)


def test_unreadable_model_files(tmp_path):
    with pytest.raises(ModelError, match="model file '.*missing.onnx' does not exist"):
        load_graph(tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="is a directory"):
        load_graph(tmp_path)
    txt = tmp_path / "notes.onnx"
    txt.write_text("these are my notes, not a model\n")
    with pytest.raises(ModelError, match="notes.onnx"):
        load_graph(txt)
    real = bench_path("digits_resnet.onnx").read_bytes()
    half = tmp_path / "half.onnx"
    half.write_bytes(real[: len(real) // 2])
    with pytest.raises(ModelError, match="half.onnx"):
        load_graph(half)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="holds no graph nodes"):
        load_graph(empty)
