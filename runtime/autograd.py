"""Reverse-mode differentiation over the IR (the training engine's tape).

``GradEngine(graph)`` runs the graph forward with the float kernels while
keeping what each backward rule needs (the im2col columns of a convolution, the
argmax of a max pool, ...), then runs the rules in reverse to get the gradient of
a loss with respect to the *parameters*: the constant weight and bias tensors of
the layers (Conv, ConvTranspose is refused, Gemm, MatMul). The parameters live in
the engine as writable working arrays; the graph's constants are untouched until
``write_back()`` assigns new (read-only) arrays with ``Value.set_const``.

Rules are registered per op type, like the forward ``KERNELS``:

* ``@forward_rule(op)``: ``fn(node, args) -> (outputs, saved)``; ops without one
  run their float kernel and save ``(args, outputs)``.
* ``@vjp(op)``: ``fn(node, saved, gouts, need) -> [grad per input]``, where
  ``gouts`` are the gradients of the outputs (``None`` where nothing flows back)
  and ``need[i]`` says whether input ``i`` wants a gradient.

Supported: Conv (groups, depthwise, strides, pads, dilations, any rank), Gemm
(transA/transB, alpha, beta, broadcast C), MatMul, Add, Sub, Mul, Div, Neg, Sum,
Relu, LeakyRelu, Clip, Sigmoid, Tanh, HardSigmoid, HardSwish, MaxPool,
AveragePool, GlobalAveragePool, Flatten, Reshape, Squeeze, Unsqueeze, Transpose,
Concat, Split, Pad (constant), Identity, Dropout (inference), BatchNormalization
(inference statistics; gradient to its input only), Softmax, LogSoftmax. The loss
is softmax cross-entropy on the logits (a trailing Softmax/LogSoftmax is skipped,
the loss applies it).

**Fake quantization** (``QuantSpec``): weights and biases are fake-quantized at
their formats and activations at theirs in the forward pass, exactly as the
simulator does; the backward pass is the clipped straight-through estimator: the
gradient passes unchanged where the value was inside the format's range and is
zero where it saturated. The float (shadow) weights are what SGD updates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..core.errors import CompilerError, DataError, UnsupportedOpError
from ..core.ir import Graph, Node, Value
from ..core.qformat import QFormat
from .executor import Executor
from .grad_kernels import col2im, fake_quant_ste
from .ops import KERNELS, _pad_spatial, _windows, conv_pads, conv_params, out_size

FORWARD: dict[str, Callable] = {}
BACKWARD: dict[str, Callable] = {}

#: op types whose constant second input (and third, the bias) are trainable parameters
PARAM_OPS = ("Conv", "Gemm", "MatMul")


def forward_rule(*ops: str):
    def deco(fn):
        for op in ops:
            FORWARD[op] = fn
        return fn
    return deco


def vjp(*ops: str):
    def deco(fn):
        for op in ops:
            BACKWARD[op] = fn
        return fn
    return deco


def differentiable_ops() -> tuple[str, ...]:
    return tuple(sorted(BACKWARD))


# --------------------------------------------------------------------------- helpers
def unbroadcast(g: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Sum ``g`` over the axes that numpy broadcasting expanded from ``shape``."""
    shape = tuple(int(s) for s in shape)
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead > 0:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _tap_slices(kidx, strides, dil, out_sp) -> tuple:
    """Spatial slices of the (padded) input read by kernel tap ``kidx``."""
    return tuple(slice(k * d, k * d + (o - 1) * s + 1, s) for k, s, d, o in zip(kidx, strides, dil, out_sp))


def _crop(xp: np.ndarray, begins: Sequence[int], ends: Sequence[int]) -> np.ndarray:
    nd = len(begins)
    sl = [slice(None)] * (xp.ndim - nd)
    for i in range(nd):
        sl.append(slice(begins[i], xp.shape[xp.ndim - nd + i] - ends[i]))
    return xp[tuple(sl)]


def _refuse(node: Node, what: str):
    raise UnsupportedOpError(f"node {node.name!r} ({node.op_type}): training through {what} is not supported")


# --------------------------------------------------------------------------- convolution
@forward_rule("Conv")
def f_conv(node, args):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    nd = x.ndim - 2
    strides, pads, dil = conv_params(node, x.shape, w.shape)
    if any(p < 0 for p in pads):
        _refuse(node, "negative pads")
    group = int(node.attr("group", 1))
    dt = np.result_type(x.dtype, w.dtype)
    xp = _pad_spatial(x.astype(dt, copy=False), pads)
    kernel = tuple(int(k) for k in w.shape[2:])
    out_sp = [out_size(x.shape[2 + i], kernel[i], strides[i], dil[i], pads[i], pads[i + nd]) for i in range(nd)]
    N, C = x.shape[:2]
    M = w.shape[0]
    cg, mg = C // group, M // group
    w = w.astype(dt, copy=False)
    geo = (strides, pads, dil, out_sp, group, x.shape, xp.shape)
    if group > 1 and cg == 1:  # depthwise: tap by tap
        xr = np.repeat(xp, mg, axis=1) if mg > 1 else xp
        out = np.zeros((N, M, *out_sp), dtype=dt)
        wt = w[:, 0]
        for kidx in np.ndindex(*kernel):
            out += xr[(slice(None), slice(None)) + _tap_slices(kidx, strides, dil, out_sp)] * \
                wt[(slice(None),) + kidx].reshape((1, M) + (1,) * nd)
        saved = ("dw", xr, w, geo)
    else:
        # columns laid out (N, C*K, P): the GEMM output is already (N, M, P), no transpose needed
        win = _windows(xp, kernel, strides, dil, out_sp)  # N, C, *out, *k
        perm = (0, 1) + tuple(range(2 + nd, 2 + 2 * nd)) + tuple(range(2, 2 + nd))
        P = int(np.prod(out_sp))
        K = int(np.prod(kernel))
        cols = np.ascontiguousarray(win.transpose(perm)).reshape(N, C * K, P)
        if group == 1:
            out = w.reshape(M, -1) @ cols
        else:
            out = np.empty((N, M, P), dtype=dt)
            for g in range(group):
                out[:, g * mg:(g + 1) * mg] = w[g * mg:(g + 1) * mg].reshape(mg, -1) @ \
                    cols[:, g * cg * K:(g + 1) * cg * K]
        out = out.reshape(N, M, *out_sp)
        saved = ("im2col", cols, w, geo)
    if b is not None:
        out = out + b.astype(dt, copy=False).reshape((1, M) + (1,) * nd)
    return (np.ascontiguousarray(out),), saved


@vjp("Conv")
def b_conv(node, saved, gouts, need):
    kind, data, w, (strides, pads, dil, out_sp, group, x_shape, xp_shape) = saved
    g = gouts[0]
    nd = g.ndim - 2
    N, M = g.shape[:2]
    C = x_shape[1]
    cg, mg = C // group, M // group
    kernel = tuple(int(k) for k in w.shape[2:])
    K = int(np.prod(kernel))
    grads: list = [None] * len(need)
    if len(need) > 2 and need[2]:
        grads[2] = g.sum(axis=(0,) + tuple(range(2, 2 + nd)))
    if kind == "dw":
        xr = data
        if need[1]:
            dw = np.empty_like(w)
            for kidx in np.ndindex(*kernel):
                tap = xr[(slice(None), slice(None)) + _tap_slices(kidx, strides, dil, out_sp)]
                dw[(slice(None), 0) + kidx] = np.sum(tap * g, axis=(0,) + tuple(range(2, 2 + nd)))
            grads[1] = dw
        if need[0]:
            dxr = np.zeros(xr.shape, dtype=g.dtype)
            wt = w[:, 0]
            for kidx in np.ndindex(*kernel):
                dxr[(slice(None), slice(None)) + _tap_slices(kidx, strides, dil, out_sp)] += \
                    g * wt[(slice(None),) + kidx].reshape((1, M) + (1,) * nd)
            if mg > 1:
                dxr = dxr.reshape(N, C, mg, *xp_shape[2:]).sum(axis=2)
            grads[0] = _crop(dxr, pads[:nd], pads[nd:])
        return grads
    cols = data  # N, C*K, P
    go = g.reshape(N, M, -1)
    if need[1]:
        if group == 1:
            grads[1] = np.matmul(go, cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
        else:
            dw = np.empty_like(w)
            for gi in range(group):
                dw[gi * mg:(gi + 1) * mg] = np.matmul(
                    go[:, gi * mg:(gi + 1) * mg], cols[:, gi * cg * K:(gi + 1) * cg * K].transpose(0, 2, 1)
                ).sum(axis=0).reshape(mg, cg, *kernel)
            grads[1] = dw
    if need[0]:
        if group == 1:
            dcols = w.reshape(M, -1).T @ go
        else:
            dcols = np.empty((N, C * K, go.shape[2]), dtype=go.dtype)
            for gi in range(group):
                dcols[:, gi * cg * K:(gi + 1) * cg * K] = w[gi * mg:(gi + 1) * mg].reshape(mg, -1).T @ \
                    go[:, gi * mg:(gi + 1) * mg]
        dxp = col2im(dcols.reshape(N, C, K, -1), xp_shape, kernel, strides, dil, out_sp)
        grads[0] = _crop(dxp, pads[:nd], pads[nd:])
    return grads


@forward_rule("ConvTranspose")
def f_conv_transpose(node, args):
    _refuse(node, "ConvTranspose")


# --------------------------------------------------------------------------- dense
@vjp("Gemm")
def b_gemm(node, saved, gouts, need):
    args, _ = saved
    a, b = args[0], args[1]
    c = args[2] if len(args) > 2 else None
    g = gouts[0]
    alpha = float(node.attr("alpha", 1.0))
    beta = float(node.attr("beta", 1.0))
    A = a.T if node.attr("transA", 0) else a
    B = b.T if node.attr("transB", 0) else b
    grads: list = [None] * len(need)
    if need[0]:
        dA = g @ B.T
        if alpha != 1.0:
            dA = dA * alpha
        grads[0] = dA.T if node.attr("transA", 0) else dA
    if need[1]:
        dB = A.T @ g
        if alpha != 1.0:
            dB = dB * alpha
        grads[1] = dB.T if node.attr("transB", 0) else dB
    if c is not None and len(need) > 2 and need[2]:
        grads[2] = unbroadcast(g * beta if beta != 1.0 else g, np.shape(c))
    return grads


@vjp("MatMul")
def b_matmul(node, saved, gouts, need):
    (a, b), _ = saved
    g = gouts[0]
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    g2 = g
    if a.ndim == 1:
        g2 = np.expand_dims(g2, -2)
    if b.ndim == 1:
        g2 = np.expand_dims(g2, -1)
    grads: list = [None, None]
    if need[0]:
        grads[0] = unbroadcast(g2 @ np.swapaxes(b2, -1, -2), a2.shape).reshape(a.shape)
    if need[1]:
        grads[1] = unbroadcast(np.swapaxes(a2, -1, -2) @ g2, b2.shape).reshape(b.shape)
    return grads


# --------------------------------------------------------------------------- elementwise
@vjp("Add", "Sub", "Sum")
def b_add(node, saved, gouts, need):
    args, _ = saved
    g = gouts[0]
    out = []
    for i, (a, nd_) in enumerate(zip(args, need)):
        if not nd_:
            out.append(None)
            continue
        gi = -g if (node.op_type == "Sub" and i == 1) else g
        out.append(unbroadcast(gi, np.shape(a)))
    return out


@vjp("Mul")
def b_mul(node, saved, gouts, need):
    (a, b), _ = saved
    g = gouts[0]
    return [unbroadcast(g * b, np.shape(a)) if need[0] else None,
            unbroadcast(g * a, np.shape(b)) if need[1] else None]


@vjp("Div")
def b_div(node, saved, gouts, need):
    (a, b), (y,) = saved
    g = gouts[0]
    return [unbroadcast(g / b, np.shape(a)) if need[0] else None,
            unbroadcast(-g * y / b, np.shape(b)) if need[1] else None]


@vjp("Neg")
def b_neg(node, saved, gouts, need):
    return [-gouts[0]]


@vjp("Relu")
def b_relu(node, saved, gouts, need):
    _, (y,) = saved
    return [gouts[0] * (y > 0)]


@vjp("LeakyRelu")
def b_leaky(node, saved, gouts, need):
    (x,), _ = saved
    a = float(node.attr("alpha", 0.01))
    return [np.where(x >= 0, gouts[0], gouts[0] * a)]


@vjp("Clip")
def b_clip(node, saved, gouts, need):
    args, _ = saved
    x = args[0]
    lo = args[1] if len(args) > 1 else None
    hi = args[2] if len(args) > 2 else None
    if lo is None and "min" in node.attrs:
        lo = node.attrs["min"]
    if hi is None and "max" in node.attrs:
        hi = node.attrs["max"]
    m = np.ones(x.shape, dtype=bool)
    if lo is not None:
        m &= x > np.asarray(lo, dtype=x.dtype)
    if hi is not None:
        m &= x < np.asarray(hi, dtype=x.dtype)
    return [gouts[0] * m] + [None] * (len(need) - 1)


@vjp("Sigmoid")
def b_sigmoid(node, saved, gouts, need):
    _, (y,) = saved
    return [gouts[0] * y * (1 - y)]


@vjp("Tanh")
def b_tanh(node, saved, gouts, need):
    _, (y,) = saved
    return [gouts[0] * (1 - y * y)]


@vjp("HardSigmoid")
def b_hardsigmoid(node, saved, gouts, need):
    (x,), _ = saved
    a = float(node.attr("alpha", 0.2))
    b = float(node.attr("beta", 0.5))
    t = x * a + b
    return [gouts[0] * a * ((t > 0) & (t < 1))]


@vjp("HardSwish")
def b_hardswish(node, saved, gouts, need):
    (x,), _ = saved
    t = x / 6 + 0.5
    d = np.where(t <= 0, 0.0, np.where(t >= 1, 1.0, x / 3 + 0.5)).astype(x.dtype)
    return [gouts[0] * d]


@vjp("Softmax")
def b_softmax(node, saved, gouts, need):
    _, (y,) = saved
    g = gouts[0]
    axis = int(node.attr("axis", -1))
    return [y * (g - np.sum(g * y, axis=axis, keepdims=True))]


@vjp("LogSoftmax")
def b_logsoftmax(node, saved, gouts, need):
    _, (y,) = saved
    g = gouts[0]
    axis = int(node.attr("axis", -1))
    return [g - np.exp(y) * np.sum(g, axis=axis, keepdims=True)]


@vjp("BatchNormalization")
def b_batchnorm(node, saved, gouts, need):
    (x, scale, _bias, _mean, var), _ = saved
    eps = float(node.attr("epsilon", 1e-5))
    inv = (scale / np.sqrt(var + eps)).astype(x.dtype)
    return [gouts[0] * inv.reshape((1, -1) + (1,) * (x.ndim - 2))] + [None] * 4


# --------------------------------------------------------------------------- pooling
def _pool_geometry(node, x_shape):
    nd = len(x_shape) - 2
    kernel = [int(k) for k in node.attr("kernel_shape")]
    strides = [int(s) for s in node.attr("strides", [1] * nd)]
    dil = [int(d) for d in node.attr("dilations", [1] * nd)]
    ceil = bool(node.attr("ceil_mode", 0))
    pads = conv_pads(node, list(x_shape[2:]), kernel, strides, dil)
    out_sp = [out_size(x_shape[2 + i], kernel[i], strides[i], dil[i], pads[i], pads[i + nd], ceil)
              for i in range(nd)]
    extra = [max(0, (out_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1
                 - (x_shape[2 + i] + pads[i] + pads[i + nd])) for i in range(nd)]
    full = pads[:nd] + [pads[nd + i] + extra[i] for i in range(nd)]
    return kernel, strides, dil, pads, out_sp, extra, full


@forward_rule("MaxPool")
def f_maxpool(node, args):
    x = args[0]
    if len(node.outputs) > 1 or node.attr("storage_order", 0):
        _refuse(node, "the Indices output / storage_order")
    kernel, strides, dil, pads, out_sp, extra, full = _pool_geometry(node, x.shape)
    nd = x.ndim - 2
    xp = _pad_spatial(x, full, -np.inf)
    win = _windows(xp, kernel, strides, dil, out_sp)
    flat = win.reshape(*win.shape[:2 + nd], -1)
    arg = np.argmax(flat, axis=-1)
    y = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0].astype(x.dtype)
    return (y,), (arg, xp.shape, (kernel, strides, dil, out_sp, full))


@vjp("MaxPool")
def b_maxpool(node, saved, gouts, need):
    arg, xp_shape, (kernel, strides, dil, out_sp, full) = saved
    g = gouts[0]
    nd = g.ndim - 2
    dxp = np.zeros(xp_shape, dtype=g.dtype)
    for t, kidx in enumerate(np.ndindex(*kernel)):
        dxp[(slice(None), slice(None)) + _tap_slices(kidx, strides, dil, out_sp)] += np.where(arg == t, g, 0)
    return [_crop(dxp, full[:nd], full[nd:])]


@vjp("AveragePool")
def b_avgpool(node, saved, gouts, need):
    (x,), _ = saved
    g = gouts[0]
    nd = x.ndim - 2
    kernel, strides, dil, pads, out_sp, extra, full = _pool_geometry(node, x.shape)
    ones = np.ones((1, 1) + tuple(x.shape[2:]))
    if node.attr("count_include_pad", 0):
        ones_p = _pad_spatial(ones, pads, 1.0)
        ones_p = _pad_spatial(ones_p, [0] * nd + extra, 0.0)
    else:
        ones_p = _pad_spatial(ones, full, 0.0)
    cnt = np.sum(_windows(ones_p, kernel, strides, dil, out_sp), axis=tuple(range(-nd, 0)))
    gs = (g / cnt).astype(g.dtype)
    dxp = np.zeros((x.shape[0], x.shape[1]) + tuple(x.shape[2 + i] + full[i] + full[i + nd] for i in range(nd)),
                   dtype=g.dtype)
    for kidx in np.ndindex(*kernel):
        dxp[(slice(None), slice(None)) + _tap_slices(kidx, strides, dil, out_sp)] += gs
    return [_crop(dxp, full[:nd], full[nd:])]


@vjp("GlobalAveragePool")
def b_gap(node, saved, gouts, need):
    (x,), _ = saved
    n = int(np.prod(x.shape[2:]))
    return [np.broadcast_to(gouts[0] / n, x.shape).astype(gouts[0].dtype)]


# --------------------------------------------------------------------------- shape and data movement
@vjp("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout")
def b_reshape(node, saved, gouts, need):
    args, _ = saved
    return [gouts[0].reshape(np.shape(args[0]))] + [None] * (len(need) - 1)


@vjp("Transpose")
def b_transpose(node, saved, gouts, need):
    (x,), _ = saved
    perm = node.attr("perm")
    perm = list(range(x.ndim))[::-1] if perm is None else [int(p) for p in perm]
    return [np.transpose(gouts[0], np.argsort(perm))]


@vjp("Concat")
def b_concat(node, saved, gouts, need):
    args, _ = saved
    axis = int(node.attr("axis"))
    g = gouts[0]
    out, start = [], 0
    for a, nd_ in zip(args, need):
        if a is None:
            out.append(None)
            continue
        size = a.shape[axis]
        if nd_:
            sl = [slice(None)] * g.ndim
            sl[axis] = slice(start, start + size)
            out.append(g[tuple(sl)])
        else:
            out.append(None)
        start += size
    return out


@vjp("Split")
def b_split(node, saved, gouts, need):
    args, outs = saved
    axis = int(node.attr("axis", 0))
    parts = [g if g is not None else np.zeros_like(o) for g, o in zip(gouts, outs)]
    return [np.concatenate(parts, axis=axis)] + [None] * (len(need) - 1)


@vjp("Pad")
def b_pad(node, saved, gouts, need):
    args, _ = saved
    x = args[0]
    mode = node.attr("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    pads = args[1] if len(args) > 1 and args[1] is not None else node.attr("pads")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if mode != "constant" or (len(args) > 3 and args[3] is not None) or any(p < 0 for p in pads):
        _refuse(node, f"Pad mode={mode} with axes or negative pads")
    r = x.ndim
    sl = tuple(slice(pads[i], pads[i] + x.shape[i]) for i in range(r))
    return [gouts[0][sl]] + [None] * (len(need) - 1)


# --------------------------------------------------------------------------- loss
def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy over the batch and its gradient with respect to ``logits``.

    ``labels`` are class indices (N,) or target distributions shaped like the logits.
    """
    z = logits.reshape(len(logits), -1)
    m = np.max(z, axis=1, keepdims=True)
    e = np.exp(z - m)
    s = np.sum(e, axis=1, keepdims=True)
    logp = z - m - np.log(s)
    p = e / s
    n = len(z)
    labels = np.asarray(labels)
    if labels.ndim == 1:
        idx = labels.astype(np.int64)
        if np.any(idx < 0) or np.any(idx >= z.shape[1]):
            raise DataError(f"labels must be class indices in [0, {z.shape[1]}); got values in "
                            f"[{int(idx.min())}, {int(idx.max())}]")
        loss = -float(np.mean(logp[np.arange(n), idx]))
        d = p.copy()
        d[np.arange(n), idx] -= 1
    else:
        t = labels.reshape(n, -1).astype(z.dtype)
        loss = -float(np.sum(t * logp) / n)
        d = p * t.sum(axis=1, keepdims=True) - t
    return loss, (d / n).astype(logits.dtype).reshape(logits.shape)


# --------------------------------------------------------------------------- quantization spec
@dataclass(eq=False)
class QuantSpec:
    """Formats used by fake-quantized training: activations per Value, weights and biases per layer."""
    act: dict[Value, QFormat] = field(default_factory=dict)
    weight: dict[Node, QFormat] = field(default_factory=dict)
    bias: dict[Node, QFormat] = field(default_factory=dict)

    @classmethod
    def from_ir(cls, graph: Graph) -> "QuantSpec":
        """The formats written on the IR (``node.qconfig``, ``value.qformat``), as ``ir_node_fn`` uses them."""
        spec = cls()
        for v in graph.values():
            if not v.is_const and v.qformat is not None:
                spec.act[v] = v.qformat
        for n in graph.layers():
            q = n.qconfig
            if q is not None and q.weight_format is not None:
                spec.weight[n] = q.weight_format
                if q.bias_format is not None and n.bias is not None:
                    spec.bias[n] = q.bias_format
        return spec

    @classmethod
    def from_config(cls, plan, table, config) -> "QuantSpec":
        """The formats of ``config`` in a FormatTable, as ``QuantSim`` uses them (layout points skipped:
        they pass integers through unchanged)."""
        fmts = table.formats(config)
        spec = cls()
        for v, p in plan.points.items():
            if p.kind != "layout":
                spec.act[v] = fmts[v]
        for n in plan.layers:
            wf = table.weight_format(n, config.bits[n][0])
            spec.weight[n] = wf
            if n.bias is not None:
                spec.bias[n] = table.bias_format(n, fmts[n.inputs[0]], wf)
        return spec

    def __bool__(self) -> bool:
        return bool(self.act or self.weight)


# --------------------------------------------------------------------------- the engine
def trainable_params(graph: Graph) -> list[Value]:
    """The weight and bias constants of the graph's layers, in graph order, each once."""
    out: dict[int, Value] = {}
    for n in graph.layers():
        if n.op_type not in PARAM_OPS:
            continue
        for v in (n.weight, n.bias):
            if v is not None and v.const.dtype.kind == "f":
                out.setdefault(id(v), v)
    return list(out.values())


def loss_output(graph: Graph) -> tuple[Value, Node | None]:
    """The logits the loss is computed on: the first graph output, or the input of a trailing
    Softmax/LogSoftmax (returned as the second element, it is not run while training)."""
    if not graph.outputs:
        raise CompilerError(f"graph {graph.name!r} has no outputs to train")
    out = graph.outputs[0]
    p = out.producer
    if p is not None and p.op_type in ("Softmax", "LogSoftmax"):
        x = p.inputs[0]
        axis = int(p.attr("axis", -1)) % max(1, len(x.shape or (0, 0)))
        if x.shape is None or axis == len(x.shape) - 1:
            return x, p
    return out, None


@dataclass
class Tape:
    records: list  # (node, saved, masks) in execution order
    env: dict[int, np.ndarray]
    logits: np.ndarray
    act_masks: dict[int, np.ndarray]


class GradEngine:
    """Forward with a tape and reverse-mode gradients with respect to the layer parameters."""

    def __init__(self, graph: Graph, *, params: Sequence[Value] | None = None, quant: QuantSpec | None = None,
                 dtype=None, input_grads: bool = False):
        self.graph = graph
        self.input_grads = input_grads
        self.quant = quant if quant else None
        params = trainable_params(graph) if params is None else list(params)
        self.param_values: list[Value] = params
        self.params: dict[Value, np.ndarray] = {
            v: np.array(v.const, dtype=dtype or v.const.dtype, copy=True) for v in params}
        self.logits_value, self.softmax_node = loss_output(graph)
        self.nodes: list[Node] = Executor(graph).plan([self.logits_value], graph.inputs)
        for n in self.nodes:
            if n.op_type not in BACKWARD and n.op_type not in FORWARD:
                if n.op_type not in KERNELS:
                    raise UnsupportedOpError(f"node {n.name!r}: no kernel for operator {n.op_type}")
        # values that depend on a parameter: only those carry gradients
        pids = {id(v) for v in params}
        live: set[int] = set(pids)
        if input_grads:
            live.update(id(v) for v in graph.inputs)
        for n in self.nodes:
            if any(v is not None and id(v) in live for v in n.inputs):
                if n.op_type not in BACKWARD:
                    raise UnsupportedOpError(f"node {n.name!r} ({n.op_type}): no gradient rule; mpqc trains "
                                             f"through {', '.join(differentiable_ops())}")
                live.update(id(v) for v in n.outputs)
        self._live = live
        self._pids = pids

    # -- parameters -------------------------------------------------------------------
    def layer_params(self) -> list[tuple[Node, Value, Value | None]]:
        """(layer, weight, bias) of every layer whose weight is a parameter."""
        out = []
        for n in self.graph.layers():
            w = n.weight
            if w is not None and w in self.params:
                b = n.bias
                out.append((n, w, b if b is not None and b in self.params else None))
        return out

    def write_back(self) -> None:
        """Assign the trained arrays to the graph's constants (new read-only arrays)."""
        for v, a in self.params.items():
            v.set_const(a.astype(v.const.dtype, copy=True))

    def _arg(self, v: Value | None, env: dict[int, np.ndarray]):
        if v is None:
            return None
        a = self.params.get(v)
        if a is not None:
            return a
        if v.is_const:
            return v.const
        return env[id(v)]

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: np.ndarray | dict, *, record: bool = True) -> Tape:
        feeds = x if isinstance(x, dict) else {self.graph.inputs[0]: x}
        env: dict[int, np.ndarray] = {}
        q = self.quant
        for k, a in feeds.items():
            v = k if isinstance(k, Value) else self.graph.value_by_name(k)
            if q is not None and v in q.act:
                a = fake_quant_ste(a, q.act[v])[0]
            env[id(v)] = a
        records = []
        act_masks: dict[int, np.ndarray] = {}
        for n in self.nodes:
            args = [self._arg(v, env) for v in n.inputs]
            wmask = bmask = None
            if q is not None and n in q.weight:
                args[1], wmask = fake_quant_ste(args[1], q.weight[n])
                if n in q.bias and len(args) > 2 and args[2] is not None:
                    args[2], bmask = fake_quant_ste(args[2], q.bias[n])
            tracked = record and any(id(v) in self._live for v in n.outputs)
            try:
                if tracked and n.op_type in FORWARD:
                    outs, saved = FORWARD[n.op_type](n, args)
                else:
                    res = KERNELS[n.op_type](n, *args)
                    outs = res if isinstance(res, tuple) else (res,)
                    saved = (args, outs) if tracked else None
            except CompilerError:
                raise
            except Exception as e:
                shapes = [None if a is None else tuple(np.shape(a)) for a in args]
                raise CompilerError(f"node {n.name!r} ({n.op_type}) failed on inputs of shapes {shapes}: {e}") from e
            for v, a in zip(n.outputs, outs):
                if q is not None and v in q.act:
                    a, m = fake_quant_ste(a, q.act[v])
                    if tracked:
                        act_masks[id(v)] = m
                env[id(v)] = a
            if tracked:
                records.append((n, saved, (wmask, bmask)))
        return Tape(records, env, env[id(self.logits_value)], act_masks)

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits for ``x`` (fake-quantized when the engine has a QuantSpec), without a tape."""
        outs = [self.forward(x[s:s + batch_size], record=False).logits for s in range(0, len(x), batch_size)]
        return np.concatenate(outs, axis=0)

    # -- backward ---------------------------------------------------------------------
    def backward(self, tape: Tape, dlogits: np.ndarray) -> dict[Value, np.ndarray]:
        """Gradients of the parameters (and of the graph inputs with ``input_grads``), given the
        gradient of the loss with respect to the logits."""
        grads: dict[int, np.ndarray] = {id(self.logits_value): dlogits}
        pgrads: dict[Value, np.ndarray] = {}
        for n, saved, (wmask, bmask) in reversed(tape.records):
            gouts = []
            for v in n.outputs:
                g = grads.pop(id(v), None)
                if g is not None:
                    m = tape.act_masks.get(id(v))
                    if m is not None:
                        g = g * m
                gouts.append(g)
            if all(g is None for g in gouts):
                continue
            need = [v is not None and id(v) in self._live for v in n.inputs]
            gins = BACKWARD[n.op_type](n, saved, gouts, need)
            for i, (v, gi) in enumerate(zip(n.inputs, gins)):
                if gi is None or not need[i]:
                    continue
                if id(v) in self._pids:
                    if i == 1 and wmask is not None:
                        gi = gi * wmask
                    elif i == 2 and bmask is not None:
                        gi = gi * bmask
                    prev = pgrads.get(v)
                    pgrads[v] = gi if prev is None else prev + gi
                else:
                    prev = grads.get(id(v))
                    grads[id(v)] = gi if prev is None else prev + gi
        for v in self.params:  # parameters the loss does not reach get zero gradients
            if v not in pgrads:
                pgrads[v] = np.zeros_like(self.params[v])
        if self.input_grads:  # gradients of the graph inputs, when asked for
            for v in self.graph.inputs:
                g = grads.get(id(v))
                pgrads[v] = g if g is not None else np.zeros_like(tape.env[id(v)])
        return pgrads

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[Value, np.ndarray], np.ndarray]:
        tape = self.forward(x)
        loss, d = softmax_cross_entropy(tape.logits, y)
        return loss, self.backward(tape, d), tape.logits
