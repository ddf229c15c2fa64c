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
    return lo if q < lo else (hi if q > hi else q)


@numba.njit(cache=True)
def requant_shift(acc, shift, lo, hi, mode, out):
    """out = clamp(round(acc * 2^-shift[c]), lo[c], hi[c]); exact for |acc * 2^-shift| < 2^52."""
    P, C, S = acc.shape
    for p in range(P):
        for c in range(C):
            m = math.ldexp(1.0, -shift[c])
            l = lo[c]
            h = hi[c]
            for s in range(S):
                q = _round(acc[p, c, s] * m, mode)
                out[p, c, s] = _clamp(q, l, h)


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
