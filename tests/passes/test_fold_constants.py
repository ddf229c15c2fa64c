"""fold-constants: constant subgraphs become constants; x.view(x.size(0), -1) becomes Reshape(x, [0, -1])."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.export import to_onnx

from tests.graphs import GraphBuilder, ops, randn, rel_err, run_float, run_ort, run_pass


def test_folds_constant_arithmetic_and_constant_nodes():
    b = GraphBuilder()
    x = b.input("x", ["N", 3])
    c = b.op("Constant", [], name="k", value=np.array([1.0, 2.0, 3.0], np.float32))
    s = b.op("Add", [c, b.const("one", np.ones(3, np.float32))], name="add")
    sq = b.op("Sqrt", [s], name="sqrt")
    y = b.op("Mul", [x, sq], name="mul")
    g = b.output(y)
    feed = {"x": randn(4, 3)}
    want = run_ort(g, feed)[0]
    assert run_pass(g, "fold-constants").modified is True
    assert ops(g) == ["Mul"]
    (mul,) = g.nodes
    assert mul.inputs[0] is x and mul.inputs[1].is_const
    np.testing.assert_allclose(mul.inputs[1].const, np.sqrt([2.0, 3.0, 4.0]).astype(np.float32), rtol=1e-7)
    assert mul.inputs[1].dtype == np.float32
    assert rel_err(run_ort(g, feed)[0], want) < 1e-6
    assert rel_err(run_float(g, feed)[0], want) < 1e-6


def view_graph():
    """r = Relu(x); y = r.view(r.size(0), -1): Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    b = GraphBuilder()
    x = b.input("x", ["N", 2, 3, 3])
    r = b.op("Relu", [x], name="relu")
    shp = b.op("Shape", [r], name="shape")
    n = b.op("Gather", [shp, b.const("zero", np.array(0, np.int64))], name="gather", axis=0)
    n1 = b.op("Unsqueeze", [n, b.const("axes", np.array([0], np.int64))], name="unsqueeze")
    tgt = b.op("Concat", [n1, b.const("minus1", np.array([-1], np.int64))], name="concat", axis=0)
    y = b.op("Reshape", [r, tgt], name="reshape")
    y.name = "y"
    return b.output(y), x, r


def test_folds_symbolic_view_keeping_batch_free():
    g, x, r = view_graph()
    before = to_onnx(g)
    assert run_pass(g, "fold-constants").modified is True
    assert ops(g) == ["Relu", "Reshape"]
    reshape = g.nodes[1]
    assert reshape.inputs[0] is r and reshape.inputs[1].is_const
    assert reshape.inputs[1].const.tolist() == [0, -1] and reshape.inputs[1].dtype == np.int64
    assert g.outputs[0].name == "y"
    for batch in (1, 5):
        feed = {"x": randn(batch, 2, 3, 3, seed=batch)}
        want = np.maximum(feed["x"], 0).reshape(batch, -1)
        np.testing.assert_array_equal(run_ort(before, feed)[0], want)
        np.testing.assert_array_equal(run_ort(g, feed)[0], want)
        np.testing.assert_array_equal(run_float(g, feed)[0], want)


def test_static_shape_arithmetic_folds_completely():
    b = GraphBuilder()
    x = b.input("x", [2, 6])
    shp = b.op("Shape", [x], name="shape")
    last = b.op("Slice", [shp, b.const("s", np.array([1], np.int64)), b.const("e", np.array([2], np.int64))],
                name="slice")
    tgt = b.op("Concat", [b.const("three", np.array([4], np.int64)), last], name="concat", axis=0)
    half = b.op("Div", [tgt, b.const("two", np.array([1, 2], np.int64))], name="div")
    y = b.op("Reshape", [x, half], name="reshape")
    g = b.output(y)
    assert run_pass(g, "fold-constants").modified is True
    assert ops(g) == ["Reshape"] and g.nodes[0].inputs[1].const.tolist() == [4, 3]
    feed = {"x": randn(2, 6)}
    np.testing.assert_array_equal(run_ort(g, feed)[0], feed["x"].reshape(4, 3))


def test_cast_of_shape_to_float_keeps_its_type():
    # float(x.shape[-1]) must stay a float tensor when the shape vector has a symbol in it
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4])
    s = b.op("Shape", [x], name="shape")
    f = b.op("Cast", [s], name="cast", to=1)
    d = b.op("Gather", [f, b.const("i", np.array(2, np.int64))], name="gather", axis=0)
    y = b.op("Mul", [x, d], name="mul")
    g = b.output(y)
    run_pass(g, "fold-constants")
    feed = {"x": randn(2, 3, 4)}
    np.testing.assert_allclose(run_ort(g, feed)[0], feed["x"] * 4, rtol=1e-6)


def test_unfoldable_graph_is_not_modified():
    b = GraphBuilder()
    x = b.input("x", ["N", 3])
    y = b.op("Mul", [x, b.const("w", np.full(3, 2, np.float32))], name="mul")
    q = b.op("QuantizeLinear", [y, b.const("sc", np.float32(0.5)), b.const("zp", np.int8(0))], name="q")
    g = b.output(y, q)
    assert run_pass(g, "fold-constants").modified is False
    assert ops(g) == ["Mul", "QuantizeLinear"]


def test_reshape_on_another_tensors_dim_is_not_folded():
    # x.view(x.size(1), -1) with a dynamic channel count: dim 1 of x lands at position 0, not "copy dim 0"
    b = GraphBuilder()
    x = b.input("x", ["N", "C", 4])
    shp = b.op("Shape", [x], name="shape")
    c = b.op("Gather", [shp, b.const("one", np.array([1], np.int64))], name="gather", axis=0)
    tgt = b.op("Concat", [c, b.const("minus1", np.array([-1], np.int64))], name="concat", axis=0)
    y = b.op("Reshape", [x, tgt], name="reshape")
    g = b.output(y)
    assert run_pass(g, "fold-constants").modified is False
    assert ops(g) == ["Shape", "Gather", "Concat", "Reshape"]
    feed = {"x": randn(2, 3, 4)}
    np.testing.assert_array_equal(run_ort(g, feed)[0], feed["x"].reshape(3, -1))


@pytest.mark.parametrize("other", ["M", None])
def test_batch_of_another_input(other):
    # Reshape(x, [y.size(0), -1]): only "copy dim 0" when the two batch dims may be the same
    b = GraphBuilder()
    x = b.input("x", ["N", 6])
    z = b.input("z", [other, 2])
    shp = b.op("Shape", [z], name="shape")
    n = b.op("Gather", [shp, b.const("zero", np.array([0], np.int64))], name="gather", axis=0)
    tgt = b.op("Concat", [n, b.const("minus1", np.array([-1], np.int64))], name="concat", axis=0)
    y = b.op("Reshape", [x, tgt], name="reshape")
    g = b.output(y)
    res = run_pass(g, "fold-constants")
    if other == "M":  # two different symbols: may differ at run time
        assert res.modified is False and ops(g) == ["Shape", "Gather", "Concat", "Reshape"]
        feed = {"x": randn(2, 6), "z": randn(3, 2)}
        np.testing.assert_array_equal(run_ort(g, feed)[0], feed["x"].reshape(3, 4))
    else:  # unknown: assumed to be the batch (the exporter's x.view(x.size(0), -1) idiom)
        assert res.modified is True and ops(g) == ["Reshape"]
        assert g.nodes[0].inputs[1].const.tolist() == [0, -1]
