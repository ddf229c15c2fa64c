"""Gradients of the training engine against central finite differences, in float64.

Every differentiable op is checked on a small graph: the gradient of the softmax
cross-entropy of the (flattened) output with respect to every parameter and to the
graph input must match ``(L(p + h) - L(p - h)) / 2h`` to a relative error below
1e-3 (in practice ~1e-8). Plus: the forward rules equal the float runtime, the
clipped straight-through estimator, error cases.
"""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.core.errors import DataError, UnsupportedOpError
from mpqc.core.ir import Graph
from mpqc.core.qformat import QFormat, fake_quant
from mpqc.runtime.autograd import GradEngine, QuantSpec, softmax_cross_entropy, unbroadcast
from mpqc.runtime.grad_kernels import fake_quant_ste
from tests.graphs import GraphBuilder, run_float

TOL = 1e-3
H = 1e-6


def r64(*shape, seed=0, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def numeric_grad(f, arr: np.ndarray) -> np.ndarray:
    """Central differences of the scalar ``f()`` with respect to ``arr`` (perturbed in place)."""
    g = np.zeros_like(arr)
    flat, gf = arr.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + H
        lp = f()
        flat[i] = old - H
        lm = f()
        flat[i] = old
        gf[i] = (lp - lm) / (2 * H)
    return g


def rel(a, b) -> float:
    """max |a - b| / max |b|; the denominator is floored at 1e-6 so that an exactly-zero gradient
    (e.g. of a bias added to every logit) is compared absolutely against finite-difference noise."""
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-6)


def check_grads(graph: Graph, x: np.ndarray, labels: np.ndarray | None = None, *, tol: float = TOL) -> dict:
    """Compare analytic and numeric gradients for every parameter and the input; returns errors."""
    eng = GradEngine(graph, input_grads=True)
    n = len(x)
    tape = eng.forward(x)
    # the recording forward (with its own conv / pool rules) equals the float runtime
    ref = run_float(graph, {graph.inputs[0].name: x})[0]
    np.testing.assert_allclose(tape.logits, ref, rtol=1e-12, atol=1e-12)
    width = int(np.prod(tape.logits.shape[1:]))
    if labels is None:
        labels = np.arange(n) * 7 % width
    loss, d = softmax_cross_entropy(tape.logits, labels)
    grads = eng.backward(tape, d)

    def f():
        return softmax_cross_entropy(eng.forward(x, record=False).logits, labels)[0]

    errs = {}
    for v, arr in list(eng.params.items()):
        errs[v.name] = rel(grads[v], numeric_grad(f, arr))
    errs["<input>"] = rel(grads[graph.inputs[0]], numeric_grad(f, x))
    for k, e in errs.items():
        assert e < tol, f"{k}: relative error {e:.2e}"
    return errs


def single(op: str, x_shape, *consts, n_out: int = 1, **attrs):
    """x -> op(x, *consts) -> output (a trailing Softmax is followed by an Identity, so that the loss
    does not skip it)."""
    b = GraphBuilder()
    x = b.input("x", list(x_shape), np.float64)
    ins = [x] + [b.const(f"c{i}", c) if c is not None else None for i, c in enumerate(consts)]
    out = b.op(op, ins, n_out, **attrs)
    if op in ("Softmax", "LogSoftmax"):
        out = b.op("Identity", [out])
    return b.output(*(out if isinstance(out, tuple) else (out,)))


def conv_graph(x_shape, w_shape, *, bias=True, seed=1, **attrs):
    b = GraphBuilder()
    x = b.input("x", list(x_shape), np.float64)
    ins = [x, b.const("w", r64(*w_shape, seed=seed, scale=0.5))]
    if bias:
        ins.append(b.const("b", r64(w_shape[0], seed=seed + 1)))
    y = b.op("Conv", ins, **attrs)
    return b.output(y)


# --------------------------------------------------------------------------- convolution
CONV_CASES = {
    "plain3x3": ((2, 3, 6, 6), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1])),
    "no-bias-1x1": ((2, 3, 5, 5), (4, 3, 1, 1), dict(bias=False)),
    "strided-asym-pads": ((2, 3, 7, 6), (5, 3, 3, 2), dict(strides=[2, 3], pads=[1, 0, 2, 1])),
    "grouped": ((2, 4, 6, 6), (6, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1], strides=[2, 1])),
    "depthwise": ((2, 4, 6, 6), (4, 1, 3, 3), dict(group=4, pads=[1, 1, 1, 1])),
    "depthwise-strided-mult2": ((2, 3, 7, 7), (6, 1, 3, 3), dict(group=3, strides=[2, 2], pads=[0, 1, 1, 0])),
    "dilated": ((1, 2, 8, 8), (3, 2, 3, 3), dict(dilations=[2, 1], pads=[2, 1, 2, 1])),
    "conv1d": ((2, 3, 9), (4, 3, 3), dict(strides=[2], pads=[1, 1])),
    "same-upper": ((1, 2, 5, 5), (3, 2, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_gradients(case):
    xs, ws, attrs = CONV_CASES[case]
    attrs = dict(attrs)
    bias = attrs.pop("bias", True)
    g = conv_graph(xs, ws, bias=bias, **attrs)
    errs = check_grads(g, r64(*xs, seed=3))
    assert set(errs) == ({"w", "b", "<input>"} if bias else {"w", "<input>"})


# --------------------------------------------------------------------------- dense
@pytest.mark.parametrize("transA,transB,alpha,beta,cshape", [
    (0, 0, 1.0, 1.0, (5,)), (0, 1, 1.0, 1.0, (1, 5)), (1, 0, 0.5, 2.0, (3, 5)),
    (1, 1, 1.5, 1.0, ()), (0, 1, 1.0, 1.0, None)])
def test_gemm_gradients(transA, transB, alpha, beta, cshape):
    b = GraphBuilder()
    x = b.input("x", [4, 3] if transA else [3, 4], np.float64)
    w = r64(*((5, 4) if transB else (4, 5)), seed=2)
    ins = [x, b.const("w", w)]
    if cshape is not None:
        ins.append(b.const("c", r64(*cshape, seed=4) if cshape else np.float64(0.3)))
    y = b.op("Gemm", ins, transA=transA, transB=transB, alpha=alpha, beta=beta)
    g = b.output(y)
    # with transA the batch axis of x is its second one: feed x so that the output has 3 rows
    check_grads(g, r64(*((4, 3) if transA else (3, 4)), seed=5), labels=np.array([0, 4, 2]))


@pytest.mark.parametrize("xs,ws", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 4), (4,))])
def test_matmul_gradients(xs, ws):
    g = single("MatMul", xs, r64(*ws, seed=7))
    # the input and a trainable MatMul weight: MatMul's second input is a layer weight
    check_grads(g, r64(*xs, seed=8))


# --------------------------------------------------------------------------- elementwise
def two_branch(op: str, **attrs):
    """x -> Conv1x1 (a) and Conv1x1 (b) -> op(a, b): both operands carry gradients."""
    b = GraphBuilder()
    x = b.input("x", [2, 3, 4, 4], np.float64)
    a = b.op("Conv", [x, b.const("wa", r64(4, 3, 1, 1, seed=11))])
    c = b.op("Conv", [x, b.const("wb", r64(4, 3, 1, 1, seed=12)), b.const("bb", r64(4, seed=13) + 3.0)])
    y = b.op(op, [a, c], **attrs)
    return b.output(y)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Sum"])
def test_binary_gradients(op):
    check_grads(two_branch(op), r64(2, 3, 4, 4, seed=14))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_binary_broadcast_constant(op):
    c = r64(1, 3, 1, 1, seed=15) + (2.0 if op == "Div" else 0.0)
    b = GraphBuilder()
    x = b.input("x", [2, 3, 4, 4], np.float64)
    y = b.op(op, [x, b.const("c", c)])
    y2 = b.op(op, [b.const("c2", c), y])  # constant first: the gradient flows to input 1
    check_grads(b.output(y2), r64(2, 3, 4, 4, seed=16))


def test_unbroadcast_sums_expanded_axes():
    g = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    np.testing.assert_array_equal(unbroadcast(g, (3, 1)), g.sum(axis=(0, 2)).reshape(3, 1))
    np.testing.assert_array_equal(unbroadcast(g, ()), np.float64(g.sum()))
    assert unbroadcast(g, (2, 3, 4)) is g


@pytest.mark.parametrize("op,attrs,consts", [
    ("Relu", {}, ()), ("LeakyRelu", {"alpha": 0.1}, ()), ("Clip", {}, (np.float64(-0.5), np.float64(0.7))),
    ("Clip", {}, (None, np.float64(0.3))), ("Sigmoid", {}, ()), ("Tanh", {}, ()),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, ()), ("HardSwish", {}, ()), ("Neg", {}, ()),
    ("Identity", {}, ()), ("Softmax", {"axis": 1}, ()), ("LogSoftmax", {"axis": -1}, ()),
])
def test_unary_gradients(op, attrs, consts):
    scale = 4.0 if op in ("HardSigmoid", "HardSwish") else 1.0
    g = single(op, (3, 8), *consts, **attrs)
    check_grads(g, r64(3, 8, seed=21, scale=scale))


def test_batchnorm_gradient_to_input():
    g = single("BatchNormalization", (2, 3, 3, 3), r64(3, seed=1), r64(3, seed=2), r64(3, seed=3),
               np.abs(r64(3, seed=4)) + 0.5, epsilon=1e-3)
    check_grads(g, r64(2, 3, 3, 3, seed=22))


# --------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])),
    ("MaxPool", dict(kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[1, 1], dilations=[2, 2])),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 3], strides=[2, 2], ceil_mode=1)),
    ("GlobalAveragePool", {}),
])
def test_pool_gradients(op, attrs):
    g = single(op, (2, 3, 7, 7), **attrs)
    check_grads(g, r64(2, 3, 7, 7, seed=31))


def test_pool_after_conv_trains_the_conv():
    """MaxPool and GlobalAveragePool between two layers: both layers' gradients are checked."""
    b = GraphBuilder()
    x = b.input("x", [2, 2, 6, 6], np.float64)
    y = b.op("Conv", [x, b.const("w1", r64(4, 2, 3, 3, seed=1)), b.const("b1", r64(4, seed=2))], pads=[1, 1, 1, 1])
    y = b.op("Relu", [y])
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y])
    y = b.op("Gemm", [y, b.const("w2", r64(5, 4, seed=3)), b.const("b2", r64(5, seed=4))], transB=1)
    errs = check_grads(b.output(y), r64(2, 2, 6, 6, seed=5))
    assert set(errs) == {"w1", "b1", "w2", "b2", "<input>"}


# --------------------------------------------------------------------------- shape ops
def test_shape_op_gradients():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 4], np.float64)
    t = b.op("Transpose", [x], perm=[0, 2, 1])
    u = b.op("Unsqueeze", [t, b.const("ax", np.array([1]))])
    s = b.op("Squeeze", [u, b.const("ax2", np.array([1]))])
    p = b.op("Pad", [s, b.const("pads", np.array([0, 1, 0, 0, 0, 2]))])  # 2, 5, 5
    p1, p2 = b.op("Split", [p, b.const("split", np.array([2, 3]))], n_out=2, axis=1)
    c = b.op("Concat", [p2, p1, p], axis=1)  # 2, 10, 5
    r = b.op("Reshape", [c, b.const("shape", np.array([2, -1]))])
    f = b.op("Flatten", [b.op("Mul", [r, r])], axis=1)
    check_grads(b.output(f), r64(2, 3, 4, seed=41))


def test_unused_split_output_gets_zero_gradient():
    b = GraphBuilder()
    x = b.input("x", [2, 6], np.float64)
    p1, p2 = b.op("Split", [x, b.const("split", np.array([2, 4]))], n_out=2, axis=1)
    g = b.output(b.op("Relu", [p2]))
    eng = GradEngine(g, input_grads=True)
    xv = r64(2, 6, seed=1)
    tape = eng.forward(xv)
    gx = eng.backward(tape, softmax_cross_entropy(tape.logits, np.array([0, 1]))[1])[g.inputs[0]]
    assert np.all(gx[:, :2] == 0) and np.any(gx[:, 2:] != 0)
    check_grads(g, xv)


# --------------------------------------------------------------------------- loss
def test_softmax_cross_entropy_matches_finite_differences():
    z = r64(4, 6, seed=51)
    y = np.array([0, 5, 2, 2])
    loss, d = softmax_cross_entropy(z, y)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(4), y])), rel=1e-12)
    assert rel(d, numeric_grad(lambda: softmax_cross_entropy(z, y)[0], z)) < 1e-6
    soft = np.abs(r64(4, 6, seed=52))
    soft /= soft.sum(1, keepdims=True)
    ls, ds = softmax_cross_entropy(z, soft)
    assert ls == pytest.approx(-np.sum(soft * np.log(p)) / 4, rel=1e-12)
    assert rel(ds, numeric_grad(lambda: softmax_cross_entropy(z, soft)[0], z)) < 1e-6


def test_softmax_cross_entropy_rejects_bad_labels():
    with pytest.raises(DataError, match="class indices"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))


def test_trailing_softmax_is_skipped():
    b = GraphBuilder()
    x = b.input("x", [2, 3], np.float64)
    z = b.op("Gemm", [x, b.const("w", r64(4, 3, seed=1))], transB=1)
    g = b.output(b.op("Softmax", [z], axis=1))
    eng = GradEngine(g)
    assert eng.logits_value is z and eng.softmax_node is g.nodes[-1]
    assert [n.op_type for n in eng.nodes] == ["Gemm"]
    xv = r64(2, 3, seed=2)
    np.testing.assert_allclose(eng.forward(xv).logits, xv @ g.nodes[0].inputs[1].const.T)


# --------------------------------------------------------------------------- straight-through estimator
def test_fake_quant_ste_matches_fake_quant_and_masks_saturation():
    x = np.array([-3.0, -1.0, -0.26, 0.0, 0.3, 0.99, 1.2, 5.0], np.float32)
    fmt = QFormat(4, 2, True)  # step 0.25, range [-2, 1.75]
    q, m = fake_quant_ste(x, fmt)
    np.testing.assert_array_equal(q, fake_quant(x, fmt))
    np.testing.assert_array_equal(m, [0, 1, 1, 1, 1, 1, 1, 0])
    w = r64(3, 4, seed=1).astype(np.float32) * 3
    pc = QFormat(4, (1, 2, 3), True, 0)
    qw, mw = fake_quant_ste(w, pc)
    np.testing.assert_array_equal(qw, fake_quant(w, pc))
    qi = np.floor(w * np.array([2.0, 4.0, 8.0], np.float32)[:, None] + np.float32(0.5))
    np.testing.assert_array_equal(mw, ((qi >= -8) & (qi <= 7)).astype(np.float32))
    assert 0 < mw.sum() < mw.size
    q64, m64 = fake_quant_ste(x.astype(np.float64), fmt)
    assert q64.dtype == np.float64 and np.array_equal(q64, q) and np.array_equal(m64, m)


def test_quantized_training_uses_clipped_straight_through_gradients():
    """x -> Gemm(W, b) -> logits with W, b and the logits fake-quantized: the gradient is the float
    gradient at the quantized values, zeroed where W or a logit saturated."""
    b = GraphBuilder()
    x = b.input("x", [4, 3], np.float32)
    w = (r64(5, 3, seed=1) * 2.5).astype(np.float32)
    bias = r64(5, seed=2).astype(np.float32)
    z = b.op("Gemm", [x, b.const("w", w), b.const("b", bias)], transB=1)
    g = b.output(z)
    node = g.nodes[0]
    wf, bf, zf = QFormat(4, 2, True), QFormat(16, 8, True), QFormat(6, 3, True)
    spec = QuantSpec(act={z: zf}, weight={node: wf}, bias={node: bf})
    eng = GradEngine(g, quant=spec)
    xv = r64(4, 3, seed=3).astype(np.float32)
    y = np.array([0, 1, 4, 2])
    loss, grads, logits = eng.loss_and_grads(xv, y)
    wq, mw = fake_quant_ste(w, wf)
    bq, mb = fake_quant_ste(bias, bf)
    pre = xv @ wq.T + bq
    zq, mz = fake_quant_ste(pre, zf)
    np.testing.assert_array_equal(logits, zq)
    assert 0 < mw.sum() < mw.size and 0 < mz.sum() < mz.size  # the case exercises both kinds of clipping
    _, d = softmax_cross_entropy(zq, y)
    dpre = d * mz
    np.testing.assert_allclose(grads[node.inputs[1]], (dpre.T @ xv) * mw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads[node.inputs[2]], dpre.sum(0) * mb, rtol=1e-5, atol=1e-7)
    # without the spec the same engine is plain float training
    lf, gf, zf_ = GradEngine(g).loss_and_grads(xv, y)
    np.testing.assert_allclose(zf_, xv @ w.T + bias, rtol=1e-6)
    assert not np.allclose(gf[node.inputs[1]], grads[node.inputs[1]])


# --------------------------------------------------------------------------- engine behaviour
def test_unsupported_op_on_the_gradient_path_is_refused():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4], np.float32)
    y = b.op("Conv", [x, b.const("w", np.ones((2, 3, 1, 1), np.float32))])
    y = b.op("LRN", [y], size=3)
    g = b.output(y)
    with pytest.raises(UnsupportedOpError, match="LRN.*no gradient rule"):
        GradEngine(g)


def test_ops_before_the_first_layer_need_no_gradient_rule():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 4, 4], np.float64)
    y = b.op("LRN", [x], size=3)  # no backward rule, but nothing upstream is trainable
    y = b.op("Conv", [y, b.const("w", r64(2, 3, 1, 1, seed=1))])
    eng = GradEngine(b.output(y))
    assert [v.name for v in eng.params] == ["w"]
    tape = eng.forward(r64(2, 3, 4, 4, seed=2))
    assert [n.op_type for n, _, _ in tape.records] == ["Conv"]


def test_write_back_assigns_new_read_only_constants():
    b = GraphBuilder()
    x = b.input("x", [2, 3], np.float32)
    wv = b.const("w", np.ones((4, 3), np.float32))
    g = b.output(b.op("Gemm", [x, wv], transB=1))
    eng = GradEngine(g)
    old = wv.const
    eng.params[wv] += 1.0
    assert np.all(wv.const == 1.0)  # the graph is untouched until write_back
    eng.write_back()
    assert wv.const is not old and np.all(wv.const == 2.0) and not wv.const.flags.writeable
    assert wv.const.dtype == np.float32
