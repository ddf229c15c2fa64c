"""Fixed-point emulator on tiny QDQ graphs, checked against integers computed by hand
(Python integer arithmetic, independent of the numba kernels) and against onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mpqc.core.errors import CompilerError, DataError
from mpqc.compiler.export import to_onnx
from mpqc.core.qformat import QFormat
from mpqc.compiler.lowering import lower, run_emulator
from mpqc.runtime.emulator import Emulator
from tests.graphs import GraphBuilder


# ---------------------------------------------------------------------------- helpers
def ref_shift(acc: int, k: int, mode: str) -> int:
    """round(acc / 2^k) by hand: an arithmetic shift with the given tie rule (k <= 0: exact)."""
    if k <= 0:
        return acc << -k
    q, r = divmod(acc, 1 << k)  # floor division, 0 <= r < 2^k
    half = 1 << (k - 1)
    if mode == "half-up":
        return q + (1 if r >= half else 0)
    return q + (1 if r > half or (r == half and q % 2) else 0)


def ref_div(num: int, den: int, mode: str) -> int:
    q, r = divmod(num, den)
    if mode == "half-up":
        return q + (1 if 2 * r >= den else 0)
    return q + (1 if 2 * r > den or (2 * r == den and q % 2) else 0)


def qdq(b: GraphBuilder, x, scale: float, dtype=np.int8, zp: int = 0, name: str = "t"):
    s = b.const(f"{name}_s", np.float32(scale))
    z = b.const(f"{name}_z", np.array(zp, dtype))
    q = b.op("QuantizeLinear", [x, s, z], name=f"{name}_Q")
    return b.op("DequantizeLinear", [q, s, z], name=f"{name}_DQ")


def dq_const(b: GraphBuilder, ints: np.ndarray, scale, name: str, axis: int | None = None, fmt=None):
    c = b.const(f"{name}_q", ints)
    c.qformat = fmt
    s = b.const(f"{name}_s", np.asarray(scale, np.float32))
    attrs = {} if axis is None else {"axis": axis}
    return b.op("DequantizeLinear", [c, s], name=f"{name}_DQ", **attrs)


def conv_graph(x_shape, x_scale, x_dtype, w_int, w_scale, b_int, out_scale, out_dtype, *, act=None,
               group=1, pads=(0, 0, 0, 0), rounding="half-even"):
    b = GraphBuilder("conv", opset=21)
    x = b.input("x", x_shape)
    xd = qdq(b, x, x_scale, x_dtype, name="x")
    wd = dq_const(b, w_int.astype(np.int8), w_scale, "w", axis=0 if np.ndim(w_scale) else None)
    ins = [xd, wd]
    if b_int is not None:
        bs = np.float32(x_scale) * np.asarray(w_scale, np.float32)
        ins.append(dq_const(b, b_int.astype(np.int32), bs, "b", axis=0 if np.ndim(bs) else None))
    y = b.op("Conv", ins, name="conv", group=group, pads=list(pads))
    if act == "relu":
        y = b.op("Relu", [y], name="relu")
    out = qdq(b, y, out_scale, out_dtype, name="y")
    g = b.output(out)
    g.metadata["mpqc.rounding"] = rounding
    return g


def ort_run(graph, x, *, fused: bool = False) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not fused:  # each QuantizeLinear / DequantizeLinear and float op as the ONNX spec defines it
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    s = ort.InferenceSession(to_onnx(graph).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {graph.inputs[0].name: x})[0]


def ints_of(y: np.ndarray, scale: float) -> np.ndarray:
    q = np.asarray(y, np.float64) / scale
    assert np.array_equal(q, np.round(q))
    return q.astype(np.int64)


# ---------------------------------------------------------------------------- requantization
TIES = np.array([1, 3, 5, -1, -3, -5, 7, -7, 2, -2], np.float32)


@pytest.mark.parametrize("mode", ["half-even", "half-up"])
def test_rounding_ties_by_hand(mode):
    # 1x1 conv, weight 1: the accumulator is the input integer; output scale 2 = one right shift
    g = conv_graph([1, 1, 1, 10], 1.0, np.int8, np.ones((1, 1, 1, 1)), 1.0, None, 2.0, np.int8, rounding=mode)
    y = run_emulator(g, TIES.reshape(1, 1, 1, 10))
    got = ints_of(y, 2.0).reshape(-1).tolist()
    expect = {"half-even": [0, 2, 2, 0, -2, -2, 4, -4, 1, -1], "half-up": [1, 2, 3, 0, -1, -2, 4, -3, 1, -1]}[mode]
    assert got == expect
    assert got == [ref_shift(int(a), 1, mode) for a in TIES]


def test_half_even_is_onnxruntime_half_up_differs_by_one_lsb_at_ties_only():
    g = conv_graph([1, 1, 1, 10], 1.0, np.int8, np.ones((1, 1, 1, 1)), 1.0, None, 2.0, np.int8)
    x = TIES.reshape(1, 1, 1, 10)
    ref = ort_run(g, x)
    assert np.array_equal(run_emulator(g, x), ref)
    assert np.array_equal(ort_run(g, x, fused=True), ref)  # QLinearConv also rounds half to even
    up = run_emulator(g, x, rounding="half-up")
    diff = ints_of(up, 2.0) - ints_of(ref, 2.0)
    # the documented difference: +1 LSB exactly where the value is an odd multiple of 1/2
    # and the even neighbour is below (1/2, 5/2, -3/2, -7/2), 0 elsewhere
    assert diff.reshape(-1).tolist() == [1, 0, 1, 0, 1, 0, 0, 1, 0, 0]


@pytest.mark.parametrize("mode", ["half-even", "half-up"])
def test_saturation_signed_and_unsigned(mode):
    x = np.array([100, -100, 31, 33, 0, 127], np.float32).reshape(1, 1, 1, 6)
    # output scale 1/4: acc * 4 with frac 2 -> 400 saturates at 127, -400 at -128
    g = conv_graph([1, 1, 1, 6], 1.0, np.int8, np.ones((1, 1, 1, 1)), 1.0, None, 0.25, np.int8, rounding=mode)
    assert ints_of(run_emulator(g, x), 0.25).reshape(-1).tolist() == [127, -128, 124, 127, 0, 127]
    assert np.array_equal(run_emulator(g, x), ort_run(g, x))
    # unsigned output after Relu: [0, 255]
    g = conv_graph([1, 1, 1, 6], 1.0, np.int8, np.ones((1, 1, 1, 1)), 1.0, None, 0.25, np.uint8, act="relu",
                   rounding=mode)
    assert ints_of(run_emulator(g, x), 0.25).reshape(-1).tolist() == [255, 0, 124, 132, 0, 255]
    assert np.array_equal(run_emulator(g, x), ort_run(g, x))


def test_negative_shift_is_an_exact_left_shift():
    # x frac 1, w frac 1 -> accumulator frac 2; output frac 4 -> shift -2 (multiply by 4)
    x = np.array([0.5, -1.5, 3.0, -0.5], np.float32).reshape(1, 1, 1, 4)
    w = np.array([3]).reshape(1, 1, 1, 1)
    g = conv_graph([1, 1, 1, 4], 0.5, np.int8, w, 0.5, np.array([-1]), 1 / 16, np.int8)
    got = ints_of(run_emulator(g, x), 1 / 16).reshape(-1).tolist()
    acc = [int(v * 2) * 3 - 1 for v in x.reshape(-1)]  # integers at frac 2, bias -1
    assert got == [ref_shift(a, -2, "half-even") for a in acc] == [8, -40, 68, -16]
    prog = lower(g)
    rq = [s for s in prog.steps if s.kind == "requant"]
    assert rq[0].params["shift"] == [-2]
    assert np.array_equal(run_emulator(g, x), ort_run(g, x))


def test_per_channel_shifts_and_bias_by_hand():
    rng = np.random.default_rng(1)
    xi = rng.integers(0, 256, (2, 3, 4, 4))
    w = rng.integers(-128, 128, (4, 3, 3, 3))
    bi = rng.integers(-5000, 5000, 4)
    w_frac = np.array([7, 8, 9, 6])
    g = conv_graph([2, 3, 4, 4], 2 ** -8, np.uint8, w, 2.0 ** -w_frac, bi, 2 ** -4, np.int8, pads=(1, 1, 1, 1))
    x = (xi * 2 ** -8).astype(np.float32)
    y = ints_of(run_emulator(g, x), 2 ** -4)
    xp = np.pad(xi, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for m in range(4):
        k = 8 + int(w_frac[m]) - 4  # accumulator frac - output frac
        for n in range(2):
            for i in range(4):
                for j in range(4):
                    acc = int(np.sum(xp[n, :, i:i + 3, j:j + 3].astype(np.int64) * w[m])) + int(bi[m])
                    assert y[n, m, i, j] == min(127, max(-128, ref_shift(acc, k, "half-even")))
    assert np.array_equal(run_emulator(g, x), ort_run(g, x))


def test_depthwise_conv_by_hand():
    x = np.array([[[[1, 2], [3, 4]], [[-1, 0], [5, -2]]]], np.float32)  # 1x2x2x2, scale 1
    w = np.array([[[[1, -1], [2, 0]]], [[[3, 1], [0, -2]]]])  # 2x1x2x2: one filter per channel
    g = conv_graph([1, 2, 2, 2], 1.0, np.int8, w, np.array([1.0, 1.0]), np.array([1, -2]), 2.0, np.int8,
                   group=2, pads=(0, 0, 0, 1))
    y = ints_of(run_emulator(g, x), 2.0)
    # channel 0, output (0,0): 1*1 + 2*-1 + 3*2 + 4*0 + 1 = 6 -> 3; (0,1): 2*1 + 4*2 + 1 = 11 -> 5.5 -> 6 (even)
    # channel 1, output (0,0): -1*3 + 0*1 + 5*0 + -2*-2 - 2 = -1 -> -0.5 -> 0; (0,1): 0*3 + -2*0 - 2 = -2 -> -1
    assert y.reshape(2, 2).tolist() == [[3, 6], [0, -1]]
    assert np.array_equal(run_emulator(g, x), ort_run(g, x))
    assert np.array_equal(run_emulator(g, x), ort_run(g, x, fused=True))


def test_int4_weights_exported_as_int4_and_exact():
    rng = np.random.default_rng(2)
    w = rng.integers(-8, 8, (3, 2, 3, 3))
    b = GraphBuilder("int4", opset=21)
    x = b.input("x", [1, 2, 5, 5])
    xd = qdq(b, x, 2 ** -4, np.uint8, name="x")
    wd = dq_const(b, w.astype(np.int8), np.float32(2 ** -3) * np.ones(3, np.float32), "w", axis=0,
                  fmt=QFormat(4, (3, 3, 3), True, 0))
    y = b.op("Conv", [xd, wd], name="conv")
    g = b.output(qdq(b, y, 2 ** -2, np.int8, name="y"))
    model = to_onnx(g)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["w_q"] == onnx.TensorProto.INT4
    xi = rng.integers(0, 256, (1, 2, 5, 5))
    xv = (xi * 2 ** -4).astype(np.float32)
    got = ints_of(run_emulator(g, xv), 0.25)
    for m in range(3):
        for i in range(3):
            for j in range(3):
                acc = int(np.sum(xi[0, :, i:i + 3, j:j + 3] * w[m]))  # frac 4 + 3 = 7, output frac 2
                assert got[0, m, i, j] == min(127, max(-128, ref_shift(acc, 5, "half-even")))
    assert np.array_equal(run_emulator(g, xv), ort_run(g, xv))


def test_global_average_pool_rounds_the_exact_quotient():
    b = GraphBuilder("gap", opset=21)
    x = b.input("x", [1, 3, 2, 2])
    xd = qdq(b, x, 1.0, np.int8, name="x")
    p = b.op("GlobalAveragePool", [xd], name="gap")
    g = b.output(qdq(b, p, 1.0, np.int8, name="y"))
    x = np.array([[[[1, 2], [1, 2]], [[3, 3], [2, 2]], [[-3, -3], [-2, -2]]]], np.float32)  # sums 6, 10, -10
    for mode in ("half-even", "half-up"):
        got = ints_of(run_emulator(g, x, rounding=mode), 1.0).reshape(-1).tolist()
        assert got == [ref_div(s, 4, mode) for s in (6, 10, -10)]
    assert ints_of(run_emulator(g, x, rounding="half-up"), 1.0).reshape(-1).tolist() == [2, 3, -2]
    assert np.array_equal(run_emulator(g, x), ort_run(g, x))


def test_average_pool_with_border_counts():
    b = GraphBuilder("ap", opset=21)
    x = b.input("x", [1, 1, 3, 3])
    xd = qdq(b, x, 1.0, np.int8, name="x")
    p = b.op("AveragePool", [xd], name="ap", kernel_shape=[2, 2], pads=[1, 1, 0, 0])
    g = b.output(qdq(b, p, 1.0, np.int8, name="y"))
    xi = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    got = ints_of(run_emulator(g, xi.reshape(1, 1, 3, 3).astype(np.float32)), 1.0)[0, 0]
    xp = np.pad(xi, ((1, 0), (1, 0)))
    cnt = np.pad(np.ones((3, 3), int), ((1, 0), (1, 0)))
    for i in range(3):
        for j in range(3):
            s = int(xp[i:i + 2, j:j + 2].sum())
            c = int(cnt[i:i + 2, j:j + 2].sum())  # count_include_pad=0: real cells only
            assert got[i, j] == ref_div(s, c, "half-even")
    assert np.array_equal(run_emulator(g, xi.reshape(1, 1, 3, 3).astype(np.float32)),
                          ort_run(g, xi.reshape(1, 1, 3, 3).astype(np.float32)))


def test_add_aligns_formats_by_shifts():
    b = GraphBuilder("add", opset=21)
    x = b.input("x", [1, 4])
    a = qdq(b, x, 2 ** -3, np.int8, name="a")  # frac 3
    c = qdq(b, x, 2 ** -1, np.int8, name="c")  # frac 1
    s = b.op("Add", [a, c], name="add")
    g = b.output(qdq(b, s, 2 ** -2, np.int8, name="y"))  # frac 2
    x = np.array([[0.375, -0.625, 1.125, 2.0]], np.float32)
    ai = [round(v * 8) for v in x[0]]  # exact at frac 3
    ci = [ref_div(int(v * 8), 4, "half-even") for v in x[0]]  # round to frac 1
    got = ints_of(run_emulator(g, x), 0.25).reshape(-1).tolist()
    assert got == [ref_shift(p + 4 * q, 1, "half-even") for p, q in zip(ai, ci)]
    prog = lower(g)
    add = [st for st in prog.steps if st.kind == "add"][0]
    assert add.params["mult"] == [1.0, 4.0]
    assert np.array_equal(run_emulator(g, x), ort_run(g, x))


def test_op_without_integer_rule_runs_on_exact_reals():
    b = GraphBuilder("sig", opset=21)
    x = b.input("x", [1, 64])
    xd = qdq(b, x, 2 ** -4, np.int8, name="x")
    s = b.op("Sigmoid", [xd], name="sig")
    g = b.output(qdq(b, s, 2 ** -7, np.uint8, name="y"))
    xv = np.linspace(-4, 4, 64, dtype=np.float32).reshape(1, 64)
    got = run_emulator(g, xv)
    xi = np.clip(np.rint(xv * 16), -128, 127)
    expect = np.clip(np.rint(1 / (1 + np.exp(-xi / 16)) * 128), 0, 255) / 128
    assert np.array_equal(got, expect.astype(np.float32))
    assert np.max(np.abs(got - ort_run(g, xv))) <= 2 ** -7  # onnxruntime's float32 sigmoid: within 1 LSB


def test_float_scale_requantization_follows_onnxruntime():
    # ort-int8 style: asymmetric uint8 activations, symmetric per-channel int8 weights, float scales
    rng = np.random.default_rng(3)
    w = rng.integers(-20, 21, (4, 3, 3, 3))
    xs = np.float32(0.0123)
    b = GraphBuilder("flt", opset=21)
    x = b.input("x", [2, 3, 6, 6])
    xd = qdq(b, x, float(xs), np.uint8, zp=37, name="x")
    wsc = np.array([0.011, 0.0042, 0.02, 0.0077], np.float32)
    wd = dq_const(b, w.astype(np.int8), wsc, "w", axis=0)
    bd = dq_const(b, rng.integers(-300, 300, 4).astype(np.int32), xs * wsc, "b", axis=0)
    y = b.op("Conv", [xd, wd, bd], name="conv", pads=[1, 1, 1, 1])
    g = b.output(qdq(b, y, 0.0371, np.uint8, zp=120, name="y"))
    xv = rng.uniform(-0.4, 2.6, (2, 3, 6, 6)).astype(np.float32)
    emu = run_emulator(g, xv)
    fused = ort_run(g, xv, fused=True)  # QLinearConv: int32 accumulator, float multiplier, ties to even
    assert np.array_equal(emu, fused)
    assert np.max(np.abs(emu - ort_run(g, xv))) <= 0.0371 * 1.0001


def test_accumulator_overflow_is_reported():
    b = GraphBuilder("ovf", opset=21)
    x = b.input("x", [1, 1024, 1, 1])
    xd = qdq(b, x, 1.0, np.int16, name="x")
    w = np.full((1, 1024, 1, 1), 127, np.int16)
    wd = dq_const(b, w, np.float32(1.0), "w")
    y = b.op("Conv", [xd, wd], name="conv")
    g = b.output(qdq(b, y, 2.0 ** 20, np.int16, name="y"))
    with pytest.raises(DataError, match="conv.*accumulator overflows"):
        run_emulator(g, np.full((1, 1024, 1, 1), 30000, np.float32))
    run_emulator(g, np.full((1, 1024, 1, 1), 300, np.float32))  # in range: fine


def test_unquantized_model_is_refused():
    b = GraphBuilder("plain")
    x = b.input("x", [1, 4])
    g = b.output(b.op("Relu", [x]))
    with pytest.raises(CompilerError, match="no quantization"):
        run_emulator(g, np.zeros((1, 4), np.float32))


def test_host_float_ops_run_before_the_input_quantizer():
    b = GraphBuilder("host", opset=21)
    x = b.input("x", [1, 4])
    h = b.op("Div", [x, b.const("d", np.float32(255.0))], name="norm")
    g = b.output(qdq(b, h, 2 ** -7, np.uint8, name="x"))
    xv = np.array([[0, 1, 128, 255]], np.float32)
    prog = lower(g)
    assert [s.kind for s in prog.steps] == ["float", "quantize", "dequantize"]
    assert np.array_equal(run_emulator(g, xv), ort_run(g, xv))
    assert np.array_equal(Emulator(prog).run(xv)[g.outputs[0].name], ort_run(g, xv))


def test_16bit_activations_exact_where_float32_accumulation_rounds():
    # sums far beyond 2^24: onnxruntime's unfused float32 Conv rounds partial sums (at most 1 LSB
    # here), the emulator accumulates in float64 and matches the integer result exactly
    rng = np.random.default_rng(4)
    C = 256
    w = rng.integers(-128, 128, (8, C, 1, 1))
    xi = rng.integers(0, 32768, (2, C, 8, 8))
    g = conv_graph([2, C, 8, 8], 2 ** -10, np.int16, w, 2.0 ** -7, None, 2 ** -5, np.int16)
    x = (xi * 2 ** -10).astype(np.float32)
    acc = np.einsum("nchw,mc->nmhw", xi.astype(np.int64), w[:, :, 0, 0].astype(np.int64))
    assert np.abs(acc).max() > 2 ** 24
    ref = np.array([[[[ref_shift(int(a), 12, "half-even") for a in row] for row in ch] for ch in n] for n in acc])
    ref = np.clip(ref, -32768, 32767)
    assert np.array_equal(ints_of(run_emulator(g, x), 2 ** -5), ref)
    assert np.max(np.abs(ints_of(ort_run(g, x), 2 ** -5) - ref)) <= 1


def test_single_channel_per_channel_weight_and_float32_hardswish():
    """A Conv with one output channel (a per-channel weight scale of one entry) lowers; HardSwish on
    16-bit activations is evaluated in float32 as the QDQ model computes it: equal to onnxruntime."""
    from mpqc.testing import run_pass
    from tests.test_o1_models import ort_outputs
    b = GraphBuilder("hs")
    x = b.input("x", ["N", 1, 32, 32])
    c = b.op("Conv", [x, b.const("w", np.full((1, 1, 1, 1), 0.75, np.float32))], name="conv")
    g = b.output(b.op("HardSwish", [c], name="hswish"))
    xs = np.random.default_rng(0).normal(0, 2, (8, 1, 32, 32)).astype(np.float32)
    run_pass(g, "choose-formats{act_bits=16},insert-qdq", target="npu8", calib=xs)
    xt = np.random.default_rng(1).normal(0, 2, (32, 1, 32, 32)).astype(np.float32)
    assert np.array_equal(run_emulator(g, xt), ort_outputs(to_onnx(g).SerializeToString(), xt))
