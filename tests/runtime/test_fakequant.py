"""runtime/fakequant.py: activation rounding (half-up and half-even) against a brute-force
integer quantizer, and the two node functions that inject fake quantization into the Executor."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.core.qformat import LayerQConfig, QFormat, fake_quant
from mpqc.runtime.executor import Executor
from mpqc.runtime.fakequant import fake_quant_act, fake_quant_node_fn, ir_node_fn
from tests.graphs import GraphBuilder, randn


def brute(x, bits, frac, signed=True, even=False):
    """Quantize one value at a time in Python floats: round(x * 2^frac), clip, divide."""
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    out = []
    for v in np.asarray(x, np.float64).ravel():
        t = v * 2.0 ** frac
        q = round(t) if even else np.floor(t + 0.5)  # Python's round() is half to even
        out.append(min(max(q, lo), hi) / 2.0 ** frac)
    return np.array(out, np.float32).reshape(np.shape(x))


TIES = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.25, -3.75, 100.0, -100.0], np.float32) / 4


@pytest.mark.parametrize("rounding,even", [("half-up", False), ("half-even", True)])
@pytest.mark.parametrize("bits,frac,signed", [(8, 2, True), (4, 2, True), (4, 2, False), (8, -1, True)])
def test_fake_quant_act_matches_brute_force(rounding, even, bits, frac, signed):
    fmt = QFormat(bits, frac, signed)
    x = np.concatenate([TIES, randn(200, seed=bits + frac, scale=3.0)])
    np.testing.assert_array_equal(fake_quant_act(x, fmt, rounding), brute(x, bits, frac, signed, even))


def test_half_even_differs_from_half_up_only_on_ties():
    fmt = QFormat(8, 0)
    x = np.array([0.5, 1.5, 2.5, -0.5, 0.4, 1.6], np.float32)
    np.testing.assert_array_equal(fake_quant_act(x, fmt, "half-up"), [1, 2, 3, 0, 0, 2])
    np.testing.assert_array_equal(fake_quant_act(x, fmt, "half-even"), [0, 2, 2, -0, 0, 2])


def test_per_channel_formats_round_each_channel_with_its_own_step():
    fmt = QFormat(8, (0, 1, 2), axis=1)
    x = np.full((2, 3, 2), 0.3, np.float32)
    got = fake_quant_act(x, fmt, "half-even")
    np.testing.assert_array_equal(got[:, 0], 0.0)
    np.testing.assert_array_equal(got[:, 1], 0.5)
    np.testing.assert_array_equal(got[:, 2], 0.25)


def gemm_graph():
    b = GraphBuilder()
    x = b.input("x", [3, 4])
    w = b.const("w", randn(5, 4, seed=1))
    bias = b.const("b", randn(5, seed=2))
    g = b.output(b.op("Gemm", [x, w, bias], name="fc", transB=1))
    return g, x, w, bias


def test_node_fn_rounds_inputs_substitutes_params_and_rounds_outputs():
    g, x, w, bias = gemm_graph()
    fc = g.nodes[0]
    y = fc.outputs[0]
    a = randn(3, 4, seed=3)
    fin, fw, fout = QFormat(8, 3), QFormat(4, 2), QFormat(8, 2)
    wq = fake_quant(w.const, fw)
    fn = fake_quant_node_fn({x: fin}, {y: fout}, params=lambda n: {1: wq} if n is fc else None,
                            rounding="half-even")
    got = Executor(g, fn).run({x: a})[y]
    want = fake_quant_act(fake_quant_act(a, fin, "half-even") @ wq.T + bias.const, fout, "half-even")
    np.testing.assert_array_equal(got, want)


def test_node_fn_appends_a_parameter_past_the_node_inputs():
    b = GraphBuilder()
    x = b.input("x", [2, 3])
    w = b.const("w", randn(4, 3, seed=1))
    g = b.output(b.op("Gemm", [x, w], name="fc", transB=1))
    new_bias = np.arange(4, dtype=np.float32)
    fn = fake_quant_node_fn({}, {}, params=lambda n: {2: new_bias})
    a = randn(2, 3, seed=2)
    got = Executor(g, fn).run({x: a})[g.outputs[0]]
    np.testing.assert_allclose(got, a @ w.const.T + new_bias, rtol=1e-6)


def test_empty_formats_are_the_float_network():
    g, x, *_ = gemm_graph()
    a = randn(3, 4, seed=4)
    plain = Executor(g).run({x: a})[g.outputs[0]]
    np.testing.assert_array_equal(Executor(g, fake_quant_node_fn({}, {})).run({x: a})[g.outputs[0]], plain)


def test_ir_node_fn_follows_the_graph_annotations():
    g, x, w, bias = gemm_graph()
    fc = g.nodes[0]
    y = fc.outputs[0]
    x.qformat, y.qformat = QFormat(8, 4), QFormat(8, 1)
    fw, fb = QFormat(3, 1), QFormat(16, 5)
    fc.qconfig = LayerQConfig(weight_bits=3, act_bits=8, weight_format=fw, bias_format=fb)
    a = randn(3, 4, seed=5)
    got = Executor(g, ir_node_fn(g)).run({x: a})[y]
    want = fake_quant(fake_quant(a, x.qformat) @ fake_quant(w.const, fw).T + fake_quant(bias.const, fb), y.qformat)
    np.testing.assert_array_equal(got, want)
    # the graph's constants are not modified
    assert not np.array_equal(w.const, fake_quant(w.const, fw))
