"""Rounding optimisation (compiler/rounding.py): the im2col patches against the float convolution, the
OBQ/GPTQ column solver against a hand computation and brute force, the least-squares target on
quantized inputs, and the sequential fit of a small network."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from mpqc.compiler.data import Dataset
from mpqc.compiler.passes import PassContext, PassManager
from mpqc.compiler.pipelines import parse_pipeline
from mpqc.compiler.rounding import (augmented_patches, conv_patches, layer_grams, obq_round, optimise_layer,
                                    row_loss, weight_matrix)
from mpqc.compiler.targets import get_target
from mpqc.core.qformat import QFormat, fake_quant
from mpqc.runtime.executor import Executor
from mpqc.runtime.fakequant import ir_node_fn
from mpqc.runtime.ops import KERNELS

from tests.graphs import GraphBuilder, randn


def _conv(cin, cout, k, *, seed=0, **attrs):
    b = GraphBuilder("c")
    x = b.input("x", ["N", cin, 9, 8])
    w = b.const("w", randn(cout, cin // attrs.get("group", 1), *k, seed=seed))
    g = b.output(b.op("Conv", [x, w], name="conv", **attrs))
    return g, g.layers()[0]


@pytest.mark.parametrize("attrs", [
    dict(cin=3, cout=4, k=(3, 3), pads=[1, 1, 1, 1]),
    dict(cin=4, cout=6, k=(3, 2), strides=[2, 1], pads=[0, 1, 2, 0]),
    dict(cin=4, cout=4, k=(3, 3), group=4, pads=[1, 1, 1, 1], strides=[2, 2]),  # depthwise
    dict(cin=6, cout=4, k=(2, 2), group=2, dilations=[2, 1]),
    dict(cin=5, cout=3, k=(1, 1)),
])
def test_patches_times_weights_is_the_convolution(attrs):
    attrs = dict(attrs)
    g, node = _conv(attrs.pop("cin"), attrs.pop("cout"), attrs.pop("k"), seed=3, **attrs)
    x = randn(3, node.weight.const.shape[1] * int(node.attr("group", 1)), 9, 8, seed=4)
    want = KERNELS["Conv"](node, x, node.weight.const)
    p = conv_patches(node, x)  # G, D, N*positions
    wm = weight_matrix(node)  # G, O/G, D
    got = np.matmul(wm, p)  # G, O/G, N*positions
    n, o = x.shape[0], want.shape[1]
    got = got.reshape(o, n, *want.shape[2:]).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    a = augmented_patches(node, x)
    assert a.shape == (p.shape[0], p.shape[1] + 1, p.shape[2]) and np.all(a[:, -1] == 1.0)


def test_obq_hand_computed_two_columns():
    # w = [0.3, 0.3], step 1, strongly correlated inputs: rounding column 0 down (error 0.3) pushes
    # column 1 to 0.3 + 0.9 * 0.3 = 0.57, which rounds up: q = [0, 1], the brute-force optimum
    h = np.array([[[1.0, 0.9], [0.9, 1.0]]])
    q, rest = obq_round(np.array([[[0.3, 0.3]]]), h, np.ones((1, 1)), -8, 7, damp=1e-9, act_order=False)
    assert q.tolist() == [[[0, 1]]] and rest.shape == (1, 1, 0)
    loss = lambda v: float(np.einsum("i,ij,j->", v, h[0], v))  # noqa: E731
    assert loss(np.array([0, 1]) - 0.3) == pytest.approx(0.202)
    assert loss(np.array([0, 0]) - 0.3) == pytest.approx(0.342)


def test_obq_without_coupling_is_round_to_nearest_and_keeps_grid_weights():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4, 6))
    s = np.full((3, 4), 0.125)
    h = np.stack([np.diag(rng.uniform(0.5, 2.0, 6)) for _ in range(3)])
    q, _ = obq_round(w, h, s, -128, 127)
    np.testing.assert_array_equal(q, np.floor(w / 0.125 + 0.5))
    grid = np.round(w * 8) / 8
    x = rng.normal(size=(3, 6, 50))
    q2, _ = obq_round(grid, x @ x.transpose(0, 2, 1), s, -128, 127)
    np.testing.assert_array_equal(q2 * 0.125, grid)  # an exactly representable weight is recovered exactly


def test_obq_saturates_and_dead_inputs_round_to_nearest():
    h = np.array([[[2.0, 0.0, 0.3], [0.0, 0.0, 0.0], [0.3, 0.0, 1.0]]])  # input 1 never carries signal
    q, _ = obq_round(np.array([[[40.0, 0.6, -0.4]]]), h, np.ones((1, 1)), -8, 7)
    assert q[0, 0, 0] == 7 and q[0, 0, 1] == 1
    assert q.min() >= -8 and q.max() <= 7


def test_obq_close_to_brute_force_and_optimise_layer_never_worse_than_nearest():
    rng = np.random.default_rng(1)
    gains = []
    for trial in range(20):
        d = 5
        x = rng.normal(size=(d, 40)) + rng.normal(size=(d, 1))
        x[1] = 0.8 * x[0] + 0.2 * x[1]  # correlated inputs: where the error spreading pays
        h = (x @ x.T)[None] / 40
        w = rng.normal(size=(1, 1, d)) * 0.3
        q, _ = obq_round(w, h, np.full((1, 1), 0.25), -8, 7, damp=1e-6)
        loss = lambda v: float(((v - w[0, 0]) @ h[0] @ (v - w[0, 0])))  # noqa: E731
        near = np.clip(np.floor(w[0, 0] / 0.25 + 0.5), -8, 7) * 0.25
        lo = np.floor(w[0, 0] / 0.25)
        best = min(loss(np.array(c) * 0.25) for c in itertools.product(*[(a, a + 1) for a in lo]))
        gains.append((loss(near) - loss(q[0, 0] * 0.25), loss(near) - best))
        # the greedy column order can lose to nearest on a row; optimise_layer then keeps nearest
        b = GraphBuilder("one")
        xin = b.input("x", ["N", d, 1, 1])
        node = b.output(b.op("Conv", [xin, b.const("w", w.reshape(1, d, 1, 1).astype(np.float32))])).layers()[0]
        ha = np.zeros((1, d + 1, d + 1))
        ha[:, :d, :d] = h
        r = optimise_layer(node, (ha, ha, ha), QFormat(4, 2, True, None), damp=1e-6, bias=False, finer=0)
        assert loss(r.weight.reshape(-1).astype(np.float64)) <= loss(near) * (1 + 1e-6) + 1e-9
    got, room = np.sum(gains, axis=0)
    assert room > 0 and got > 0.5 * room  # most of the way from nearest to the brute-force optimum, in all


def test_target_on_quantized_inputs_is_the_least_squares_solution():
    # with x_q != x_f, W* = W Hfq Hqq^-1 fits W x_f from x_q; a fine grid (16 bits) leaves W_q ~ W*
    g, node = _conv(2, 3, (1, 1), seed=5)
    rng = np.random.default_rng(2)
    xf = rng.normal(size=(6, 2, 9, 8)).astype(np.float32)
    xq = (np.round(xf * 4) / 4).astype(np.float32)
    hqq, hqf, hff, n = layer_grams(node, xf, xq)
    fmt = QFormat(16, (12, 12, 12), True, 0)
    r = optimise_layer(node, (hqq / n, hqf / n, hff / n), fmt, damp=1e-9, finer=0, bias=True)
    pq = augmented_patches(node, xq)[0]
    pf = augmented_patches(node, xf)[0]
    wt = np.concatenate([weight_matrix(node)[0], np.zeros((3, 1))], axis=1)
    sol = np.linalg.lstsq(pq.T.astype(np.float64), (wt @ pf).T, rcond=None)[0].T
    got = np.concatenate([r.weight.reshape(3, 2), r.bias[:, None]], axis=1)
    np.testing.assert_allclose(got, sol, atol=2e-3)
    assert r.error_optimised < r.error_nearest
    # too few input vectors per input (count < min_samples * (D + 1)): no correction, the target stays W
    few = optimise_layer(node, (hqq / n, hqf / n, hff / n), fmt, damp=1e-9, finer=0, bias=True, count=n,
                         min_samples=n)
    np.testing.assert_allclose(few.weight.reshape(3, 2), weight_matrix(node)[0], atol=1e-3)
    assert np.max(np.abs(few.weight.reshape(3, 2) - weight_matrix(node)[0])) < np.max(np.abs(got[:, :2] - weight_matrix(node)[0]))


def test_optimise_layer_weights_lie_on_the_grid_and_the_finer_format_only_where_it_helps():
    g, node = _conv(4, 6, (3, 3), seed=6, pads=[1, 1, 1, 1])
    x = randn(8, 4, 9, 8, seed=7)
    h, n = layer_grams(node, x)
    fmt = QFormat(4, (3, 2, 3, 3, 2, 3), True, 0)
    r = optimise_layer(node, (h / n, h / n, h / n), fmt)
    np.testing.assert_array_equal(fake_quant(r.weight, r.fmt), r.weight)
    assert r.error_optimised < r.error_nearest
    assert r.finer == int(np.sum(r.fmt.frac_array() - fmt.frac_array()))
    assert set(np.unique(r.fmt.frac_array() - fmt.frac_array())) <= {0, 1}
    capped = optimise_layer(node, (h / n, h / n, h / n), fmt, frac_cap=fmt.frac_array())
    assert capped.fmt == fmt and capped.finer == 0
    # the reported errors are the Gram losses
    wm = weight_matrix(node).astype(np.float64)
    wt = np.concatenate([wm, np.zeros((1, 6, 1))], axis=2)
    full = np.concatenate([weight_matrix(node, r.weight.astype(np.float64)), r.bias.reshape(1, 6, 1)], axis=2)
    hh = (h / n)
    assert float(row_loss(full, wt, hh, hh, hh).sum() / row_loss(0 * wt, wt, hh, hh, hh).sum()) == \
        pytest.approx(r.error_optimised, rel=1e-6)


def _net():
    b = GraphBuilder("net")
    x = b.input("x", ["N", 3, 8, 8])
    h = b.op("Relu", [b.op("Conv", [x, b.const("w1", randn(8, 3, 3, 3, seed=1, scale=0.5)),
                                    b.const("b1", randn(8, seed=2, scale=0.1))], name="c1", pads=[1, 1, 1, 1])])
    h = b.op("Conv", [h, b.const("w2", randn(8, 1, 3, 3, seed=3, scale=0.5))], name="dw", group=8,
             pads=[1, 1, 1, 1], strides=[2, 2])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    return b.output(b.op("Gemm", [h, b.const("w3", randn(4, 8, seed=4)), b.const("b3", randn(4, seed=5))],
                         name="fc", transB=1))


@pytest.mark.parametrize("inputs", ["quantized", "float"])
def test_pass_lowers_the_networks_output_error(inputs):
    x = randn(32, 3, 8, 8, seed=9) + 0.3
    out = {}
    for opt in (False, True):
        g = _net()
        ref = Executor(g).run({g.inputs[0]: x})[g.outputs[0]]
        ctx = PassContext(target=get_target("npu4"), batch_size=16)
        ctx.calib = Dataset(x, None, "calib")
        spec = "choose-formats{weight_bits=4,act_bits=8}" + (f",optimize-rounding{{inputs={inputs}}}" if opt else "")
        PassManager(parse_pipeline(spec)).run(g, ctx)
        y = Executor(g, ir_node_fn(g, rounding="half-even")).run({g.inputs[0]: x})[g.outputs[0]]
        out[opt] = float(np.mean((y - ref) ** 2))
        if opt:
            for n in g.layers():
                np.testing.assert_array_equal(fake_quant(n.weight.const, n.qconfig.weight_format), n.weight.const)
            sec = ctx.report["passes"]["optimize-rounding"]
            assert [r["layer"] for r in sec["layers"]] == ["c1", "dw", "fc"] and all(r["applied"] for r in sec["layers"])
            assert sec["samples"] == 32
    assert out[True] < 0.7 * out[False]
