"""numba epilogues of the fixed-point emulator (runtime/emulator.py).

Integer tensors are held in float64 (accumulators) or float32 (requantized
activations) arrays whose values are exact integers; every operation here is exact
on them (see docs/FIXED_POINT.md). Arrays arrive reshaped to ``(pre, C, post)`` so
that per-channel parameters index the middle axis.

Rounding modes: ``HALF_UP`` (floor(y + 1/2): what ``(acc + 2^(k-1)) >> k`` computes)
and ``HALF_EVEN`` (ties to the even neighbour: ONNX QuantizeLinear, onnxruntime).
The kernels are serial on purpose: they are memory-bound loops that LLVM vectorizes, and
numba's thread pool costs far more than it saves at these sizes (measured 70x slower on a
loaded 2-core machine).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from .kernels import tap_sums_flat, tap_sums_row

HALF_UP = 0
HALF_EVEN = 1
MODES = {"half-up": HALF_UP, "half-even": HALF_EVEN}


@numba.njit(cache=True, inline="always")
def _round(y, mode):
    # exact for |y| < 2^52: y + 0.5 is representable, rint rounds ties to even (IEEE default)
    if mode == 0:
        return math.floor(y + 0.5)
    return np.rint(y)


@numba.njit(cache=True, inline="always")
def _clamp(q, lo, hi):
    # min/max, not branches: LLVM emits maxsd/minsd, and scalar loops (the transposing epilogues)
    # do not pay a mispredicted branch per saturated element
    return min(max(q, lo), hi)


@numba.njit(cache=True, inline="always")
def _requant_one(acc, bias, mult, lo, hi, mode):
    """clamp(round((acc + bias) * mult), lo, hi) for one accumulator, ``acc + bias`` in float64: the
    fused epilogues' one formula (``requant_bias``, ``requant_codes``, ``depthwise_requant``)."""
    return _clamp(_round((float(acc) + bias) * mult, mode), lo, hi)


@numba.njit(cache=True)
def requant_div(acc, shift, den, lo, hi, mode, out):
    """out = clamp(round(acc * 2^-shift[c] / den), lo[c], hi[c]) for integer ``acc`` and ``den``,
    with exact integer rounding of the quotient (average pooling: den = window size)."""
    P, C, S = acc.shape
    for p in range(P):
        for c in range(C):
            k = shift[c]
            l = lo[c]
            h = hi[c]
            for s in range(S):
                d = den[p, c, s]
                if k >= 0:
                    num = acc[p, c, s]
                    dd = d * math.ldexp(1.0, k)
                else:
                    num = acc[p, c, s] * math.ldexp(1.0, -k)
                    dd = d
                # saturate first (keeps the int64 arithmetic in range, same clamped result)
                if num < (l - 1.0) * dd:
                    num = (l - 1.0) * dd
                elif num > (h + 1.0) * dd:
                    num = (h + 1.0) * dd
                ni = np.int64(num)
                di = np.int64(dd)
                if mode == 0:
                    q = (2 * ni + di) // (2 * di)
                else:
                    q = ni // di
                    r = ni - q * di
                    if 2 * r > di or (2 * r == di and q % 2 != 0):
                        q += 1
                qf = float(q)
                out[p, c, s] = _clamp(qf, l, h)


@numba.njit(cache=True)
def requant_float(acc, mult, lo, hi, out):
    """onnxruntime's requantization with a float multiplier: clamp(rint(f32(acc) * f32(mult[c])))
    computed in float32, ties to even (as MlasRequantizeOutput)."""
    P, C, S = acc.shape
    for p in range(P):
        for c in range(C):
            m = np.float32(mult[c])
            l = lo[c]
            h = hi[c]
            for s in range(S):
                y = np.float32(np.float32(acc[p, c, s]) * m)
                q = _round(float(y), 1)
                out[p, c, s] = _clamp(q, l, h)


@numba.njit(cache=True)
def quantize_pow2(x, frac, zp, lo, hi, mode, out):
    """Float input -> centered integers at scale 2^-frac: clamp(round(x * 2^frac) + zp) - zp
    (``x * 2^frac`` is exact in float64)."""
    m = math.ldexp(1.0, frac)
    n = x.size
    for i in range(n):
        q = _round(float(x[i]) * m, mode) + zp
        out[i] = _clamp(q, lo, hi) - zp


@numba.njit(cache=True)
def quantize_float(x, scale, zp, lo, hi, out):
    """ONNX QuantizeLinear with a float scale: clamp(rint(f32(x) / f32(scale)) + zp) - zp."""
    s = np.float32(scale)
    n = x.size
    for i in range(n):
        y = np.float32(np.float32(x[i]) / s)
        q = _round(float(y), 1) + zp
        out[i] = _clamp(q, lo, hi) - zp


@numba.njit(cache=True)
def clamp_channels(x, lo, hi, out):
    """out = clamp(x, lo[c], hi[c]) (a Relu/Clip on an accumulator, exact)."""
    P, C, S = x.shape
    for p in range(P):
        for c in range(C):
            l = lo[c]
            h = hi[c]
            for s in range(S):
                v = x[p, c, s]
                out[p, c, s] = l if v < l else (h if v > h else v)


def as_pcs(a: np.ndarray, axis: int | None) -> np.ndarray:
    """View ``a`` as (pre, C, post) around ``axis`` (None: one channel)."""
    if axis is None or a.ndim == 0:
        return a.reshape(1, 1, -1)
    ax = axis % a.ndim
    pre = int(np.prod(a.shape[:ax], dtype=np.int64))
    post = int(np.prod(a.shape[ax + 1:], dtype=np.int64))
    return a.reshape(pre, a.shape[ax], post)


@numba.njit(cache=True)
def requant_bias(acc, bias, shift, lo, hi, mode, out):
    """out = clamp(round((acc + bias[c]) * 2^-shift[c]), lo[c], hi[c]) (acc viewed (pre, C, post));
    exact for |(acc + bias) * 2^-shift| < 2^52. A requant step passes a zero bias; a layer whose
    only reader is a shift requantization passes its own (runtime/emulator.py ``_fusable``: one pass
    over the accumulators). ``acc + bias`` is computed in float64, exact for the integers below 2^53
    the lowering allows, so the result is the same integers as the bias added in the accumulator's
    dtype (exact by the lowering's bound) and requantized after."""
    P, C, S = acc.shape
    for p in range(P):
        for c in range(C):
            m = math.ldexp(1.0, -shift[c])
            b = bias[c]
            l = lo[c]
            h = hi[c]
            for s in range(S):
                out[p, c, s] = _requant_one(acc[p, c, s], b, m, l, h, mode)


@numba.njit(cache=True)
def requant_codes(acc, bias, shift, lo, hi, mode, z, out):
    """An integer GEMM's channels-last accumulators ``acc`` (R, C) requantized to uint8 codes
    ``clamp(round((acc + bias[c]) * 2^-shift[c]), lo[c], hi[c]) + z`` in ``out`` (R, C), the layout
    the next 8-bit GEMM reads (``lo + z >= 0``, ``hi + z <= 255``: the caller checks)."""
    R, C = acc.shape
    mult = np.empty(C)
    for c in range(C):
        mult[c] = math.ldexp(1.0, -shift[c])
    for r in range(R):
        a = acc[r]
        o = out[r]
        for c in range(C):
            o[c] = np.uint8(_requant_one(a[c], bias[c], mult[c], lo[c], hi[c], mode) + z)


@numba.njit(cache=True)
def depthwise_requant(x, w, mg, pt, pl, sh, sw, dh, dw, bias, shift, lo, hi, mode, out, plane, acc):
    """Depthwise convolution (output channel m reads input channel m // mg) with its requantization,
    one plane at a time: the input plane is copied into the zero-bordered scratch ``plane``
    (Hp + 1, Wp), the taps are summed in ``acc`` (the accumulator dtype: exact integers, as in
    runtime/kernels.py), and each output row is requantized from ``acc``. Stride 1 sums each tap over
    the flattened plane (one run of oh * Wp elements), other strides row by row. Every inner loop
    reads slices indexed from 0 (no negative-index checks), so that LLVM vectorizes it."""
    N, _, H, W = x.shape
    M = w.shape[0]
    oh, ow = out.shape[2], out.shape[3]
    Wp = plane.shape[1]
    flat = plane.reshape(-1)
    flat_sum = sh == 1 and sw == 1
    L = oh * Wp
    T = (ow - 1) * sw + 1
    for n in range(N):
        for m in range(M):
            c = m // mg
            src = x[n, c]
            for i in range(H):
                dst = plane[pt + i, pl:pl + W]
                s_row = src[i]
                for j in range(W):
                    dst[j] = s_row[j]
            e = math.ldexp(1.0, -shift[m])
            b = bias[m]
            l = lo[m]
            h = hi[m]
            if flat_sum:
                tap_sums_flat(flat, w[m, 0], acc, dh, dw, Wp, L)
                for i in range(oh):
                    o = out[n, m, i]
                    a_row = acc[i * Wp:i * Wp + ow]
                    for j in range(ow):
                        o[j] = _requant_one(a_row[j], b, e, l, h, mode)
            else:
                a_out = acc[:T:sw]
                for i in range(oh):
                    tap_sums_row(plane, w[m, 0], acc, i * sh, dh, dw, T)
                    o = out[n, m, i]
                    for j in range(ow):
                        o[j] = _requant_one(a_out[j], b, e, l, h, mode)
