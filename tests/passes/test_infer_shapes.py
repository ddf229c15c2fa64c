"""infer-shapes: every value's shape and dtype is recomputed by ONNX shape inference."""
from __future__ import annotations

import numpy as np

from mpqc.compiler.canonical import infer_shapes

from tests.graphs import GraphBuilder, randn, run_ort, run_pass


def small_cnn():
    b = GraphBuilder()
    x = b.input("x", ["N", 2, 5, 5])
    c = b.op("Conv", [x, b.const("w", randn(3, 2, 3, 3))], name="conv", pads=[1, 1, 1, 1], strides=[2, 2])
    p = b.op("MaxPool", [c], name="pool", kernel_shape=[2, 2])
    f = b.op("Flatten", [p], name="flat", axis=1)
    s = b.op("Shape", [f], name="shape")
    y = b.op("Gemm", [f, b.const("wf", randn(12, 7))], name="fc")
    return b.output(y, s), c, p, f, s, y


def test_fills_shapes_and_dtypes_keeping_the_batch_symbol():
    g, c, p, f, s, y = small_cnn()
    assert c.shape is None and y.shape is None
    res = run_pass(g, "infer-shapes")
    assert res.modified is False  # annotations only: analyses stay valid
    assert c.shape == ("N", 3, 3, 3) and p.shape == ("N", 3, 2, 2) and f.shape == ("N", 12)
    assert y.shape == ("N", 7) and s.shape == (2,)
    assert c.dtype == np.float32 and s.dtype == np.int64
    feed = {"x": randn(4, 2, 5, 5, seed=2)}
    out, shp = run_ort(g, feed)
    assert out.shape == (4, 7) and shp.tolist() == [4, 12]


def test_corrects_stale_shapes_including_graph_outputs():
    g, c, p, f, s, y = small_cnn()
    infer_shapes(g)
    c.shape, y.shape, y.dtype = ("N", 9, 9, 9), ("N", 1), np.dtype(np.int8)
    assert infer_shapes(g) is True
    assert c.shape == ("N", 3, 3, 3) and y.shape == ("N", 7) and y.dtype == np.float32


def test_nothing_to_change():
    g, *_ = small_cnn()
    infer_shapes(g)
    before = g.summary()
    assert infer_shapes(g) is False
    assert run_pass(g, "infer-shapes").modified is False
    assert g.summary() == before
