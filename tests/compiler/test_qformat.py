"""Qm.n formats and their arithmetic (ALGORITHMS.md §1), and the float-scale kind against onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from mpqc.core.qformat import (QFormat, choose_frac_mse, choose_frac_mse_per_channel, dequantize_pow2,
                                   fake_quant, quantize_pow2, range_frac, round_half_up, sqnr_db)


def test_ranges_scales_and_text():
    f = QFormat(8, 5)
    assert (f.qmin, f.qmax, int(f.int_bits()), f.describe()) == (-128, 127, 2, "Q2.5")
    u = QFormat(8, 5, signed=False)
    assert (u.qmin, u.qmax, int(u.int_bits()), u.describe()) == (0, 255, 3, "UQ3.5")
    assert float(QFormat(8, 10).scale()) == 2.0 ** -10 and int(QFormat(8, 10).int_bits()) == -3  # negative m
    pc = QFormat(4, (3, 5), True, 0)
    assert pc.per_channel and pc.describe() == "s4 n=[3..5]/ch" and pc.scale().tolist() == [0.125, 0.03125]
    assert pc.to_json() == {"bits": 4, "signed": True, "axis": 0, "frac": [3, 5]}
    assert QFormat(8, 3) == QFormat(8, 3) and hash(QFormat(8, 3)) == hash(QFormat(8, 3))
    assert QFormat(8, 3) != QFormat(8, 3, False) and QFormat(8, (1, 2), True, 0) != QFormat(8, (1, 3), True, 0)
    fl = QFormat(8, 0, False, fscale=0.02, zero_point=13)
    assert not fl.is_pow2 and QFormat(8, 3).is_pow2
    assert fl.describe() == "u8 s=0.02 zp=13" and fl.to_json()["zero_point"] == 13 and fl != QFormat(8, 0, False)


def test_quantize_rounds_half_up_and_saturates():
    x = np.array([0.25, 0.75, -0.25, -0.75, 100.0, -100.0, 0.124])
    q = quantize_pow2(x, 8, 1)  # x * 2 -> 0.5, 1.5, -0.5, -1.5 are ties
    assert q.tolist() == [1, 2, 0, -1, 127, -128, 0]
    assert quantize_pow2(x, 8, 1, signed=False).tolist() == [1, 2, 0, 0, 200, 0, 0]
    assert quantize_pow2(x, 8, 2, signed=False).tolist() == [1, 3, 0, 0, 255, 0, 0]
    assert round_half_up(np.array([-2.5, 2.5])).tolist() == [-2.0, 3.0]
    assert dequantize_pow2(np.array([3, -4]), 2).tolist() == [0.75, -1.0]
    pc = quantize_pow2(np.array([[0.3, 0.3], [0.3, 0.3]]), 8, np.array([1, 3]), axis=0)
    assert pc.tolist() == [[1, 1], [2, 2]]


def test_fake_quant_equals_dequantized_integers():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 3
    for f in (QFormat(8, 5), QFormat(8, 4, False), QFormat(4, 1), QFormat(16, 11)):
        expect = dequantize_pow2(quantize_pow2(x, f.bits, f.frac, f.signed), f.frac).astype(np.float32)
        assert np.array_equal(fake_quant(x, f), expect)
    w = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    f = QFormat(8, (6, 7, 5), True, 0)
    assert np.array_equal(fake_quant(w, f),
                          dequantize_pow2(quantize_pow2(w, 8, (6, 7, 5), axis=0), (6, 7, 5), axis=0).astype(np.float32))


def test_float_kind_fake_quant_is_onnx_quantize_dequantize():
    x = np.random.default_rng(2).uniform(-1, 5, (2, 50)).astype(np.float32)
    x[0, :4] = [0.05, 0.15, -0.05, 2.55]  # ties of scale 0.1 in float32 arithmetic, or close to them
    f = QFormat(8, 0, False, fscale=0.1, zero_point=10)
    inits = [nh.from_array(np.array(0.1, np.float32), "s"), nh.from_array(np.array(10, np.uint8), "z")]
    g = h.make_graph([h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                      h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [2, 50])], [h.make_tensor_value_info("y", T.FLOAT, [2, 50])],
                     inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(fake_quant(x, f), ref)


def test_range_frac():
    # signed 8 bits: r = 3 needs m = 2 -> n = 5; r = 4 needs m = 2 (ceil(log2 4)) -> n = 5; r = 0.2 -> n = 9
    assert range_frac(np.array([3.0, 4.0, 0.2, 0.0]), 8, True).tolist() == [5, 5, 9, 7]
    assert range_frac(np.array([3.0]), 8, False).tolist() == [6]  # unsigned: all bits for magnitude


def test_choose_frac_mse_is_the_brute_force_minimum():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(4000), [17.0]])  # one mild outlier: clipping it pays off
    n0 = int(range_frac(17.0, 8, True))
    errs = {n: np.mean((np.clip(np.floor(x * 2.0 ** n + 0.5), -128, 127) / 2.0 ** n - x) ** 2)
            for n in range(n0 - 2, n0 + 3)}
    best = min(errs, key=lambda n: (errs[n], n != n0))
    assert choose_frac_mse(x, 8, True) == best > n0
    w = rng.standard_normal((4, 10)) * np.array([[0.01], [1.0], [5.0], [0.0]])
    fr = choose_frac_mse_per_channel(w, 4, axis=0)
    for c in range(3):
        assert fr[c] == choose_frac_mse(w[c], 4, True)
    assert fr[3] == 3  # an all-zero channel keeps the range-derived n (B - 1)


def test_sqnr():
    x = np.array([1.0, -2.0, 3.0])
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x + np.array([0.1, 0.0, 0.0])) == pytest.approx(10 * np.log10(14 / 0.01))
