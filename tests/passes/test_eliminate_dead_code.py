"""eliminate-dead-code: nodes none of whose outputs reach a graph output are removed."""
from __future__ import annotations

import numpy as np

from mpqc.compiler.export import to_onnx

from tests.graphs import GraphBuilder, ops, randn, run_float, run_ort, run_pass


def test_removes_dead_chains_only():
    b = GraphBuilder()
    x = b.input("x", ["N", 6])
    r = b.op("Relu", [x], name="relu")
    halves = b.op("Split", [r, b.const("sizes", np.array([3, 3], np.int64))], name="split", n_out=2, axis=1)
    y = b.op("Neg", [halves[0]], name="neg")  # only the first half is used
    s = b.op("Sigmoid", [x], name="dead_sig")
    b.op("Tanh", [s], name="dead_tanh")
    b.op("Abs", [r], name="dead_abs")
    g = b.output(y)
    before = to_onnx(g)
    assert run_pass(g, "eliminate-dead-code").modified is True
    assert ops(g) == ["Relu", "Split", "Neg"]
    assert [n for n, _ in r.uses] == [g.nodes[1]] and s.uses == []
    feed = {"x": randn(2, 6)}
    want = run_ort(before, feed)[0]
    np.testing.assert_array_equal(run_ort(g, feed)[0], want)
    np.testing.assert_array_equal(run_float(g, feed)[0], want)


def test_live_graph_is_unchanged():
    b = GraphBuilder()
    x = b.input("x", ["N", 2])
    r = b.op("Relu", [x], name="relu")
    a = b.op("Abs", [x], name="abs")  # second graph output: live
    g = b.output(r, a)
    before = g.summary()
    assert run_pass(g, "eliminate-dead-code").modified is False
    assert g.summary() == before
