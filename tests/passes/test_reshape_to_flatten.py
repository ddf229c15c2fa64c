"""reshape-to-flatten: Reshape(x, [0, -1]) and equivalents become Flatten(axis=1)."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.export import to_onnx

from tests.graphs import GraphBuilder, ops, randn, rel_err, run_float, run_ort, run_pass


def reshape_fc(target, batch="N", allowzero=None):
    b = GraphBuilder()
    x = b.input("x", [batch, 2, 3, 3])
    r = b.op("Relu", [x], name="relu")
    r.shape = (batch, 2, 3, 3)
    attrs = {} if allowzero is None else {"allowzero": allowzero}
    f = b.op("Reshape", [r, b.const("shape", np.array(target, np.int64))], name="flat", **attrs)
    y = b.op("Gemm", [f, b.const("w", randn(4, 18, seed=1))], name="fc", transB=1)
    return b.output(y), r, f


@pytest.mark.parametrize("target, batch", [([0, -1], "N"), ([-1, 18], "N"), ([0, 18], "N"), ([2, -1], 2)])
def test_becomes_flatten(target, batch):
    g, r, f = reshape_fc(target, batch)
    before = to_onnx(g)
    assert run_pass(g, "reshape-to-flatten").modified is True
    assert ops(g) == ["Relu", "Flatten", "Gemm"]
    flat = g.nodes[1]
    assert flat.name == "flat" and flat.attrs == {"axis": 1}
    assert flat.inputs == [r] and flat.outputs == [f] and f.producer is flat
    assert g.nodes[2].inputs[0] is f
    for n in ((1, 2) if batch == "N" else (2,)):
        feed = {"x": randn(n, 2, 3, 3, seed=n)}
        want = run_ort(before, feed)[0]
        assert rel_err(run_ort(g, feed)[0], want) < 1e-6
        assert rel_err(run_float(g, feed)[0], want) < 1e-5


@pytest.mark.parametrize("target, allowzero", [([0, 2, -1], None), ([-1, 9], None), ([0, -1], 1), ([2, -1], None)])
def test_other_reshapes_stay(target, allowzero):
    g, r, f = reshape_fc(target, "N", allowzero)
    if target == [-1, 9]:
        g.remove_node(g.nodes[2], force=True)  # [2N, 9] no longer fits the Gemm: read the reshape directly
        g.outputs = [f]
    before = g.summary()
    assert run_pass(g, "reshape-to-flatten").modified is False
    assert g.summary() == before and "Reshape" in ops(g)
