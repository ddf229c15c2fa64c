"""Float kernels vs onnxruntime on tiny random one-node models, for cases the ONNX node
conformance suite does not cover (depthwise with a channel multiplier, asymmetric pads,
ceil-mode pooling windows that overhang, count_include_pad, ConvTranspose geometry...),
and the refusals that keep the runtime from returning wrong numbers."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpqc.core.errors import UnsupportedOpError
from mpqc.compiler.frontend import from_onnx
from mpqc.runtime.executor import Executor

RTOL = 1e-4
ATOL = 1e-5


def one_node_model(op: str, x_shape, consts: dict | None = None, opset: int = 17, n_out: int = 1,
                   out_types=(TensorProto.FLOAT, TensorProto.BOOL), **attrs) -> onnx.ModelProto:
    """``op(x, *consts)`` with ``x`` a float input of ``x_shape``; consts become initializers."""
    consts = consts or {}
    inputs = ["x"] + list(consts)
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, inputs, outs, **attrs)
    graph = helper.make_graph(
        [node], op.lower(), [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, out_types)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def run_both(model: onnx.ModelProto, x: np.ndarray):
    """(mpqc outputs, onnxruntime outputs)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})
    g = from_onnx(model, fold=False)
    res = Executor(g).run({"x": x})
    return [res[v] for v in g.outputs], ref


def check(model: onnx.ModelProto, x: np.ndarray):
    got, ref = run_both(model, x)
    for a, b in zip(got, ref):
        assert a.shape == b.shape, f"shape {a.shape} vs onnxruntime {b.shape}"
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * max(1.0, float(np.max(np.abs(b)))))
    return got


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- Conv
@pytest.mark.parametrize("mult", [1, 2, 3])
@pytest.mark.parametrize("strides,pads,dil", [
    ([1, 1], [1, 1, 1, 1], [1, 1]),
    ([2, 2], [0, 1, 2, 0], [1, 1]),
    ([2, 1], [1, 0, 0, 1], [2, 2]),
])
def test_depthwise_conv_channel_multiplier(mult, strides, pads, dil):
    C = 4
    w = rand(C * mult, 1, 3, 3, seed=1)
    b = rand(C * mult, seed=2)
    model = one_node_model("Conv", [2, C, 9, 8], {"w": w, "b": b}, group=C, strides=strides, pads=pads,
                           dilations=dil)
    check(model, rand(2, C, 9, 8))


@pytest.mark.parametrize("group", [2, 3])
def test_grouped_conv(group):
    C, M = 2 * group, 4 * group
    model = one_node_model("Conv", [1, C, 7, 7], {"w": rand(M, C // group, 3, 2, seed=1)}, group=group,
                           strides=[2, 1], pads=[1, 0, 0, 1])
    check(model, rand(1, C, 7, 7))


@pytest.mark.parametrize("pads", [[0, 1, 2, 0], [2, 0, 0, 3], [1, 2, 3, 0]])
@pytest.mark.parametrize("strides", [[1, 1], [2, 3]])
def test_conv_asymmetric_pads(pads, strides):
    model = one_node_model("Conv", [1, 3, 8, 9], {"w": rand(5, 3, 3, 2, seed=1), "b": rand(5, seed=2)},
                           pads=pads, strides=strides)
    check(model, rand(1, 3, 8, 9))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("k,s", [(2, 2), (4, 3), (3, 2)])
def test_conv_auto_pad_asymmetric(auto_pad, k, s):
    model = one_node_model("Conv", [1, 2, 7, 8], {"w": rand(3, 2, k, k, seed=1)}, auto_pad=auto_pad,
                           strides=[s, s])
    check(model, rand(1, 2, 7, 8))


@pytest.mark.parametrize("shape,k", [([2, 3, 11], [3]), ([1, 2, 5, 6, 7], [3, 2, 3])])
def test_conv_1d_3d(shape, k):
    nd = len(k)
    model = one_node_model("Conv", shape, {"w": rand(4, shape[1], *k, seed=1)}, pads=[1] * nd + [0] * nd,
                           strides=[2] * nd, dilations=[1] * (nd - 1) + [2])
    check(model, rand(*shape))


# --------------------------------------------------------------------------- ConvTranspose
@pytest.mark.parametrize("attrs", [
    dict(strides=[2, 2]),
    dict(strides=[2, 3], pads=[1, 0, 0, 2], output_padding=[1, 2]),
    dict(strides=[3, 2], dilations=[2, 1]),
    dict(strides=[2, 2], group=2),
    dict(strides=[2, 2], output_shape=[10, 9]),
    dict(strides=[2, 2], output_shape=[7, 8]),
    dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(strides=[2, 2], auto_pad="SAME_LOWER"),
    dict(strides=[1, 1], auto_pad="SAME_UPPER", pads=None),
], ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items() if v is not None))
def test_conv_transpose(attrs):
    attrs = {k: v for k, v in attrs.items() if v is not None}
    group = attrs.get("group", 1)
    model = one_node_model("ConvTranspose", [2, 4, 4, 4], {"w": rand(4, 6 // group * 1, 3, 3, seed=1),
                                                           "b": rand(6 // group * group, seed=2)}, **attrs)
    check(model, rand(2, 4, 4, 4))


def test_conv_transpose_same_with_kernel_smaller_than_stride_is_refused():
    # the spec asks for in*stride outputs, onnxruntime returns fewer: refuse rather than pick one
    model = one_node_model("ConvTranspose", [1, 2, 4], {"w": rand(2, 3, 2, seed=1)}, strides=[3],
                           auto_pad="SAME_UPPER")
    g = from_onnx(model, fold=False)
    with pytest.raises(UnsupportedOpError, match="smaller than the stride"):
        Executor(g).run({"x": rand(1, 2, 4)})


# --------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("shape,k,s,pads", [
    ([1, 2, 7, 7], [3, 3], [2, 2], [0, 0, 0, 0]),
    ([1, 2, 8, 6], [3, 2], [2, 2], [1, 1, 1, 1]),
    ([1, 1, 2, 2], [3, 3], [3, 3], [1, 1, 1, 1]),  # last window starts in the padding
    ([1, 2, 10, 9], [2, 3], [3, 2], [0, 1, 1, 0]),
    ([1, 2, 13, 13], [3, 3], [2, 2], [0, 0, 0, 0]),  # the SqueezeNet/GoogLeNet case
])
@pytest.mark.parametrize("ceil", [0, 1])
def test_pool_ceil_mode(op, shape, k, s, pads, ceil):
    model = one_node_model(op, shape, kernel_shape=k, strides=s, pads=pads, ceil_mode=ceil)
    check(model, rand(*shape))


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("pads,ceil", [([1, 1, 1, 1], 0), ([0, 2, 1, 0], 0), ([1, 1, 1, 1], 1),
                                       ([2, 0, 0, 2], 1)])
def test_average_pool_count_include_pad(count_include_pad, pads, ceil):
    shape = [2, 3, 7, 6]
    model = one_node_model("AveragePool", shape, kernel_shape=[3, 3], strides=[2, 2], pads=pads,
                           ceil_mode=ceil, count_include_pad=count_include_pad)
    check(model, rand(*shape))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pool_auto_pad(auto_pad, op):
    model = one_node_model(op, [1, 2, 7, 8], kernel_shape=[2, 3], strides=[2, 2], auto_pad=auto_pad)
    check(model, rand(1, 2, 7, 8))


def test_maxpool_dilations_ceil():
    model = one_node_model("MaxPool", [1, 2, 9, 9], kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2],
                           ceil_mode=1, pads=[1, 0, 0, 1])
    check(model, rand(1, 2, 9, 9))


def test_maxpool_indices_refused():
    model = one_node_model("MaxPool", [1, 1, 4, 4], n_out=2, kernel_shape=[2, 2])
    with pytest.raises(UnsupportedOpError, match="Indices"):
        from_onnx(model, fold=False)


# --------------------------------------------------------------------------- others
def lrn_spec(x, size, alpha, beta, bias):
    """LRN transcribed from the ONNX spec: channels max(0, c - floor((size-1)/2)) ..
    min(C-1, c + ceil((size-1)/2)). (onnx.reference's LRN loops over the batch axis
    instead of the channels, so it cannot serve here.)"""
    x64 = x.astype(np.float64)
    C = x.shape[1]
    sq = np.zeros_like(x64)
    for c in range(C):
        lo = max(0, c - (size - 1) // 2)
        hi = min(C - 1, c + -(-(size - 1) // 2))
        sq[:, c] = np.sum(x64[:, lo:hi + 1] ** 2, axis=1)
    return (x64 / (bias + alpha / size * sq) ** beta).astype(np.float32)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 9])
def test_lrn(size):
    x = 3 * rand(2, 7, 3, 4)
    attrs = dict(size=size, alpha=1e-2, beta=0.75, bias=2.0)
    model = one_node_model("LRN", [2, 7, 3, 4], **attrs)
    g = from_onnx(model, fold=False)
    got = Executor(g).run({"x": x})[g.outputs[0]]
    np.testing.assert_allclose(got, lrn_spec(x, **attrs), rtol=RTOL, atol=ATOL)
    if size % 2:  # onnxruntime takes odd sizes only
        check(model, x)


@pytest.mark.parametrize("ta,tb,alpha,beta,c_shape", [
    (0, 0, 1.0, 1.0, (5,)), (1, 0, 0.5, 2.0, (3, 1)), (0, 1, 1.0, 0.0, (3, 5)), (1, 1, 2.0, 0.5, ()),
])
def test_gemm(ta, tb, alpha, beta, c_shape):
    a_shape = (4, 3) if ta else (3, 4)
    b = rand(*((5, 4) if tb else (4, 5)), seed=1)
    model = one_node_model("Gemm", a_shape, {"b": b, "c": rand(*c_shape, seed=2) if c_shape else
                                             np.float32(0.7)}, transA=ta, transB=tb, alpha=alpha, beta=beta)
    check(model, rand(*a_shape))


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_axes(op, axis):
    model = one_node_model(op, [2, 3, 4, 5], axis=axis)
    check(model, 5 * rand(2, 3, 4, 5))


def test_batchnorm_inference():
    C = 5
    consts = {"s": rand(C, seed=1), "b": rand(C, seed=2), "m": rand(C, seed=3),
              "v": np.abs(rand(C, seed=4)) + 0.1}
    model = one_node_model("BatchNormalization", [2, C, 3, 3], consts, epsilon=1e-3)
    check(model, rand(2, C, 3, 3))


def test_batchnorm_training_mode_refused():
    C = 3
    consts = {"s": rand(C), "b": rand(C), "m": rand(C), "v": np.ones(C, np.float32)}
    model = one_node_model("BatchNormalization", [2, C, 3, 3], consts, training_mode=1)
    with pytest.raises(UnsupportedOpError, match="training_mode"):
        from_onnx(model, fold=False)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_modes_with_negative_pads(mode):
    pads = np.array([0, 1, 2, -1, 0, -1, 1, 2], np.int64)
    model = one_node_model("Pad", [2, 3, 5, 6], {"pads": pads, "v": np.float32(1.5)}, mode=mode)
    check(model, rand(2, 3, 5, 6))


@pytest.mark.parametrize("op,attrs", [("HardSigmoid", dict(alpha=0.3, beta=0.4)), ("HardSwish", {}),
                                      ("LeakyRelu", dict(alpha=0.1)), ("Sigmoid", {}), ("Relu", {})])
def test_activations(op, attrs):
    model = one_node_model(op, [3, 4, 5], **attrs)
    check(model, 4 * rand(3, 4, 5))


def test_clip_min_only():
    model = one_node_model("Clip", [3, 4], {"lo": np.float32(-0.25)})
    check(model, rand(3, 4))


def test_dropout_inference_mask():
    model = one_node_model("Dropout", [3, 4], {"r": np.float32(0.3)}, n_out=2, opset=13)
    got = check(model, rand(3, 4))
    assert got[1].dtype == np.bool_ and got[1].all()


def test_dropout_training_mode_refused():
    model = one_node_model("Dropout", [3, 4], {"r": np.float32(0.3), "t": np.array(True)}, opset=13)
    with pytest.raises(UnsupportedOpError, match="training_mode"):
        from_onnx(model, fold=False)


def test_integer_div_truncates_toward_zero():
    a = np.array([7, -7, 7, -7, 0, 9223372036854775807], np.int64)
    b = np.array([2, 2, -2, -2, 3, 3], np.int64)
    node = helper.make_node("Div", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "div", [helper.make_tensor_value_info("a", TensorProto.INT64, [6])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [6])],
                              initializer=[numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = from_onnx(model, fold=False)
    got = Executor(g).run({"a": a})[g.outputs[0]]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, [3, -3, -3, 3, 0, 3074457345618258602])


def test_shape_start_end_folded_correctly():
    """Graph surgeon folds Shape ignoring start/end; the frontend rewrites it as Shape + Slice."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1, end=-1),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "shape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for fold in (False, True):
        g = from_onnx(model, fold=fold)
        got = Executor(g).run({"x": rand(2, 3, 4, 5)})[g.outputs[0]]
        np.testing.assert_array_equal(got, [3, 4])


def test_unconvertible_old_softmax_is_refused():
    """An opset-9 model the version converter rejects is not run with opset-13 Softmax semantics."""
    w = numpy_helper.from_array(np.ones((1,), np.float32), "w")
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3  # IR 3 wants initializers listed as inputs: the converter fails on this file
    with pytest.raises(UnsupportedOpError, match="Softmax .*2-D coercion"):
        from_onnx(model, fold=False)


def test_unsupported_dtype_refused():
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOpError, match="BFLOAT16"):
        from_onnx(model, fold=False)
