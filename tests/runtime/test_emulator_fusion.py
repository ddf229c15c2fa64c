"""The emulator's fused layer epilogues (runtime/emulator.py ``_fusable``, ``_layer_requant``): a
layer whose only reader is a shift requantization runs with its bias, rounding and saturation in
one pass. The integers must be those of the unfused steps (``fuse=False``), of a by-hand int64
computation, and of onnxruntime running the QDQ model."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.lowering import lower
from mpqc.runtime.emulator import Emulator
from tests.graphs import GraphBuilder
from tests.runtime.test_emulator import dq_const, ints_of, ort_run, qdq


def _conv_net(x_shape, w, bias, out_scale, *, group=1, stride=1, pads=(0, 0, 0, 0), dil=1, act=None,
              x_dtype=np.int8, out_dtype=np.int8, rounding="half-even"):
    b = GraphBuilder("conv", opset=21)
    x = b.input("x", list(x_shape))
    xd = qdq(b, x, 1.0, x_dtype, name="x")
    M = w.shape[0]
    wd = dq_const(b, w.astype(np.int8), np.ones(M, np.float32), "w", axis=0)
    bd = dq_const(b, bias.astype(np.int32), np.ones(M, np.float32), "b", axis=0)
    y = b.op("Conv", [xd, wd, bd], name="conv", group=group, strides=[stride, stride], pads=list(pads),
             dilations=[dil, dil])
    if act == "relu":
        y = b.op("Relu", [y], name="relu")
    g = b.output(qdq(b, y, out_scale, out_dtype, name="y"))
    g.metadata["mpqc.rounding"] = rounding
    return g


def _by_hand(xi, w, bias, group, stride, pads, dil):
    """The exact int64 accumulators of a grouped convolution."""
    N, C = xi.shape[:2]
    M, cg, kh, kw = w.shape
    mg = M // group
    xp = np.pad(xi.astype(np.int64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    Ho = (xp.shape[2] - dil * (kh - 1) - 1) // stride + 1
    Wo = (xp.shape[3] - dil * (kw - 1) - 1) // stride + 1
    acc = np.zeros((N, M, Ho, Wo), np.int64)
    for m in range(M):
        g = m // mg
        for a in range(kh):
            for c in range(kw):
                win = xp[:, g * cg:(g + 1) * cg, a * dil:a * dil + (Ho - 1) * stride + 1:stride,
                         c * dil:c * dil + (Wo - 1) * stride + 1:stride]
                acc[:, m] += np.einsum("nchw,c->nhw", win, w[m, :, a, c].astype(np.int64))
    return acc + bias.reshape(1, -1, 1, 1)


def _run_both(g, x, keep=()):
    prog = lower(g)
    fused, plain = Emulator(prog), Emulator(prog, fuse=False)
    a, b = fused.run(x, keep=keep), plain.run(x, keep=keep)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    return prog, fused, a


@pytest.mark.parametrize("k,stride,pads,dil,mg,width", [
    (3, 1, (1, 1, 1, 1), 1, 1, 9),     # stride 1: the flattened-plane sums
    (5, 2, (2, 1, 1, 2), 1, 1, 11),    # stride 2, asymmetric pads: row by row
    (3, 1, (2, 2, 2, 2), 2, 2, 7),     # dilation, two outputs per input channel
    (3, 2, (0, 0, 0, 0), 1, 1, 60),    # no padding, a wide row
    (3, 1, (0, 1, 2, 0), 1, 3, 50),    # wide stride-1 plane, pads on two sides only
])
@pytest.mark.parametrize("rounding", ["half-even", "half-up"])
def test_depthwise_layer_with_its_requantization_is_exact(k, stride, pads, dil, mg, width, rounding):
    rng = np.random.default_rng(k * 100 + width)
    C = 4
    M = C * mg
    xi = rng.integers(-128, 128, (2, C, 6, width))
    w = rng.integers(-128, 128, (M, 1, k, k))
    bias = rng.integers(-5000, 5000, M)
    g = _conv_net(xi.shape, w, bias, 64.0, group=C, stride=stride, pads=pads, dil=dil, act="relu",
                  rounding=rounding)
    x = xi.astype(np.float32)
    prog, emu, out = _run_both(g, x)
    layer = next(i for i, s in enumerate(prog.steps) if s.kind == "layer")
    assert layer in emu._fused  # the fused kernel ran
    acc = np.maximum(_by_hand(xi, w, bias, C, stride, pads, dil), 0) / 64.0
    want = np.floor(acc + 0.5) if rounding == "half-up" else np.rint(acc)
    y = next(iter(out.values()))
    assert np.array_equal(ints_of(y, 64.0), np.clip(want, -128, 127).astype(np.int64))
    if rounding == "half-even":
        assert np.array_equal(y, ort_run(g, x))


def test_wide_accumulators_take_float64_and_stay_exact():
    # 16-bit activations and 8-bit weights: the lowering holds the depthwise sums in float64
    rng = np.random.default_rng(9)
    C = 3
    xi = rng.integers(-32768, 32768, (1, C, 5, 5))
    xi[0, 0] = 32767  # sums of 25 taps up to 2^27: inexact in float32
    w = np.full((C, 1, 5, 5), 127)
    bias = rng.integers(-1000, 1000, C)
    g = _conv_net(xi.shape, w, bias, 2.0 ** 12, group=C, pads=(2, 2, 2, 2), x_dtype=np.int16, out_dtype=np.int16)
    x = xi.astype(np.float32)
    prog, emu, out = _run_both(g, x)
    assert next(s for s in prog.steps if s.kind == "layer").params["dtype"] == "float64"
    acc = _by_hand(xi, w, bias, C, 1, (2, 2, 2, 2), 1)
    y = next(iter(out.values()))
    assert np.array_equal(ints_of(y, 2.0 ** 12), np.clip(np.rint(acc / 2.0 ** 12), -32768, 32767).astype(np.int64))


@pytest.mark.parametrize("shape,k,x_dtype", [((2, 16, 6, 6), 3, np.int8),   # 8-bit GEMM kernel
                                             ((2, 8, 12, 12), 1, np.int8),  # 1x1 on float BLAS
                                             ((1, 3, 9, 9), 3, np.int16)])  # 16-bit inputs: float BLAS
def test_dense_layers_with_their_requantization_are_exact(shape, k, x_dtype):
    rng = np.random.default_rng(k + shape[1])
    info = np.iinfo(x_dtype)
    xi = rng.integers(info.min, int(info.max) + 1, shape) // (1 if x_dtype == np.int8 else 64)
    w = rng.integers(-128, 128, (5, shape[1], k, k))
    bias = rng.integers(-3000, 3000, 5)
    pads = (k // 2,) * 4
    g = _conv_net(shape, w, bias, 128.0, pads=pads, x_dtype=x_dtype)
    x = xi.astype(np.float32)
    prog, emu, out = _run_both(g, x)
    assert emu._fused
    want = np.clip(np.rint(_by_hand(xi, w, bias, 1, 1, pads, 1) / 128.0), -128, 127)
    y = next(iter(out.values()))
    assert np.array_equal(ints_of(y, 128.0), want.astype(np.int64))
    assert np.array_equal(y, ort_run(g, x))


def test_gemm_with_its_requantization_is_exact():
    rng = np.random.default_rng(4)
    b = GraphBuilder("gemm", opset=21)
    xd = qdq(b, b.input("x", [6, 40]), 1.0, np.uint8, name="x")
    w = rng.integers(-128, 128, (9, 40))
    bias = rng.integers(-2000, 2000, 9)
    wd = dq_const(b, w.astype(np.int8), 1.0, "w")
    bd = dq_const(b, bias.astype(np.int32), 1.0, "b")
    g = b.output(qdq(b, b.op("Gemm", [xd, wd, bd], name="fc", transB=1), 64.0, np.int8, name="y"))
    x = rng.integers(0, 256, (6, 40)).astype(np.float32)
    _, emu, out = _run_both(g, x)
    assert emu._fused
    want = np.clip(np.rint((x.astype(np.int64) @ w.T.astype(np.int64) + bias) / 64.0), -128, 127)
    assert np.array_equal(ints_of(next(iter(out.values())), 64.0), want.astype(np.int64))


def test_kept_accumulators_and_shared_layers_are_not_fused():
    rng = np.random.default_rng(2)
    w = rng.integers(-128, 128, (4, 1, 3, 3))
    g = _conv_net((1, 4, 5, 5), w, np.zeros(4), 16.0, group=4, pads=(1, 1, 1, 1))
    prog = lower(g)
    layer = next(i for i, s in enumerate(prog.steps) if s.kind == "layer")
    acc = prog.steps[layer].outputs[0]
    x = rng.integers(-128, 128, (1, 4, 5, 5)).astype(np.float32)
    # asking for the accumulators runs the layer on its own, and they are the by-hand sums
    _, _, out = _run_both(g, x, keep=[acc])
    assert np.array_equal(out[acc], _by_hand(x.astype(np.int64), w, np.zeros(4, np.int64), 4, 1, (1, 1, 1, 1), 1))
    # a program output is never fused away
    prog.outputs.append({"name": "acc", "tensor": acc})
    assert layer not in Emulator(prog)._fused


def _chain_net(pool_pads=(0, 0, 1, 1)):
    """x -> conv 3x3 (1 channel in) -> int8 -> conv 3x3 -> relu -> uint8 -> max pool ->
    int8 at the same scale (a clip of the codes above 127) -> conv 1x1 -> int8: every tensor between
    the convolutions can stay uint8 codes channels last."""
    rng = np.random.default_rng(11)
    b = GraphBuilder("chain", opset=21)
    x = qdq(b, b.input("x", [2, 1, 8, 8]), 1.0, np.int8, name="x")
    specs = [(8, 1, 3, 64.0), (16, 8, 3, 32.0)]
    in_scale = 1.0
    for n, (m, c, k, out_scale) in enumerate(specs):
        w = dq_const(b, rng.integers(-128, 128, (m, c, k, k)).astype(np.int8), 1.0, f"w{n}")
        bias = dq_const(b, rng.integers(-500, 500, m).astype(np.int32), in_scale, f"b{n}")
        in_scale = out_scale
        y = b.op("Conv", [x, w, bias], name=f"conv{n}", pads=[1, 1, 1, 1])
        if n:  # the first activation is int8 (codes z = 128: the next layer pads with 128), the second uint8
            y = b.op("Relu", [y], name=f"relu{n}")
        x = qdq(b, y, out_scale, np.uint8 if n else np.int8, name=f"a{n}")
    x = b.op("MaxPool", [x], name="pool", kernel_shape=[2, 2], strides=[2, 2], pads=list(pool_pads))
    x = qdq(b, x, 32.0, np.int8, name="p")  # the same scale: a shift-0 requantization
    w = dq_const(b, rng.integers(-128, 128, (4, 16, 1, 1)).astype(np.int8), 1.0, "w2")
    y = b.op("Conv", [x, w], name="conv2")
    g = b.output(qdq(b, y, 16.0, np.int8, name="y"))
    g.metadata["mpqc.rounding"] = "half-even"
    return g


@pytest.mark.parametrize("pool_pads", [(0, 0, 0, 0), (0, 0, 1, 1)])
def test_codes_pass_between_8bit_convolutions_and_stay_exact(pool_pads):
    g = _chain_net(pool_pads)
    x = np.random.default_rng(1).integers(-128, 128, (2, 1, 8, 8)).astype(np.float32)
    prog, emu, out = _run_both(g, x)
    kinds = [prog.steps[j].kind for j in emu._codes_out]
    assert kinds == ["requant", "requant"]  # both uint8 activations feed 8-bit convolutions as codes
    assert sorted(prog.steps[j].op or prog.steps[j].kind for j in emu._codes_pools) == ["MaxPool", "requant"]
    assert np.array_equal(next(iter(out.values())), ort_run(g, x))
    # tensors asked for come back in the usual form, equal to the step-by-step run
    names = [prog.steps[j].outputs[0] for j in sorted(set(emu._codes_out) | emu._codes_pools)]
    _run_both(g, x, keep=names)


def test_a_layer_that_cannot_write_codes_hands_on_the_usual_form(monkeypatch):
    g = _chain_net()
    x = np.random.default_rng(2).integers(-128, 128, (2, 1, 8, 8)).astype(np.float32)
    prog = lower(g)
    want = Emulator(prog, fuse=False).run(x)
    emu = Emulator(prog)
    first = min(i for i, s in enumerate(prog.steps) if s.kind == "layer")
    real = Emulator._gemm_int8

    def decline_first(self, i, s, xx, codes_out=False):
        return None if i == first else real(self, i, s, xx, codes_out)
    monkeypatch.setattr(Emulator, "_gemm_int8", decline_first)
    got = emu.run(x)
    assert all(np.array_equal(got[k], want[k]) for k in want)
