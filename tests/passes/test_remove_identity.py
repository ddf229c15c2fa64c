"""remove-identity: Identity and inference Dropout nodes disappear; graph interface names are kept."""
from __future__ import annotations

import numpy as np

from mpqc.compiler.export import to_onnx

from tests.graphs import GraphBuilder, ops, randn, run_float, run_ort, run_pass


def test_removes_identity_and_dropout_keeping_output_name():
    b = GraphBuilder()
    x = b.input("x", ["N", 4])
    i = b.op("Identity", [x], name="id_in")
    r = b.op("Relu", [i], name="relu")
    i2 = b.op("Identity", [r], name="id_mid")
    s = b.op("Sigmoid", [i2], name="sig")
    d = b.op("Dropout", [s], name="drop", n_out=2)[0]  # unused mask output
    d.name = "prob"
    g = b.output(d)
    before = to_onnx(g)
    assert run_pass(g, "remove-identity").modified is True
    assert ops(g) == ["Relu", "Sigmoid"]
    relu, sig = g.nodes
    assert relu.inputs[0] is x and sig.inputs[0] is relu.outputs[0]
    assert g.outputs == [sig.outputs[0]] and g.outputs[0].name == "prob"  # interface name kept
    feed = {"x": randn(3, 4)}
    want = run_ort(before, feed)[0]
    np.testing.assert_array_equal(run_ort(g, feed)[0], want)
    np.testing.assert_allclose(run_float(g, feed)[0], want, rtol=1e-6)


def test_keeps_dropout_with_used_mask_and_input_to_output_identity():
    b = GraphBuilder()
    x = b.input("x", ["N", 4])
    y = b.op("Identity", [x], name="passthrough")
    y.name = "same"
    d, mask = b.op("Dropout", [x], name="drop", n_out=2)
    m = b.op("Not", [mask], name="not")
    g = b.output(y, d, m)
    before = g.summary()
    assert run_pass(g, "remove-identity").modified is False
    assert g.summary() == before
    assert ops(g) == ["Identity", "Dropout", "Not"]


def test_no_identity_no_change():
    b = GraphBuilder()
    x = b.input("x", [2])
    g = b.output(b.op("Relu", [x], name="relu"))
    assert run_pass(g, "remove-identity").modified is False
    assert ops(g) == ["Relu"]
