"""fold-batchnorm: an inference BatchNormalization after a Conv/Gemm is folded into its weights and bias."""
from __future__ import annotations

import numpy as np

from mpqc.compiler.export import to_onnx

from tests.graphs import GraphBuilder, ops, randn, rel_err, run_float, run_ort, run_pass


def bn_params(b: GraphBuilder, c: int, seed: int = 1, prefix: str = ""):
    rng = np.random.default_rng(seed)
    return [b.const(prefix + "gamma", rng.uniform(0.5, 2, c).astype(np.float32)),
            b.const(prefix + "beta", rng.normal(size=c).astype(np.float32)),
            b.const(prefix + "mean", rng.normal(size=c).astype(np.float32)),
            b.const(prefix + "var", rng.uniform(0.1, 3, c).astype(np.float32))]


def conv_bn(with_bias: bool = True, extra_reader: bool = False, group: int = 1):
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 6, 6])
    ins = [x, b.const("w", randn(6, 4 // group, 3, 3, seed=2))]
    if with_bias:
        ins.append(b.const("b", randn(6, seed=3)))
    c = b.op("Conv", ins, name="conv", pads=[1, 1, 1, 1], group=group)
    y = b.op("BatchNormalization", [c] + bn_params(b, 6), name="bn", epsilon=1e-3)
    r = b.op("Relu", [y], name="relu")
    outs = [r]
    if extra_reader:
        outs.append(b.op("Sigmoid", [c], name="side"))
    return b.output(*outs), c


def test_folds_into_conv_with_bias():
    g, c = conv_bn()
    before = to_onnx(g)
    w0 = g.nodes[0].weight.const
    assert run_pass(g, "fold-batchnorm").modified is True
    assert ops(g) == ["Conv", "Relu"]
    conv, relu = g.nodes
    assert relu.inputs[0] is c and c.producer is conv
    assert conv.weight.shape == (6, 4, 3, 3) and conv.bias.shape == (6,)
    assert not np.array_equal(conv.weight.const, w0) and w0.flags.writeable is False  # new array
    assert conv.attrs == {"pads": [1, 1, 1, 1], "group": 1}
    feed = {"x": randn(3, 4, 6, 6, seed=4)}
    want = run_ort(before, feed)[0]
    assert rel_err(run_ort(g, feed)[0], want) < 1e-5
    assert rel_err(run_float(g, feed)[0], want) < 1e-5


def test_folds_into_conv_without_bias_and_grouped():
    g, c = conv_bn(with_bias=False, group=2)
    before = to_onnx(g)
    assert run_pass(g, "fold-batchnorm").modified is True
    assert ops(g) == ["Conv", "Relu"] and len(g.nodes[0].inputs) == 3 and g.nodes[0].bias is not None
    feed = {"x": randn(2, 4, 6, 6, seed=5)}
    assert rel_err(run_ort(g, feed)[0], run_ort(before, feed)[0]) < 1e-5


def test_folds_into_gemm_and_keeps_the_output_name():
    b = GraphBuilder()
    x = b.input("x", ["N", 5])
    g_ = b.op("Gemm", [x, b.const("w", randn(3, 5, seed=6)), b.const("c", randn(3, seed=7))], name="fc",
              transB=1, alpha=0.5, beta=2.0)
    y = b.op("BatchNormalization", [g_] + bn_params(b, 3), name="bn")
    y.name = "logits"
    g = b.output(y)
    before = to_onnx(g)
    assert run_pass(g, "fold-batchnorm").modified is True
    assert ops(g) == ["Gemm"]
    (gemm,) = g.nodes
    assert gemm.attrs == {"transB": 1, "alpha": 1.0, "beta": 1.0}
    assert g.outputs == [gemm.outputs[0]] and g.outputs[0].name == "logits"
    feed = {"x": randn(4, 5, seed=8)}
    assert rel_err(run_ort(g, feed)[0], run_ort(before, feed)[0]) < 1e-5


def test_conv_output_with_two_readers_is_not_folded():
    g, c = conv_bn(extra_reader=True)
    before = g.summary()
    assert run_pass(g, "fold-batchnorm").modified is False
    assert g.summary() == before
    assert ops(g) == ["Conv", "BatchNormalization", "Relu", "Sigmoid"]


def test_bn_after_a_non_layer_or_with_variable_params_is_not_folded():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4, 4])
    s = b.input("scale", [3])
    r = b.op("Relu", [x], name="relu")
    y1 = b.op("BatchNormalization", [r] + bn_params(b, 3), name="bn_relu")
    c = b.op("Conv", [x, b.const("w", randn(3, 3, 1, 1))], name="conv")
    p = bn_params(b, 3, seed=2, prefix="v_")
    y2 = b.op("BatchNormalization", [c, s] + p[1:], name="bn_var")
    g = b.output(y1, y2)
    assert run_pass(g, "fold-batchnorm").modified is False
    assert ops(g) == ["Relu", "BatchNormalization", "Conv", "BatchNormalization"]
    feed = {"x": randn(2, 3, 4, 4), "scale": np.ones(3, np.float32)}
    for got, want in zip(run_float(g, feed), run_ort(g, feed)):
        assert rel_err(got, want) < 1e-5


def test_training_mode_bn_is_not_folded():
    g, c = conv_bn()
    g.node_by_name("bn").attrs["training_mode"] = 1
    before = g.summary()
    assert run_pass(g, "fold-batchnorm").modified is False
    assert g.summary() == before
