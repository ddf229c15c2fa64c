"""fold-pad-into-conv: a zero constant spatial Pad before Convs is merged into their pads."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.export import to_onnx

from tests.graphs import GraphBuilder, ops, randn, rel_err, run_float, run_ort, run_pass


def pad_conv(pads, mode="constant", value=None, conv_pads=(1, 0, 0, 1), second_reader="Conv", auto_pad=None):
    b = GraphBuilder()
    x = b.input("x", ["N", 2, 7, 7])
    ins = [x, b.const("pads", np.array(pads, np.int64))]
    if value is not None:
        ins.append(b.const("value", np.array(value, np.float32)))
    attrs = {"mode": mode}
    p = b.op("Pad", ins, name="pad", **attrs)
    cattrs = {"pads": list(conv_pads), "strides": [2, 2]}
    if auto_pad is not None:
        cattrs = {"auto_pad": auto_pad, "strides": [2, 2]}
    c1 = b.op("Conv", [p, b.const("w1", randn(3, 2, 3, 3, seed=1)), b.const("b1", randn(3, seed=2))],
              name="conv1", **cattrs)
    outs = [c1]
    if second_reader == "Conv":
        outs.append(b.op("Conv", [p, b.const("w2", randn(4, 2, 1, 1, seed=3))], name="conv2"))
    elif second_reader:
        outs.append(b.op(second_reader, [p], name="other", kernel_shape=[2, 2]))
    return b.output(*outs)


def test_folds_same_padding_into_every_conv():
    g = pad_conv([0, 0, 0, 1, 0, 0, 1, 2], value=0.0)
    before = to_onnx(g)
    assert run_pass(g, "fold-pad-into-conv").modified is True
    assert ops(g) == ["Conv", "Conv"]
    conv1, conv2 = g.nodes
    assert conv1.inputs[0] is g.inputs[0] and conv2.inputs[0] is g.inputs[0]
    assert conv1.attrs == {"pads": [1, 1, 1, 3], "strides": [2, 2]}  # [h0, w0, h1, w1] added up
    assert conv2.attrs == {"pads": [0, 1, 1, 2]}
    feed = {"x": randn(2, 2, 7, 7, seed=4)}
    want = run_ort(before, feed)
    for got_o, got_f, w in zip(run_ort(g, feed), run_float(g, feed), want):
        assert got_o.shape == w.shape
        assert rel_err(got_o, w) < 1e-6 and rel_err(got_f, w) < 1e-5


@pytest.mark.parametrize("case", ["reflect", "edge", "nonzero-value", "channel-pad", "negative", "maxpool-reader",
                                  "auto-pad"])
def test_not_folded(case):
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    kw = {}
    if case in ("reflect", "edge"):
        kw["mode"] = case
    elif case == "nonzero-value":
        kw["value"] = 1.5
    elif case == "channel-pad":
        pads = [0, 1, 1, 1, 0, 0, 1, 1]
    elif case == "negative":
        pads = [0, 0, -1, 1, 0, 0, 1, 1]
    elif case == "maxpool-reader":
        kw["second_reader"] = "MaxPool"
    elif case == "auto-pad":
        kw["auto_pad"] = "SAME_UPPER"
        kw["second_reader"] = None
    g = pad_conv(pads, **kw)
    before = g.summary()
    assert run_pass(g, "fold-pad-into-conv").modified is False
    assert g.summary() == before and ops(g)[0] == "Pad"
    if case in ("reflect", "nonzero-value", "maxpool-reader"):
        feed = {"x": randn(1, 2, 7, 7, seed=5)}
        for got, want in zip(run_float(g, feed), run_ort(g, feed)):
            assert rel_err(got, want) < 1e-5
