"""AND + popcount kernels of binary-decomposed layers: bit for bit against dense integer sums."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.core.errors import DataError, UnsupportedOpError
from mpqc.runtime.popcount import (ActQuant, BinaryLayer, binary_forward, binary_partial_sums,
                                   dense_partial_sums, float_reference_conv, float_reference_gemm, n_words,
                                   pack_bits, pack_planes, pack_weights, popcount_words)


def _layer(O, cg, kh, kw, k, group=1, seed=0, path=None):
    r = np.random.default_rng(seed)
    M = np.where(r.random((O, cg * kh * kw, k)) < 0.5, -1, 1).astype(np.int8)
    c = r.normal(size=(O, k))
    return BinaryLayer(M, c, (O, cg, kh, kw), group, path=path)


def test_pack_bits_layout():
    bits = np.zeros(70, bool)
    bits[[0, 3, 63, 64, 69]] = True
    w = pack_bits(bits)
    assert w.dtype == np.uint64 and w.shape == (2,)
    assert int(w[0]) == (1 | 1 << 3 | 1 << 63) and int(w[1]) == (1 | 1 << 5)
    assert n_words(64) == 1 and n_words(65) == 2
    q = np.array([[5, 2, 7]])
    pl = pack_planes(q, 3)  # planes e=0: 1,0,1 ; e=1: 0,1,1 ; e=2: 1,0,1
    assert pl.shape == (1, 3, 1) and [int(x) for x in pl[0, :, 0]] == [0b101, 0b110, 0b101]
    M = np.array([[[1, -1], [-1, -1], [1, 1]]])  # O=1, D=3, k=2
    pw = pack_weights(M)
    assert pw.shape == (1, 2, 1, 1) and int(pw[0, 0, 0, 0]) == 0b101 and int(pw[0, 1, 0, 0]) == 0b100


def test_popcount_words():
    a = np.array([0, 1, 0xFFFFFFFFFFFFFFFF, 0x8000000000000001], np.uint64)
    assert popcount_words(a).tolist() == [0, 1, 64, 2]


@pytest.mark.parametrize("case", [
    dict(C=3, O=5, kh=3, kw=3, k=2, Q=4, strides=(1, 1), pads=(1, 1, 1, 1), group=1),
    dict(C=4, O=6, kh=3, kw=2, k=3, Q=3, strides=(2, 1), pads=(0, 1, 2, 0), group=2),  # strided, asym pads, grouped
    dict(C=8, O=8, kh=3, kw=3, k=1, Q=8, strides=(2, 2), pads=(1, 1, 1, 1), group=8),  # depthwise
    dict(C=4, O=8, kh=3, kw=3, k=2, Q=2, strides=(1, 1), pads=(2, 2, 2, 2), group=4, dil=(2, 2)),  # mult 2, dilated
    dict(C=30, O=7, kh=3, kw=3, k=2, Q=5, strides=(1, 1), pads=(0, 0, 0, 0), group=1),  # D=270 > 4 words
    dict(C=64, O=3, kh=1, kw=1, k=4, Q=6, strides=(1, 1), pads=(0, 0, 0, 0), group=1),  # D exactly 64
    dict(C=1, O=9, kh=5, kw=5, k=2, Q=3, strides=(1, 1), pads=(2, 2, 2, 2), group=1),  # first layer: window
    dict(C=12, O=10, kh=3, kw=5, k=2, Q=4, strides=(2, 3), pads=(1, 2, 0, 1), group=2),  # segments span words
    dict(C=6, O=6, kh=5, kw=5, k=3, Q=4, strides=(2, 2), pads=(2, 1, 2, 3), group=6),  # depthwise 5x5
    dict(C=100, O=130, kh=3, kw=3, k=1, Q=2, strides=(1, 1), pads=(1, 1, 1, 1), group=1),  # 2 words per tap
    # 1x1, stride 1, unpadded, more positions than columns: the pixels path (2 words, 2 groups)
    dict(C=140, O=6, kh=1, kw=1, k=3, Q=5, strides=(1, 1), pads=(0, 0, 0, 0), group=2),
    # depthwise with wide outputs (row blocks of one row) and strided narrow ones (several rows a block)
    dict(C=3, O=3, kh=3, kw=3, k=4, Q=8, strides=(1, 1), pads=(1, 1, 1, 1), group=3, hw=(9, 40)),
    dict(C=4, O=8, kh=5, kw=5, k=5, Q=3, strides=(2, 2), pads=(2, 2, 2, 2), group=4, hw=(21, 23)),
    # a window layer with fewer positions than columns (the window path proper; others: window-pixels)
    dict(C=2, O=40, kh=3, kw=3, k=2, Q=4, strides=(1, 1), pads=(1, 1, 1, 1), group=1, hw=(4, 3)),
    # window-pixels with a window of 2 words (D = 90) and a dilation
    dict(C=10, O=3, kh=3, kw=3, k=2, Q=3, strides=(1, 2), pads=(2, 0, 1, 2), group=1, hw=(9, 11), dil=(2, 1)),
])
@pytest.mark.parametrize("path", [None, "tap", "window", "direct"])
def test_conv_popcount_equals_dense_integer_sums(case, path):
    r = np.random.default_rng(1)
    C, O, g = case["C"], case["O"], case["group"]
    if path == "window" and C // g * case["kw"] > 64:
        pytest.skip("the window path needs kw * C/group <= 64")
    lay = _layer(O, C // g, case["kh"], case["kw"], case["k"], g, seed=2, path=path)
    act = ActQuant.from_range(-0.7, 2.3, case["Q"])
    assert act.zp > 0  # a non-zero zero point: padding must hold it
    q = r.integers(0, act.qmax + 1, size=(2, C) + case.get("hw", (7, 6))).astype(np.int32)
    dil = case.get("dil", (1, 1))
    got = binary_partial_sums(lay, q, act, case["strides"], case["pads"], dil)
    want = dense_partial_sums(lay.M, q, act.zp, lay.weight_shape, g, case["strides"], case["pads"], dil)
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # the float output equals the float reference of the decomposed layer
    x = act.dequantize(q)
    bias = r.normal(size=O)
    y = binary_forward(lay, q, act, bias, case["strides"], case["pads"], dil)
    ref = float_reference_conv(lay, x, act, bias, case["strides"], case["pads"], dil)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.abs(ref).max())  # float32 dequantization


def test_gemm_popcount_equals_dense_integer_sums():
    r = np.random.default_rng(3)
    O, D, k = 9, 150, 3
    M = np.where(r.random((O, D, k)) < 0.5, -1, 1)
    lay = BinaryLayer(M, r.normal(size=(O, k)), (O, D))
    act = ActQuant.from_range(0.0, 4.0, 5)
    assert act.zp == 0 and act.lo == 0.0
    q = r.integers(0, 32, size=(4, D))
    got = binary_partial_sums(lay, q, act)
    np.testing.assert_array_equal(got, dense_partial_sums(lay.M, q, act.zp, lay.weight_shape))
    x = r.uniform(-0.5, 4.5, size=(4, D)).astype(np.float32)  # with clipping at both ends
    y = binary_forward(lay, act.quantize(x), act, bias=np.arange(O))
    ref = float_reference_gemm(lay, x, act, np.arange(O))
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_kernel_paths_are_chosen_per_layer():
    assert _layer(48, 1, 5, 5, 1).path == "window"  # first layer: one word holds the window
    assert _layer(96, 48, 3, 3, 2).path == "tap"  # whole words per tap
    assert _layer(8, 1, 3, 3, 2, group=8).path == "direct"  # depthwise
    lay = BinaryLayer(np.ones((4, 10, 2)), np.ones((4, 2)), (4, 10))
    assert lay.path == "tap" and lay.word_ops(1, 3) == 3 * 1 * 2 * 4
    with pytest.raises(DataError):
        BinaryLayer(np.ones((4, 10, 2)), np.ones((4, 2)), (4, 10), path="direct")


def test_actquant_matches_quantize_linear_and_keeps_zero_exact():
    a = ActQuant.from_range(-1.0, 3.0, 4)
    assert a.dequantize(np.array([a.zp]))[0] == 0.0
    assert a.lo == -a.zp * a.delta and abs(a.hi - 3.0) < a.delta
    x = np.linspace(-2, 4, 101).astype(np.float32)
    q = a.quantize(x)
    assert q.min() == 0 and q.max() == 15
    want = np.clip(np.rint(x / np.float32(a.delta)) + a.zp, 0, 15)
    np.testing.assert_array_equal(q, want)
    relu = ActQuant.from_range(0.0, 6.0, 3)
    assert relu.zp == 0 and relu.lo == 0.0
    with pytest.raises(DataError):
        ActQuant.from_range(0, 1, 0)
    with pytest.raises(DataError):
        ActQuant.from_range(1, float("nan"), 3)


def test_bad_shapes_are_typed_errors():
    r = np.random.default_rng(0)
    with pytest.raises(DataError):
        BinaryLayer(np.ones((2, 4, 1)), r.normal(size=(2, 2)), (2, 4))
    with pytest.raises(UnsupportedOpError):
        BinaryLayer(np.ones((2, 4, 1)), r.normal(size=(2, 1)), (2, 1, 4))
    lay = _layer(3, 2, 3, 3, 1)
    with pytest.raises(DataError):
        binary_partial_sums(lay, np.zeros((1, 5, 4, 4), np.int32), ActQuant.from_range(0, 1, 2))


@pytest.mark.parametrize("Q", [2, 3, 4, 5, 6, 7, 8])
def test_actquant_is_onnx_quantize_linear_bit_for_bit_at_ties(Q):
    """Regression (efficientnet_lite0, Q >= 5: ORT and the popcount runtime 1e-2 apart end to end).

    The quantizer is not the cause: on the same float32 input the runtime's codes are ORT's
    Clip -> QuantizeLinear codes bit for bit, ties ((n + 1/2) * delta, to even) and one ulp
    either side included. What differs is the input: ORT's float32 Conv and the runtime's exact
    integer sums round differently by an ulp or so, and an activation that close to a tie gets
    codes one apart, i.e. ``delta`` apart after the next layer -- reproduced here without ORT."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    a = ActQuant.from_range(-0.7, 2.3, Q)
    d = np.float32(a.delta)
    n = np.arange(-a.zp - 2, a.qmax - a.zp + 2, dtype=np.float32)
    ties = (n + np.float32(0.5)) * d
    x = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)),
                        n * d, np.float32([0.0, -0.0, 1e-30, -1e-30, 1e6, -1e6])]).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(d, np.float32), "s"), numpy_helper.from_array(np.array(a.zp, np.uint8), "z"),
             numpy_helper.from_array(np.array(np.float32(-a.zp) * d, np.float32), "lo"),
             numpy_helper.from_array(np.array(np.float32(a.qmax - a.zp) * d, np.float32), "hi")]
    nodes = ([helper.make_node("Clip", ["x", "lo", "hi"], ["xc"])] if Q < 8 else
             [helper.make_node("Identity", ["x"], ["xc"])]) + [helper.make_node("QuantizeLinear", ["xc", "s", "z"], ["q"])]
    g = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
                          [helper.make_tensor_value_info("q", TensorProto.UINT8, [x.size])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["WeightBiasQuantization"])
    want = s.run(None, {"x": x})[0].astype(np.int32)
    np.testing.assert_array_equal(a.quantize(x), want)
    # the divergence: within a few ulps of a tie, one ulp more is one code more...
    lo_side = ties
    for _ in range(4):
        lo_side = np.nextafter(lo_side, np.float32(-np.inf))
    cols = [lo_side]
    for _ in range(8):
        cols.append(np.nextafter(cols[-1], np.float32(np.inf)))
    codes = np.stack([a.quantize(c) for c in cols], axis=1)  # (ties, 9 adjacent float32 values)
    steps = np.diff(codes, axis=1)
    inside = (codes[:, 0] > 0) & (codes[:, -1] < a.qmax)
    assert inside.sum() >= a.qmax - 2 and np.all(steps[inside].sum(axis=1) == 1) and steps.min() >= 0
    # ...which the next binary layer turns into |sum_j w~_j| * delta at its output
    t = int(np.flatnonzero(inside)[inside.sum() // 2])
    j = int(np.argmax(steps[t]))
    xa = np.full((1, 1, 2, 2), cols[j][t], np.float32)
    xb = np.full((1, 1, 2, 2), cols[j + 1][t], np.float32)  # one ulp above xa
    lay = _layer(1, 1, 1, 1, 2, seed=3)
    ya = binary_forward(lay, a.quantize(xa), a)
    yb = binary_forward(lay, a.quantize(xb), a)
    ulp = float(np.spacing(np.float32(max(np.abs(ya).max(), np.abs(yb).max()))))  # the float32 epilogue
    np.testing.assert_allclose(np.abs(yb - ya), abs(float(lay.w_rec.sum())) * a.delta, rtol=1e-6, atol=8 * ulp)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("Q", [8, 2])
def test_direct_path_extremes_are_exact(sign, Q):
    """The direct path's int16 accumulators at their bound (D = 64 taps of the largest code, every
    sign alike: |P_k| = 64 * 255 = 16320), its int32 fallback where D * qmax >= 2^15 (a forced
    direct path on a D = 144 layer), and negative pads (cropping)."""
    act = ActQuant.from_range(0.0, 1.0, Q)
    for O, cg, kh, kw, g, pads in [(8, 4, 4, 4, 4, (1, 2, 2, 1)), (6, 16, 3, 3, 2, (-1, 0, 1, -2))]:
        M = np.full((O, cg * kh * kw, 2), sign, np.int8)
        M[:, ::7, 1] *= -1
        lay = BinaryLayer(M, np.ones((O, 2)), (O, cg, kh, kw), g, path="direct")
        q = np.full((2, cg * g, 9, 10), act.qmax, np.int32)
        q[1, :, ::3] = 0
        got = binary_partial_sums(lay, q, act, (1, 2), pads)
        want = dense_partial_sums(lay.M, q, act.zp, lay.weight_shape, g, (1, 2), pads)
        np.testing.assert_array_equal(got, want)
        assert np.abs(want).max() == cg * kh * kw * act.qmax


def test_paths_taken_per_call():
    """Which path each kind of layer takes (``last_path``), so that every kernel above is exercised."""
    act = ActQuant.from_range(0.0, 1.0, 3)
    r = np.random.default_rng(0)
    for (O, cg, kh, kw, g, hw, pads, want) in [
            (40, 2, 3, 3, 1, (4, 3), (1, 1, 1, 1), "window"),  # 24 positions < 80 columns
            (4, 2, 3, 3, 1, (9, 9), (1, 1, 1, 1), "window-pixels"),
            (6, 70, 1, 1, 1, (5, 5), (0, 0, 0, 0), "pixels"),
            (6, 70, 1, 1, 1, (5, 5), (1, 0, 0, 0), "tap"),  # padded 1x1
            (6, 1, 3, 3, 6, (5, 5), (1, 1, 1, 1), "direct")]:
        lay = _layer(O, cg, kh, kw, 2, g, seed=1)
        q = r.integers(0, act.qmax + 1, size=(2, cg * g) + hw)
        binary_partial_sums(lay, q, act, (1, 1), pads)
        assert lay.last_path == want, (O, cg, kh, kw, lay.last_path)
