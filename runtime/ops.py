"""Float reference kernels, one function per ONNX operator.

A kernel is ``fn(node, *inputs) -> array | tuple[array, ...]`` where ``inputs``
are numpy arrays (``None`` for omitted optional inputs). ``KERNELS`` maps op type
to kernel; the frontend refuses any op not in it. Semantics follow the ONNX
operator specification at opset 13-21 (older models are upgraded on import).
Convolutions go through im2col and BLAS (depthwise ones through a numba kernel);
pooling reduces tap by tap over strided views.

``VALIDATORS`` holds import-time checks (``validate_node``, called by the frontend)
for attribute values no kernel implements: training-mode BatchNormalization and
Dropout, MaxPool's Indices output, blocked quantization, casts to element types
outside ``SUPPORTED_DTYPES``. They raise ``UnsupportedOpError`` so that nothing
runs with a silently wrong meaning. Conformance: ``tests/runtime/test_conformance.py``
runs the onnx package's node cases, ``tests/runtime/test_light_models.py`` its
real-architecture models.
"""
from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto
from onnx.helper import tensor_dtype_to_np_dtype

from ..core.errors import UnsupportedOpError
from ..core.qformat import dequantize_linear, quantize_linear
from .kernels import depthwise_conv2d

KERNELS: dict[str, Callable] = {}


def kernel(*names: str):
    def deco(fn):
        for n in names:
            KERNELS[n] = fn
        return fn
    return deco


def _unsupported(node, what: str):
    raise UnsupportedOpError(f"node {node.name!r} ({node.op_type}): {what} is not supported")


#: element types the runtime computes in; anything else (bfloat16, float8, int4, strings...) is refused
SUPPORTED_DTYPES = frozenset(np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64))

#: import-time checks of attribute values the kernels do not implement (``fn(node)`` raises)
VALIDATORS: dict[str, Callable] = {}


def validator(*names: str):
    def deco(fn):
        for n in names:
            VALIDATORS[n] = fn
        return fn
    return deco


def validate_node(node) -> None:
    """Raise UnsupportedOpError if ``node`` uses an attribute value no kernel implements."""
    fn = VALIDATORS.get(node.op_type)
    if fn is not None:
        fn(node)


def _onnx_elem_dtype(node, elem_type: int, what: str) -> np.dtype:
    try:
        dt = np.dtype(tensor_dtype_to_np_dtype(int(elem_type)))
    except Exception:
        dt = None
    if dt is None or dt not in SUPPORTED_DTYPES:
        try:
            tname = TensorProto.DataType.Name(int(elem_type))
        except Exception:
            tname = str(elem_type)
        _unsupported(node, f"{what} of element type {tname}")
    return dt


# --------------------------------------------------------------------------- spatial helpers
def conv_pads(node, in_spatial, kernel, strides, dilations) -> list[int]:
    """Explicit pads [b1..bn, e1..en] from ``pads`` or ``auto_pad``."""
    nd = len(in_spatial)
    auto = node.attr("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("NOTSET", "", None):
        pads = list(node.attr("pads", [0] * (2 * nd)))
        return [int(p) for p in pads]
    if auto == "VALID":
        return [0] * (2 * nd)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(nd):
            out = -(-in_spatial[i] // strides[i])
            eff_k = (kernel[i] - 1) * dilations[i] + 1
            total = max(0, (out - 1) * strides[i] + eff_k - in_spatial[i])
            small, big = total // 2, total - total // 2
            if auto == "SAME_UPPER":
                begins.append(small); ends.append(big)
            else:
                begins.append(big); ends.append(small)
        return begins + ends
    _unsupported(node, f"auto_pad={auto}")


def _pad_spatial(x: np.ndarray, pads: list[int], value=0.0) -> np.ndarray:
    nd = len(pads) // 2
    if not any(pads):
        return x
    width = [(0, 0)] * (x.ndim - nd) + [(pads[i], pads[i + nd]) for i in range(nd)]
    # negative pads crop
    if any(p < 0 for p in pads):
        sl = [slice(None)] * (x.ndim - nd)
        for i in range(nd):
            b, e = pads[i], pads[i + nd]
            sl.append(slice(max(-b, 0), x.shape[x.ndim - nd + i] - max(-e, 0)))
        x = x[tuple(sl)]
        width = [(0, 0)] * (x.ndim - nd) + [(max(pads[i], 0), max(pads[i + nd], 0)) for i in range(nd)]
    return np.pad(x, width, mode="constant", constant_values=value)


def _windows(xp: np.ndarray, kernel, strides, dilations, out_spatial) -> np.ndarray:
    """View of shape (N, C, *out_spatial, *kernel) over an already padded input."""
    nd = len(kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(xp, eff, axis=tuple(range(2, 2 + nd)))
    sl = [slice(None), slice(None)]
    sl += [slice(0, (o - 1) * s + 1, s) for o, s in zip(out_spatial, strides)]
    sl += [slice(None, None, d) for d in dilations]
    return win[tuple(sl)]


def out_size(in_size, k, s, d, pb, pe, ceil=False):
    eff = (k - 1) * d + 1
    num = in_size + pb + pe - eff
    if ceil:
        o = -(-num // s) + 1
        # the last window must start inside the input or left padding
        if (o - 1) * s >= in_size + pb:
            o -= 1
        return o
    return num // s + 1


# --------------------------------------------------------------------------- convolution
def conv_nd(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, *, strides, pads, dilations,
            group: int, acc_dtype=None) -> np.ndarray:
    """N-d grouped convolution with explicit pads; ``acc_dtype`` sets the accumulation type."""
    nd = x.ndim - 2
    N, C = x.shape[:2]
    M = w.shape[0]
    kernel = w.shape[2:]
    dt = acc_dtype or np.result_type(x.dtype, w.dtype)
    out_sp = [out_size(x.shape[2 + i], kernel[i], strides[i], dilations[i], pads[i], pads[i + nd])
              for i in range(nd)]
    cg, mg = C // group, M // group
    w = w.astype(dt, copy=False)
    P = int(np.prod(out_sp))
    KK = int(np.prod(kernel))
    if group > 1 and cg == 1 and mg >= 1 and nd == 2:
        out = _depthwise2d(_pad_spatial(x.astype(dt, copy=False), pads), w, group, mg, strides, dilations, out_sp)
    elif nd == 2 and group == 1 and cg >= CHANNELS_LAST_FROM and KK > 1:
        out = _conv_channels_last(x.astype(dt, copy=False), w, pads, strides, dilations, out_sp)
    elif P >= PER_IMAGE_FROM:
        out = _conv_per_image(x.astype(dt, copy=False), w, group, pads, strides, dilations, out_sp)
    else:
        xp = _pad_spatial(x.astype(dt, copy=False), pads)
        win = _windows(xp, kernel, strides, dilations, out_sp)  # N, C, *out, *k
        outs = []
        for g in range(group):
            wg = w[g * mg:(g + 1) * mg].reshape(mg, -1)  # mg, cg*prod(k)
            xg = win[:, g * cg:(g + 1) * cg]
            # -> N, *out, cg, *k
            perm = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
            # one 2-D GEMM: a stacked (4-D) matmul would run one small GEMM per output row
            cols = np.ascontiguousarray(xg.transpose(perm)).reshape(-1, wg.shape[1])
            outs.append((cols @ wg.T).reshape(N, *out_sp, mg))  # N, *out, mg
        out = np.concatenate(outs, axis=-1) if group > 1 else outs[0]
        out = np.moveaxis(out, -1, 1)
    if b is not None:
        out = out + b.astype(dt, copy=False).reshape((1, M) + (1,) * nd)
    return np.ascontiguousarray(out)


#: output planes of at least this many positions are convolved image by image in NCHW order
#: (columns (C*k, positions), one GEMM per image, no transposes); smaller ones as one GEMM over
#: all images' positions, where per-image GEMMs would be too small (measured on the bench models)
PER_IMAGE_FROM = 64


#: 2-D convolutions (not 1x1) with at least this many input channels go through a channels-last
#: im2col: the input copied once to NHWC, whose windows are then C-long contiguous runs (measured
#: 1.3-1.8x faster than the per-image path on the digits models' 32-128 channel layers; slower on
#: 1-3 channel stems)
CHANNELS_LAST_FROM = 16


def im2col_channels_last(x, kernel, pads, strides, dilations, out_sp, *, pad_value=0, dtype=None) -> np.ndarray:
    """Columns of a 2-D convolution, channels last: ``(N*oh*ow, kh*kw*C)``, row ``(n, i, j)`` holding
    the window at output position (i, j) in the order (a, b, c). ``x`` is NCHW; it is copied once to
    a padded NHWC buffer (filled with ``pad_value``; negative pads crop), whose windows are C-long
    contiguous runs. Used by the float convolution and by the emulator's integer GEMMs."""
    N, C, H, W = x.shape
    pt, pl, pb, pr = pads
    xh = np.full((N, H + pt + pb, W + pl + pr, C), pad_value, dtype or x.dtype)
    xh[:, max(pt, 0):max(pt, 0) + H + min(pt, 0) + min(pb, 0), max(pl, 0):max(pl, 0) + W + min(pl, 0) + min(pr, 0)] = \
        x[:, :, max(-pt, 0):H - max(-pb, 0), max(-pl, 0):W - max(-pr, 0)].transpose(0, 2, 3, 1)
    return windows_channels_last(xh, kernel, strides, dilations, out_sp)


def windows_channels_last(xh, kernel, strides, dilations, out_sp) -> np.ndarray:
    """``im2col_channels_last``'s columns of an input already padded and channels last (N, Hp, Wp, C)."""
    N, C = xh.shape[0], xh.shape[3]
    kh, kw = kernel
    oh, ow = out_sp
    (sh, sw), (dh, dw) = strides, dilations
    win = sliding_window_view(xh, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
    win = win[:, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw, :, ::dh, ::dw]  # N, oh, ow, C, kh, kw
    return np.ascontiguousarray(win.transpose(0, 1, 2, 4, 5, 3)).reshape(N * oh * ow, kh * kw * C)


def weights_channels_last(w: np.ndarray) -> np.ndarray:
    """Conv weights (M, C, kh, kw) as the ``(kh*kw*C, M)`` matrix that multiplies ``im2col_channels_last``."""
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1).T)


def _conv_channels_last(x, w, pads, strides, dilations, out_sp) -> np.ndarray:
    N, M = x.shape[0], w.shape[0]
    cols = im2col_channels_last(x, w.shape[2:], pads, strides, dilations, out_sp)
    y = cols @ weights_channels_last(w)
    return y.reshape(N, -1, M).transpose(0, 2, 1).reshape(N, M, *out_sp)


def _conv_per_image(x, w, group, pads, strides, dilations, out_sp) -> np.ndarray:
    N, C = x.shape[:2]
    M = w.shape[0]
    kernel = tuple(w.shape[2:])
    P = int(np.prod(out_sp))
    KK = int(np.prod(kernel))
    cg, mg = C // group, M // group
    if all(k == 1 for k in kernel) and not any(pads) and all(s == 1 for s in strides):
        cols = x.reshape(N, C, P)  # a 1x1 convolution is a GEMM on the input as it is
    else:
        # columns by taps: one strided copy of the padded input per kernel offset
        xp = _pad_spatial(x, pads)
        cols = np.empty((N, C) + kernel + tuple(out_sp), x.dtype)
        for taps in itertools.product(*[range(k) for k in kernel]):
            sl = tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                       for t, d, o, s in zip(taps, dilations, out_sp, strides))
            cols[(slice(None), slice(None)) + taps] = xp[(slice(None), slice(None)) + sl]
        cols = cols.reshape(N, C * KK, P)
    out = np.empty((N, M, P), x.dtype)
    for g in range(group):
        wg = w[g * mg:(g + 1) * mg].reshape(mg, cg * KK)
        np.matmul(wg, cols[:, g * cg * KK:(g + 1) * cg * KK], out=out[:, g * mg:(g + 1) * mg])
    return out.reshape((N, M) + tuple(out_sp))


def _depthwise2d(xp, w, group, mg, strides, dilations, out_sp):
    # one numba pass over the output (channel c of the input feeds outputs c*mg .. c*mg+mg-1)
    return depthwise_conv2d(xp, w, mg, strides, dilations, out_sp)


def conv_params(node, x_shape, w_shape):
    nd = len(x_shape) - 2
    kernel = list(node.attr("kernel_shape", w_shape[2:]))
    strides = list(node.attr("strides", [1] * nd))
    dil = list(node.attr("dilations", [1] * nd))
    pads = conv_pads(node, list(x_shape[2:]), kernel, strides, dil)
    return strides, pads, dil


@kernel("Conv")
def k_conv(node, x, w, b=None):
    strides, pads, dil = conv_params(node, x.shape, w.shape)
    group = int(node.attr("group", 1))
    return conv_nd(x, w, b, strides=strides, pads=pads, dilations=dil, group=group)


def conv_transpose_geometry(node, x_shape, w_shape):
    """(strides, dilations, full, begins, out) of a ConvTranspose.

    ``full`` is the un-padded output extent ``(in-1)*s + (k-1)*d + 1 + output_padding``;
    the output is ``full[begin : begin + out]``, zero-extended where it runs past ``full``.
    Padding follows the ONNX spec, which onnxruntime matches: with ``output_shape`` or
    ``auto_pad=SAME_*`` the total padding is ``full - out``; SAME_UPPER puts the smaller
    half first, NOTSET and SAME_LOWER the larger half. A negative total (an output_shape
    larger than ``full``) extends the output at the end.
    """
    nd = len(x_shape) - 2
    kernel = [int(k) for k in node.attr("kernel_shape", w_shape[2:])]
    strides = [int(v) for v in node.attr("strides", [1] * nd)]
    dil = [int(v) for v in node.attr("dilations", [1] * nd)]
    out_pad = [int(v) for v in node.attr("output_padding", [0] * nd)]
    in_sp = [int(v) for v in x_shape[2:]]
    full = [(in_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 + out_pad[i] for i in range(nd)]
    auto = node.attr("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    out_shape = node.attr("output_shape")
    if auto not in ("NOTSET", "", "VALID", "SAME_UPPER", "SAME_LOWER"):
        _unsupported(node, f"auto_pad={auto}")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        if out_shape is not None:
            out = [int(v) for v in list(out_shape)[-nd:]]
        else:
            out = [in_sp[i] * strides[i] for i in range(nd)]
        begins = []
        for i in range(nd):
            total = full[i] - out[i]
            if total < 0:
                if out_shape is None:
                    # kernel extent smaller than the stride: the spec asks for in*stride outputs,
                    # onnxruntime returns fewer; refuse rather than pick one
                    _unsupported(node, "auto_pad=SAME_* with a kernel extent smaller than the stride")
                begins.append(0)
            elif auto == "SAME_UPPER":
                begins.append(total // 2)
            else:
                begins.append(total - total // 2)
    else:
        pads = [int(p) for p in node.attr("pads", [0] * (2 * nd))]
        if auto == "VALID":
            pads = [0] * (2 * nd)
        begins = pads[:nd]
        out = [full[i] - pads[i] - pads[i + nd] for i in range(nd)]
    if any(o <= 0 for o in out):
        _unsupported(node, f"an empty output (spatial size {out})")
    return strides, dil, full, begins, out


@kernel("ConvTranspose")
def k_conv_transpose(node, x, w, b=None):
    nd = x.ndim - 2
    group = int(node.attr("group", 1))
    strides, dil, full, begins, out_sp = conv_transpose_geometry(node, x.shape, w.shape)
    kernel = list(w.shape[2:])
    N, C = x.shape[:2]
    cg = C // group
    mg = w.shape[1]
    M = mg * group
    in_sp = list(x.shape[2:])
    dt = np.result_type(x.dtype, w.dtype)
    # scatter-add: full[n, m, i*s + k*d] += sum_c x[n, c, i] * w[c, m, k]; only the part of the
    # full output that lands in the requested window is accumulated
    out = np.zeros((N, M, *out_sp), dtype=dt)
    kidxs = list(np.ndindex(*kernel))
    for g in range(group):
        xg = x[:, g * cg:(g + 1) * cg].astype(dt, copy=False)  # N, cg, *in
        wg = w[g * cg:(g + 1) * cg].astype(dt, copy=False)  # cg, mg, *k
        # one GEMM for all taps: (mg*K, cg) @ (cg, N*in) -> K, N, mg, *in (contiguous per tap)
        wmat = wg.reshape(cg, mg, -1).transpose(2, 1, 0).reshape(-1, cg)  # K*mg, cg
        xmat = np.moveaxis(xg, 1, 0).reshape(cg, -1)  # cg, N*in
        contrib = (wmat @ xmat).reshape(len(kidxs), mg, N, *in_sp)
        contrib = np.swapaxes(contrib, 1, 2)  # K, N, mg, *in
        for t, kidx in enumerate(kidxs):
            dst = [slice(None), slice(g * mg, (g + 1) * mg)]
            src = [slice(None), slice(None)]
            empty = False
            for i in range(nd):
                # input position j lands at full coordinate j*s + k*d, output coordinate that - begin
                off = kidx[i] * dil[i] - begins[i]
                s = strides[i]
                j0 = max(0, -(off // s))  # first j with j*s + off >= 0
                j1 = min(in_sp[i], (out_sp[i] - 1 - off) // s + 1)  # past the last j inside out
                if j1 <= j0:
                    empty = True
                    break
                src.append(slice(j0, j1))
                dst.append(slice(j0 * s + off, (j1 - 1) * s + off + 1, s))
            if not empty:
                out[tuple(dst)] += contrib[t][tuple(src)]
    if b is not None:
        out += b.astype(dt, copy=False).reshape((1, M) + (1,) * nd)
    return out


# --------------------------------------------------------------------------- dense
@kernel("Gemm")
def k_gemm(node, a, b, c=None):
    if node.attr("transA", 0):
        a = a.T
    if node.attr("transB", 0):
        b = b.T
    y = float(node.attr("alpha", 1.0)) * (a @ b) if node.attr("alpha", 1.0) != 1.0 else a @ b
    if c is not None:
        beta = float(node.attr("beta", 1.0))
        y = y + (beta * c if beta != 1.0 else c)
    return y.astype(np.result_type(a.dtype, b.dtype), copy=False)


@kernel("MatMul")
def k_matmul(node, a, b):
    return np.matmul(a, b)


# --------------------------------------------------------------------------- elementwise
@kernel("Add")
def k_add(node, a, b):
    return (a + b).astype(np.result_type(a, b), copy=False)


@kernel("Sub")
def k_sub(node, a, b):
    return (a - b).astype(np.result_type(a, b), copy=False)


@kernel("Mul")
def k_mul(node, a, b):
    return (a * b).astype(np.result_type(a, b), copy=False)


@kernel("Div")
def k_div(node, a, b):
    if np.issubdtype(a.dtype, np.integer):
        # integer division truncates toward zero (C semantics), computed exactly
        with np.errstate(divide="ignore"):
            q = np.floor_divide(a, b)
            fix = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))
        return (q + fix).astype(a.dtype)
    return (a / b).astype(a.dtype, copy=False)


@kernel("Sum")
def k_sum(node, *xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out.astype(xs[0].dtype, copy=False)


@kernel("Max")
def k_max(node, *xs):
    out = xs[0]
    for x in xs[1:]:
        out = np.maximum(out, x)
    return out


@kernel("Min")
def k_min(node, *xs):
    out = xs[0]
    for x in xs[1:]:
        out = np.minimum(out, x)
    return out


@kernel("Neg")
def k_neg(node, x):
    return -x


@kernel("Abs")
def k_abs(node, x):
    return np.abs(x)


@kernel("Sqrt")
def k_sqrt(node, x):
    return np.sqrt(x)


@kernel("Exp")
def k_exp(node, x):
    return np.exp(x)


@kernel("Reciprocal")
def k_reciprocal(node, x):
    return (1.0 / x).astype(x.dtype)


@kernel("Pow")
def k_pow(node, x, y):
    return np.power(x, y).astype(x.dtype)


@kernel("Relu")
def k_relu(node, x):
    return np.maximum(x, np.zeros((), x.dtype))


@kernel("LeakyRelu")
def k_leaky(node, x):
    a = x.dtype.type(node.attr("alpha", 0.01))
    return np.where(x >= 0, x, x * a)


@kernel("PRelu")
def k_prelu(node, x, slope):
    return np.where(x >= 0, x, x * slope).astype(x.dtype)


@kernel("Clip")
def k_clip(node, x, lo=None, hi=None):
    if lo is None and "min" in node.attrs:
        lo = node.attrs["min"]
    if hi is None and "max" in node.attrs:
        hi = node.attrs["max"]
    out = x
    if lo is not None:
        out = np.maximum(out, np.asarray(lo, dtype=x.dtype))
    if hi is not None:
        out = np.minimum(out, np.asarray(hi, dtype=x.dtype))
    return out.astype(x.dtype, copy=False)


@kernel("Sigmoid")
def k_sigmoid(node, x):
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


@kernel("Tanh")
def k_tanh(node, x):
    return np.tanh(x)


@kernel("HardSigmoid")
def k_hardsigmoid(node, x):
    a = float(node.attr("alpha", 0.2))
    b = float(node.attr("beta", 0.5))
    return np.clip(x * x.dtype.type(a) + x.dtype.type(b), 0, 1).astype(x.dtype)


@kernel("HardSwish")
def k_hardswish(node, x):
    return (x * np.clip(x * x.dtype.type(1 / 6) + x.dtype.type(0.5), 0, 1)).astype(x.dtype)


@kernel("Softmax", "LogSoftmax")
def k_softmax(node, x):
    axis = int(node.attr("axis", -1))
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    s = np.sum(e, axis=axis, keepdims=True)
    if node.op_type == "LogSoftmax":
        return (x - m - np.log(s)).astype(x.dtype)
    return (e / s).astype(x.dtype)


def _dropout_ratio(node, ratio) -> float:
    if ratio is not None:
        return float(np.asarray(ratio).reshape(-1)[0])
    return float(node.attr("ratio", 0.5))


@validator("Dropout")
def v_dropout(node):
    tm = node.input(2)
    if tm is not None and tm.is_const and bool(np.asarray(tm.const).reshape(-1)[0]):
        r = node.input(1)
        ratio = _dropout_ratio(node, r.const if r is not None and r.is_const else None)
        if (r is not None and not r.is_const) or ratio != 0.0:
            _unsupported(node, "training_mode=True (a random mask)")


@kernel("Identity", "Dropout")
def k_identity(node, x, ratio=None, training_mode=None):
    if node.op_type == "Dropout":
        if training_mode is not None and bool(np.asarray(training_mode).reshape(-1)[0]) \
                and _dropout_ratio(node, ratio) != 0.0:
            _unsupported(node, "training_mode=True (a random mask)")
        if len(node.outputs) > 1:
            return x, np.ones(x.shape, dtype=bool)
    return x


@validator("BatchNormalization")
def v_batchnorm(node):
    if int(node.attr("training_mode", 0)) or len(node.outputs) > 1:
        _unsupported(node, "training_mode=1 (batch statistics and running-mean outputs)")


@kernel("BatchNormalization")
def k_batchnorm(node, x, scale, bias, mean, var):
    v_batchnorm(node)
    eps = float(node.attr("epsilon", 1e-5))
    shp = (1, -1) + (1,) * (x.ndim - 2)
    inv = (scale / np.sqrt(var + eps)).astype(x.dtype)
    return (x * inv.reshape(shp) + (bias - mean * inv).reshape(shp).astype(x.dtype)).astype(x.dtype)


@kernel("LRN")
def k_lrn(node, x):
    alpha = float(node.attr("alpha", 1e-4))
    beta = float(node.attr("beta", 0.75))
    bias = float(node.attr("bias", 1.0))
    size = int(node.attr("size"))
    C = x.shape[1]
    sq = (x.astype(np.float64)) ** 2
    lo, hi = (size - 1) // 2, size // 2  # floor((size-1)/2), ceil((size-1)/2)
    padded = np.pad(sq, [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
    csum = np.cumsum(padded, axis=1)
    csum = np.concatenate([np.zeros_like(csum[:, :1]), csum], axis=1)
    win = csum[:, size:size + C] - csum[:, 0:C]
    return (x / (bias + alpha / size * win) ** beta).astype(x.dtype)


# --------------------------------------------------------------------------- pooling
def _tap_reduce(xp: np.ndarray, kernel, strides, dilations, out_sp, op, acc_dtype=None) -> np.ndarray:
    """Reduce the pooling windows of an already padded input tap by tap: for each kernel
    offset one strided view, combined with ``op`` (np.maximum / np.add) in place. Much
    faster than reducing over the window axes of a sliding-window view."""
    nd = len(kernel)
    out = None
    for kidx in np.ndindex(*kernel):
        sl = (slice(None), slice(None)) + tuple(
            slice(kidx[i] * dilations[i], kidx[i] * dilations[i] + (out_sp[i] - 1) * strides[i] + 1, strides[i])
            for i in range(nd))
        v = xp[sl]
        if out is None:
            out = np.array(v, dtype=acc_dtype or v.dtype)  # a contiguous copy
        else:
            op(out, v, out=out)
    return out


def pool_geometry(node, x_shape):
    """A pooling node's ``(kernel, strides, dilations, pads, extra, out_sp)``: ``pads`` as ONNX gives
    them, ``extra`` the right padding that ceil-mode windows need on top."""
    nd = len(x_shape) - 2
    kernel = list(node.attr("kernel_shape"))
    strides = list(node.attr("strides", [1] * nd))
    dil = list(node.attr("dilations", [1] * nd))
    ceil = bool(node.attr("ceil_mode", 0))
    pads = conv_pads(node, list(x_shape[2:]), kernel, strides, dil)
    if node.attr("storage_order", 0):
        _unsupported(node, "storage_order=1")
    out_sp = [out_size(x_shape[2 + i], kernel[i], strides[i], dil[i], pads[i], pads[i + nd], ceil)
              for i in range(nd)]
    extra = [max(0, (out_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1
                 - (x_shape[2 + i] + pads[i] + pads[i + nd])) for i in range(nd)]
    return kernel, strides, dil, pads, extra, out_sp


def max_pool_channels_last(node, x: np.ndarray, fill) -> np.ndarray:
    """MaxPool of a channels-last 2-D input (N, H, W, C), channels last out; padded cells hold
    ``fill`` (the caller's smallest value: a window always holds at least one input cell)."""
    kernel, strides, dil, pads, extra, out_sp = pool_geometry(node, (x.shape[0], x.shape[3], *x.shape[1:3]))
    width = ((0, 0), (pads[0], pads[2] + extra[0]), (pads[1], pads[3] + extra[1]), (0, 0))
    xp = np.pad(x, width, constant_values=fill) if any(p for w in width for p in w) else x
    # the taps of the NCHW view are strided views of the NHWC data; the result keeps that layout
    out = _tap_reduce(xp.transpose(0, 3, 1, 2), kernel, strides, dil, out_sp, np.maximum)
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def _pool(node, x, kind: str):
    nd = x.ndim - 2
    kernel, strides, dil, pads, extra, out_sp = pool_geometry(node, x.shape)
    full_pads = pads[:nd] + [pads[nd + i] + extra[i] for i in range(nd)]
    if kind == "max":
        fill = -np.inf if np.issubdtype(x.dtype, np.floating) else np.iinfo(x.dtype).min
        xp = _pad_spatial(x, full_pads, fill)
        return _tap_reduce(xp, kernel, strides, dil, out_sp, np.maximum).astype(x.dtype, copy=False)
    acc = np.float64 if x.dtype == np.float64 else np.float32
    xp = _pad_spatial(x.astype(acc, copy=False), full_pads, 0.0)
    s = _tap_reduce(xp, kernel, strides, dil, out_sp, np.add)
    ones = np.ones((1, 1) + tuple(x.shape[2:]), dtype=acc)
    if node.attr("count_include_pad", 0):
        # padded (explicit pads) cells count, ceil-mode overhang does not
        ones_p = _pad_spatial(_pad_spatial(ones, pads, 1.0), [0] * nd + extra, 0.0)
    else:
        ones_p = _pad_spatial(ones, full_pads, 0.0)
    cnt = _tap_reduce(ones_p, kernel, strides, dil, out_sp, np.add)
    return (s / cnt).astype(x.dtype, copy=False)


@validator("MaxPool")
def v_maxpool(node):
    if len(node.outputs) > 1:
        _unsupported(node, "the Indices output")


@kernel("MaxPool")
def k_maxpool(node, x):
    y = _pool(node, x, "max")
    if len(node.outputs) > 1:
        _unsupported(node, "the Indices output")
    return y


@kernel("AveragePool")
def k_avgpool(node, x):
    return _pool(node, x, "avg")


@kernel("GlobalAveragePool")
def k_gap(node, x):
    return np.mean(x, axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float64).astype(x.dtype)


@kernel("GlobalMaxPool")
def k_gmp(node, x):
    return np.max(x, axis=tuple(range(2, x.ndim)), keepdims=True)


# --------------------------------------------------------------------------- shape and data movement
@kernel("Flatten")
def k_flatten(node, x):
    axis = int(node.attr("axis", 1))
    if axis < 0:
        axis += x.ndim
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def reshape_target(in_shape, shape, allowzero=0):
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    out = []
    for i, s in enumerate(shape):
        if s == 0 and not allowzero:
            out.append(in_shape[i])
        else:
            out.append(s)
    return out


@kernel("Reshape")
def k_reshape(node, x, shape):
    return x.reshape(reshape_target(x.shape, shape, node.attr("allowzero", 0)))


@kernel("Transpose")
def k_transpose(node, x):
    perm = node.attr("perm")
    return np.transpose(x, perm if perm is not None else None)


@kernel("Concat")
def k_concat(node, *xs):
    axis = int(node.attr("axis"))
    xs = [x for x in xs if x is not None]
    return np.concatenate(xs, axis=axis)


@kernel("Split")
def k_split(node, x, split=None):
    axis = int(node.attr("axis", 0))
    n_out = len(node.outputs)
    if split is None:
        split = node.attr("split")
    if split is None:
        size = x.shape[axis]
        n_split = node.attr("num_outputs", n_out)
        chunk = -(-size // n_split)
        split = [min(chunk, size - i * chunk) for i in range(n_split)]
    idx = np.cumsum(np.asarray(split, dtype=np.int64))[:-1]
    return tuple(np.split(x, idx, axis=axis))


@kernel("Pad")
def k_pad(node, x, pads=None, value=None, axes=None):
    mode = node.attr("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if pads is None:
        pads = node.attr("pads")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    r = x.ndim
    if axes is not None:
        axes = [int(a) % r for a in np.asarray(axes).reshape(-1)]
        full = [0] * (2 * r)
        k = len(axes)
        for i, a in enumerate(axes):
            full[a] = pads[i]
            full[a + r] = pads[i + k]
        pads = full
    cval = 0 if value is None else np.asarray(value).reshape(-1)[0] if np.asarray(value).size else 0
    if value is None and "value" in node.attrs:
        cval = node.attrs["value"]
    # negative pads crop first
    sl = tuple(slice(max(-pads[i], 0), x.shape[i] - max(-pads[i + r], 0)) for i in range(r))
    x = x[sl]
    width = [(max(pads[i], 0), max(pads[i + r], 0)) for i in range(r)]
    if mode == "constant":
        return np.pad(x, width, mode="constant", constant_values=cval).astype(x.dtype)
    if mode == "reflect":
        return np.pad(x, width, mode="reflect")
    if mode == "edge":
        return np.pad(x, width, mode="edge")
    if mode == "wrap":
        return np.pad(x, width, mode="wrap")
    _unsupported(node, f"mode={mode}")


@kernel("Shape")
def k_shape(node, x):
    shp = np.array(x.shape, dtype=np.int64)
    start = node.attr("start", 0)
    end = node.attr("end")
    return shp[start:end] if end is not None else shp[start:]


@kernel("Size")
def k_size(node, x):
    return np.array(x.size, dtype=np.int64)


@kernel("Gather")
def k_gather(node, x, idx):
    axis = int(node.attr("axis", 0))
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return np.take(x, idx, axis=axis)


@kernel("Unsqueeze")
def k_unsqueeze(node, x, axes=None):
    if axes is None:
        axes = node.attr("axes")
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    r = x.ndim + len(axes)
    axes = sorted(a % r for a in axes)
    for a in axes:
        x = np.expand_dims(x, a)
    return x


@kernel("Squeeze")
def k_squeeze(node, x, axes=None):
    if axes is None:
        axes = node.attr("axes")
    if axes is None:
        return np.squeeze(x)
    axes = tuple(int(a) % x.ndim for a in np.asarray(axes).reshape(-1))
    return np.squeeze(x, axis=axes)


@validator("Cast")
def v_cast(node):
    _onnx_elem_dtype(node, node.attr("to"), "a cast to")


@kernel("Cast")
def k_cast(node, x):
    return x.astype(_onnx_elem_dtype(node, node.attr("to"), "a cast to"))


@validator("ConstantOfShape", "Constant")
def v_constant(node):
    for key in ("value",):
        v = node.attr(key)
        if v is not None and np.asarray(v).dtype not in SUPPORTED_DTYPES:
            _unsupported(node, f"a {key} of type {np.asarray(v).dtype}")
    for key in ("value_string", "value_strings", "sparse_value"):
        if key in node.attrs:
            _unsupported(node, f"the {key} attribute")


@kernel("ConstantOfShape")
def k_constant_of_shape(node, shape):
    val = node.attr("value")
    val = np.zeros(1, np.float32) if val is None else np.asarray(val).reshape(-1)
    return np.full([int(s) for s in np.asarray(shape).reshape(-1)], val[0], dtype=val.dtype)


@kernel("Constant")
def k_constant(node):
    if "value" in node.attrs:
        return np.asarray(node.attrs["value"])
    for key, dt in (("value_float", np.float32), ("value_int", np.int64)):
        if key in node.attrs:
            return np.array(node.attrs[key], dtype=dt)
    for key, dt in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in node.attrs:
            return np.array(node.attrs[key], dtype=dt)
    _unsupported(node, "this Constant attribute")


@kernel("Slice")
def k_slice(node, x, starts=None, ends=None, axes=None, steps=None):
    if starts is None:
        starts, ends, axes = node.attr("starts"), node.attr("ends"), node.attr("axes")
    starts = np.asarray(starts).reshape(-1)
    ends = np.asarray(ends).reshape(-1)
    axes = list(range(len(starts))) if axes is None else [int(a) % x.ndim for a in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else np.asarray(steps).reshape(-1)
    sl = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        s, e, st = int(s), int(e), int(st)
        dim = x.shape[a]
        # clamp as the spec does
        if s < 0:
            s += dim
        if e < 0:
            e += dim
        if st > 0:
            s = min(max(s, 0), dim)
            e = min(max(e, 0), dim)
        else:
            s = min(max(s, -1), dim - 1)
            e = min(max(e, -1), dim - 1)
        sl[a] = slice(s, e if not (st < 0 and e == -1) else None, st)
    return x[tuple(sl)]


@kernel("Expand")
def k_expand(node, x, shape):
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    return x * np.ones(shape, dtype=x.dtype)


@kernel("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def k_reduce(node, x, axes=None):
    if axes is None:
        axes = node.attr("axes")
    keep = bool(node.attr("keepdims", 1))
    if axes is None or (isinstance(axes, np.ndarray) and axes.size == 0):
        if node.attr("noop_with_empty_axes", 0):
            return x
        ax = None
    else:
        ax = tuple(int(a) % x.ndim for a in np.asarray(axes).reshape(-1))
    if node.op_type in ("ReduceMax", "ReduceMin"):
        # the reduction of an empty set is the identity of max/min (-inf/+inf, type limits)
        big = node.op_type == "ReduceMin"
        if x.dtype == np.bool_:
            init = big
        elif np.issubdtype(x.dtype, np.integer):
            init = np.iinfo(x.dtype).max if big else np.iinfo(x.dtype).min
        else:
            init = np.inf if big else -np.inf
        fn = np.min if big else np.max
        return fn(x, axis=ax, keepdims=keep, initial=init).astype(x.dtype)
    fn = {"ReduceMean": np.mean, "ReduceSum": np.sum}[node.op_type]
    return fn(x, axis=ax, keepdims=keep).astype(x.dtype)


# --------------------------------------------------------------------------- quantization ops
@validator("QuantizeLinear", "DequantizeLinear")
def v_qdq(node):
    if int(node.attr("block_size", 0)):
        _unsupported(node, "blocked quantization (block_size)")
    if node.op_type == "QuantizeLinear":
        if int(node.attr("output_dtype", 0)):
            _onnx_elem_dtype(node, node.attr("output_dtype"), "an output_dtype")
    elif int(node.attr("output_dtype", 0)):
        _onnx_elem_dtype(node, node.attr("output_dtype"), "an output_dtype")


_QINT = frozenset(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32))


@kernel("QuantizeLinear")
def k_quantize(node, x, scale, zp=None):
    v_qdq(node)
    if zp is not None:
        out_dt = zp.dtype
    elif int(node.attr("output_dtype", 0)):
        out_dt = _onnx_elem_dtype(node, node.attr("output_dtype"), "an output_dtype")
    else:
        out_dt = np.dtype(np.uint8)
    if out_dt not in _QINT:
        _unsupported(node, f"quantization to {out_dt}")
    return quantize_linear(x, scale, zp, axis=int(node.attr("axis", 1)), out_dtype=out_dt)


@kernel("DequantizeLinear")
def k_dequantize(node, x, scale, zp=None):
    v_qdq(node)
    if x.dtype not in _QINT:
        _unsupported(node, f"dequantization of {x.dtype}")
    y = dequantize_linear(x, scale, zp, axis=int(node.attr("axis", 1)))
    out_dt = np.asarray(scale).dtype
    if int(node.attr("output_dtype", 0)):
        out_dt = _onnx_elem_dtype(node, node.attr("output_dtype"), "an output_dtype")
    return y.astype(out_dt, copy=False)


SUPPORTED_OPS = tuple(sorted(KERNELS))
