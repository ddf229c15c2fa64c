"""AdaRound (compiler/adaround.py): the rectified sigmoid and its inverse, the crops against the full
convolution, the learned rounding of a tiny layer against brute force over every up/down choice,
round to nearest kept when it is better, and determinism."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from mpqc.compiler.adaround import (AdaRoundOptions, _Crops, adaround_layer, fused_activation, initial_v,
                                    layer_graph, rectified_sigmoid)
from mpqc.core.errors import OptionError
from mpqc.core.qformat import QFormat, fake_quant
from mpqc.runtime.autograd import GradEngine
from mpqc.runtime.executor import float_node_fn

from tests.graphs import GraphBuilder, randn


def test_rectified_sigmoid_inverts_and_saturates():
    f = np.linspace(0.001, 0.999, 41)
    h, dh = rectified_sigmoid(initial_v(f))
    np.testing.assert_allclose(h, f, atol=1e-9)
    assert np.all(dh > 0)
    h, dh = rectified_sigmoid(np.array([-30.0, 30.0]))
    np.testing.assert_array_equal(h, [0.0, 1.0])
    np.testing.assert_array_equal(dh, [0.0, 0.0])  # flat where clipped: the gradient stops there


@pytest.mark.parametrize("attrs", [
    dict(pads=[1, 1, 1, 1]),
    dict(pads=[0, 1, 2, 0], strides=[2, 1]),
    dict(pads=[1, 1, 1, 1], strides=[2, 2], group=4),
    dict(dilations=[2, 1], pads=[2, 0, 1, 1]),
])
def test_crops_read_exactly_the_window_of_their_outputs(attrs):
    b = GraphBuilder("c")
    x = b.input("x", ["N", 4, 11, 9])
    w = b.const("w", randn(6 if attrs.get("group", 1) == 1 else 4, 4 // attrs.get("group", 1), 3, 3, seed=1))
    g = b.output(b.op("Conv", [x, w, b.const("b", randn(w.const.shape[0], seed=2))], name="conv", **attrs))
    node = g.layers()[0]
    xs = randn(3, 4, 11, 9, seed=3)
    y = float_node_fn(node, [xs, node.weight.const, node.bias.const])[0]
    crops = _Crops(node, xs, y, crop=3)
    lg, _, _ = layer_graph(node, None, (None, 4, None, None))
    eng = GradEngine(lg)
    xb, yb = crops.sample(np.random.default_rng(0), 5)
    assert yb.shape[2:] == (min(3, y.shape[2]), min(3, y.shape[3]))
    np.testing.assert_allclose(eng.forward(xb, record=False).logits, yb, rtol=1e-5, atol=1e-5)
    full = np.concatenate([eng.forward(a, record=False).logits for a, _ in crops.full(chunk=2)])
    np.testing.assert_allclose(full, y, rtol=1e-5, atol=1e-5)


def _gemm(w, b=None, act=None):
    gb = GraphBuilder("g")
    x = gb.input("x", ["N", w.shape[1]])
    ins = [x, gb.const("w", w)] + ([gb.const("b", b)] if b is not None else [])
    y = gb.op("Gemm", ins, name="fc", transB=1)
    if act:
        y = gb.op(act, [y], name="act")
    g = gb.output(y)
    return g, g.layers()[0]


def _err(node, act, wq, b, x, y):
    out = float_node_fn(node, [x, wq] + ([b] if b is not None else []))[0]
    if act is not None:
        out = float_node_fn(act, [out])[0]
    return float(np.sum((out - y) ** 2))


def test_learned_rounding_reaches_the_brute_force_optimum_of_a_small_layer():
    """6 weights with correlated inputs: every one of the 2^6 up/down choices tried; AdaRound (no bias
    training, so the problem is exactly the choice of roundings) finds the best or one within 2%, and
    beats round to nearest."""
    w = randn(1, 6, seed=4, scale=0.6)
    g, node = _gemm(w)
    base = randn(200, 2, seed=5)
    x = (base @ randn(2, 6, seed=6) + 0.05 * randn(200, 6, seed=7)).astype(np.float32)
    y = float_node_fn(node, [x, w])[0]
    fmt = QFormat(4, 2)
    s = 0.25
    lo = np.floor(w / s)
    errs = {bits: _err(node, None, ((lo + np.array(bits)) * s).astype(np.float32), None, x, y)
            for bits in itertools.product((0, 1), repeat=6)}
    best = min(errs.values())
    near = _err(node, None, fake_quant(w, fmt), None, x, y)
    r = adaround_layer(node, x, y, None, fmt, AdaRoundOptions(iters=600, batch=64, bias=False))
    np.testing.assert_array_equal(fake_quant(r.weight, fmt), r.weight)  # on the grid
    got = _err(node, None, r.weight, None, x, y)
    assert got <= 1.02 * best and got < near, (got, best, near)
    assert r.bias is None and r.error_optimised < r.error_nearest


def test_activation_is_fitted_through_and_nearest_kept_when_better():
    """After a ReLU only positive outputs count; with nothing to gain (weights already on the grid)
    round to nearest comes back unchanged."""
    w = (np.round(randn(3, 4, seed=8) * 4) / 4).astype(np.float32)  # exactly on the 1/4 grid
    g, node = _gemm(w, randn(3, seed=9), act="Relu")
    act = fused_activation(node)
    assert act is not None and act.op_type == "Relu"
    x = randn(50, 4, seed=10)
    y = float_node_fn(act, [float_node_fn(node, [x, w, node.bias.const])[0]])[0]
    r = adaround_layer(node, x, y, act, QFormat(8, 2), AdaRoundOptions(iters=50, batch=16))
    np.testing.assert_array_equal(r.weight, w)
    assert r.bias is None and r.error_optimised == r.error_nearest == 0.0


def test_deterministic_and_seeded():
    w = randn(4, 8, seed=11)
    g, node = _gemm(w, randn(4, seed=12), act="Relu")
    act = fused_activation(node)
    x = randn(64, 8, seed=13)
    y = float_node_fn(act, [float_node_fn(node, [x, w, node.bias.const])[0]])[0]
    xq = fake_quant(x, QFormat(8, 4))
    run = [adaround_layer(node, xq, y, act, QFormat(4, 2), AdaRoundOptions(iters=80, seed=s)) for s in (0, 0, 1)]
    np.testing.assert_array_equal(run[0].weight, run[1].weight)
    np.testing.assert_array_equal(run[0].bias, run[1].bias)
    assert run[0].error_optimised < run[0].error_nearest


def test_bad_options_are_refused():
    for bad, word in ((dict(iters=0), "iters"), (dict(lr=0.0), "lr"), (dict(warmup=1.0), "warmup"),
                      (dict(reg=-1.0), "reg"), (dict(crop=0), "crop")):
        with pytest.raises(OptionError, match=word):
            AdaRoundOptions(**bad).check()
