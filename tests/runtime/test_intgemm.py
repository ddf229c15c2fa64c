"""The emulator's 8-bit integer GEMMs (runtime/intgemm.py): exact against int64 arithmetic on data
that would saturate a 16-bit pair sum, the kernel choice by hand, and the emulator giving the same
integers with and without them (and the same as onnxruntime)."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.lowering import lower
from mpqc.runtime.emulator import Emulator
from mpqc.runtime import intgemm
from mpqc.runtime.intgemm import IntGemm, _session, u8s8_exact, uint8_zero_point
from tests.graphs import GraphBuilder
from tests.runtime.test_emulator import conv_graph, dq_const, ints_of, ort_run, qdq


def ref(a, z, w):
    return (a.astype(np.int64) - z) @ w.astype(np.int64)


def test_worst_case_pairs_take_the_widening_kernel_and_are_exact(monkeypatch):
    # every pair of products is 255*127 + 255*127 = 64770: a saturating 16-bit pair sum would clip it
    w = np.full((64, 3), 127.0)
    w[::2, 1] = -128.0
    g = IntGemm(w)
    assert g.pair == 256  # |-128| + |-128| in column 1
    a = np.full((5, 64), 255, np.uint8)
    assert g.kernel_for(255) == ("u8s8" if u8s8_exact() else "u8u8")
    assert np.array_equal(g(a, 0), ref(a, 0, w))
    assert np.array_equal(g(a, 200), ref(a, 200, w))
    monkeypatch.setattr(intgemm, "u8s8_exact", lambda: False)  # a CPU whose u8s8 kernel saturates
    g = IntGemm(w)
    assert g.kernel_for(255) == "u8u8" and g.kernel_for(32767 // 256) == "u8s8"
    assert np.array_equal(g(a, 0), ref(a, 0, w))


def test_the_u8s8_probe_tells_the_truth_on_other_worst_cases():
    """Where the probe says the uint8 x int8 kernel is exact, it is on other shapes and worst-case
    data too; where it says not, that kernel really clips such data (then only the pair rule uses it)."""
    rng = np.random.default_rng(5)
    for K, M, R in ((513, 70, 40), (16, 16, 1), (1000, 3, 9)):
        w = rng.choice(np.array([-128, 127], np.int8), (K, M))
        a = np.where(rng.random((R, K)) < 0.9, 255, rng.integers(0, 256, (R, K))).astype(np.uint8)
        y = _session(w, 0).run(None, {"a": a, "a_zp": np.array(0, np.uint8)})[0]
        assert np.array_equal(y.astype(np.int64), ref(a, 0, w)) == u8s8_exact()


def test_small_activations_take_the_fast_kernel_and_are_exact(monkeypatch):
    monkeypatch.setattr(intgemm, "u8s8_exact", lambda: False)  # the pair rule alone
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (300, 7)).astype(np.float64)
    g = IntGemm(w)
    a_max = 32767 // g.pair
    assert g.kernel_for(a_max) == "u8s8" and g.kernel_for(a_max + 1) == "u8u8"
    a = rng.integers(0, a_max + 1, (33, 300)).astype(np.uint8)
    a[0] = a_max  # the largest pair sums the rule allows
    assert np.array_equal(g(a, 3), ref(a, 3, w))
    b = rng.integers(0, 256, (33, 300)).astype(np.uint8)
    assert np.array_equal(g(b, 128), ref(b, 128, w))


@pytest.mark.parametrize("w,ok", [([[1.0, -128.0]], True), ([[128.0]], False), ([[0.5]], False),
                                  ([[np.nan]], False), ([[-129.0]], False)])
def test_supports_only_8bit_integers(w, ok):
    assert IntGemm.supports(np.array(w)) is ok


@pytest.mark.parametrize("x,z", [([-3, 5], (3, 8)), ([0, 255], (0, 255)), ([1, 200], (0, 200)),
                                 ([-128, 127], (128, 255)), ([-7, -2], (7, 7)), ([-1, 255], None),
                                 ([-256, 0], None), ([300], None), ([], None)])
def test_uint8_zero_point(x, z):
    assert uint8_zero_point(np.array(x, np.float32)) == z


def _both(graph, x):
    prog = lower(graph)
    fast, slow = Emulator(prog), Emulator(prog, int8_kernels=False)
    a, b = fast.run(x), slow.run(x)
    return fast, a, b


@pytest.mark.parametrize("x_dtype,stride,pads,dil", [(np.uint8, 1, (1, 1, 1, 1), 1), (np.int8, 2, (1, 0, 2, 1), 1),
                                                      (np.int8, 1, (2, 2, 2, 2), 2), (np.uint8, 2, (0, 0, 0, 0), 1)])
def test_conv_on_int8_kernels_equals_the_float_path_hand_and_onnxruntime(x_dtype, stride, pads, dil):
    rng = np.random.default_rng(3)
    C, M = 16, 5
    lo, hi = (0, 256) if x_dtype == np.uint8 else (-128, 128)
    xi = rng.integers(lo, hi, (2, C, 7, 6))
    xi[0, :, 0, :] = hi - 1  # saturating-size pairs present
    w = rng.integers(-128, 128, (M, C, 3, 3))
    w[:, :, 0, 0] = 127
    bi = rng.integers(-3000, 3000, M)
    b = GraphBuilder("conv", opset=21)
    xin = b.input("x", [2, C, 7, 6])
    xd = qdq(b, xin, 1.0, x_dtype, name="x")
    wd = dq_const(b, w.astype(np.int8), 1.0, "w")
    bd = dq_const(b, bi.astype(np.int32), 1.0, "b")
    y = b.op("Conv", [xd, wd, bd], name="conv", strides=[stride, stride], pads=list(pads), dilations=[dil, dil])
    out = qdq(b, y, 256.0, np.int8, name="y")
    g = b.output(out)
    x = xi.astype(np.float32)
    emu, fast, slow = _both(g, x)
    assert [k for k, v in emu._gemms.items() if v is not None]  # the int8 kernel ran
    name = next(iter(fast))
    assert np.array_equal(fast[name], slow[name])
    # by hand: the exact accumulator, then the output rounding of ONNX (ties to even), saturated
    xp = np.pad(xi, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3]))).astype(np.int64)
    Ho = (xp.shape[2] - dil * 2 - 1) // stride + 1
    Wo = (xp.shape[3] - dil * 2 - 1) // stride + 1
    acc = np.zeros((2, M, Ho, Wo), np.int64)
    for a in range(3):
        for c in range(3):
            win = xp[:, :, a * dil:a * dil + (Ho - 1) * stride + 1:stride, c * dil:c * dil + (Wo - 1) * stride + 1:stride]
            acc += np.einsum("nchw,mc->nmhw", win, w[:, :, a, c])
    acc += bi.reshape(1, -1, 1, 1)
    want = np.clip(np.rint(acc / 256.0), -128, 127)
    assert np.array_equal(ints_of(fast[name], 256.0), want.astype(np.int64))
    assert np.array_equal(fast[name], ort_run(g, x))


def test_gemm_on_int8_kernels_equals_the_float_path():
    rng = np.random.default_rng(4)
    b = GraphBuilder("gemm", opset=21)
    xin = b.input("x", [6, 40])
    xd = qdq(b, xin, 1.0, np.uint8, name="x")
    w = rng.integers(-128, 128, (9, 40))
    wd = dq_const(b, w.astype(np.int8), 1.0, "w")
    y = b.op("Gemm", [xd, wd], name="fc", transB=1)
    g = b.output(qdq(b, y, 64.0, np.int8, name="y"))
    x = rng.integers(0, 256, (6, 40)).astype(np.float32)
    emu, fast, slow = _both(g, x)
    name = next(iter(fast))
    assert [k for k, v in emu._gemms.items() if v is not None]
    assert np.array_equal(fast[name], slow[name])
    want = np.clip(np.rint((x.astype(np.int64) @ w.T.astype(np.int64)) / 64.0), -128, 127)
    assert np.array_equal(ints_of(fast[name], 64.0), want.astype(np.int64))


def test_wide_activations_stay_on_the_float_path():
    # 16-bit activations span more than 256 values: the layer runs on float BLAS, same integers
    rng = np.random.default_rng(5)
    w = rng.integers(-128, 128, (4, 16, 1, 1))
    g = conv_graph([1, 16, 2, 2], 1.0, np.int16, w, 1.0, None, 64.0, np.int16)
    x = rng.integers(-3000, 3000, (1, 16, 2, 2)).astype(np.float32)
    _, fast, slow = _both(g, x)
    name = next(iter(fast))
    assert np.array_equal(fast[name], slow[name])
    assert np.array_equal(fast[name], ort_run(g, x))
