"""numba kernels shared by the runtimes (depthwise convolution).

Serial on purpose: on a loaded 2-core machine (CI runs two test workers) numba's
thread pool oversubscribes the cores and is far slower than one thread."""
from __future__ import annotations

import numba
import numpy as np

#: stride-1 depthwise layers narrower than this run over flattened planes (measured on
#: EfficientNet-Lite0's 14x14 and 7x7 layers: 2-3x faster than row by row; wider rows are faster as rows)
FLAT_BELOW = 48


@numba.njit(cache=True, inline="always")
def tap_sums_row(plane, wm, acc, r0, dh, dw, T):
    """``acc[:T]`` = the taps (a, b) of one output row, in order from 0: ``sum wm[a, b] *
    plane[r0 + a*dh, b*dw : b*dw + T]`` (slices indexed from 0, so that LLVM vectorizes)."""
    kh, kw = wm.shape
    for k in range(T):
        acc[k] = 0
    for a in range(kh):
        row = plane[r0 + a * dh]
        for b in range(kw):
            wv = wm[a, b]
            seg = row[b * dw:b * dw + T]
            for k in range(T):
                acc[k] += seg[k] * wv


@numba.njit(cache=True, inline="always")
def tap_sums_flat(p, wm, acc, dh, dw, Wp, L):
    """``acc[:L]`` = the taps (a, b) of a stride-1 layer over a flattened padded plane ``p`` of width
    ``Wp``, one contiguous run of ``L`` elements per tap, in order from 0."""
    kh, kw = wm.shape
    for k in range(L):
        acc[k] = 0
    for a in range(kh):
        for b in range(kw):
            wv = wm[a, b]
            base = a * dh * Wp + b * dw
            seg = p[base:base + L]
            for k in range(L):
                acc[k] += seg[k] * wv


@numba.njit(cache=True, fastmath=False)
def _depthwise_rows(xp, w, out, mg, sh, sw, dh, dw):
    # row by row: each output row sums its taps (a, b) in order from 0 over a stride-1 run of the
    # padded input row (contiguous, vectorized by LLVM); a column stride > 1 computes the stride-1
    # row and keeps every sw-th element (sw times the work, but no strided loads)
    N = xp.shape[0]
    M = w.shape[0]
    oh, ow = out.shape[2], out.shape[3]
    T = (ow - 1) * sw + 1
    tmp = np.empty(T, out.dtype)
    for nm in range(N * M):
        n = nm // M
        m = nm % M
        c = m // mg
        for i in range(oh):
            acc = out[n, m, i] if sw == 1 else tmp
            tap_sums_row(xp[n, c], w[m, 0], acc, i * sh, dh, dw, T)
            if sw != 1:
                orow = out[n, m, i]
                for j in range(ow):
                    orow[j] = tmp[j * sw]


@numba.njit(cache=True, fastmath=False)
def _depthwise_flat(xf, w, out, mg, dh, dw, Wp, L):
    # stride 1, small planes: the output is computed Wp wide (the padded input's width), so that
    # one tap is one contiguous run of oh*Wp elements over the flattened plane; columns >= ow are
    # scratch, cut by the caller. Same per-element order of the taps as _depthwise_rows.
    N = xf.shape[0]
    M = w.shape[0]
    for nm in range(N * M):
        n = nm // M
        m = nm % M
        tap_sums_flat(xf[n, m // mg], w[m, 0], out[n, m], dh, dw, Wp, L)


def depthwise_conv2d(xp: np.ndarray, w: np.ndarray, mg: int, strides, dilations, out_sp) -> np.ndarray:
    """Depthwise (one input channel per group) 2-D convolution of an already padded input.

    Output channel m reads input channel m // mg. Accumulates in the result dtype of
    the operands (float32 for float32 inputs, float64 for exact integer emulation); every
    output element sums its taps in the order (a, b) starting from 0, whichever kernel runs.
    Stride-1 layers with narrow outputs run over flattened planes (one long loop per tap), the
    others row by row.
    """
    dt = np.result_type(xp.dtype, w.dtype)
    xp = np.ascontiguousarray(xp, dtype=dt)
    w = np.ascontiguousarray(w, dtype=dt)
    N, C, Hp, Wp = xp.shape
    oh, ow = int(out_sp[0]), int(out_sp[1])
    sh, sw = int(strides[0]), int(strides[1])
    dh, dw = int(dilations[0]), int(dilations[1])
    if sh == 1 and sw == 1 and ow < FLAT_BELOW:
        # one spare row: the last row's run reads up to (kw-1)*dw elements past the plane
        buf = np.zeros((N, C, Hp + 1, Wp), dt)
        buf[:, :, :Hp] = xp
        L = oh * Wp
        out = np.empty((N, w.shape[0], L), dt)
        _depthwise_flat(buf.reshape(N, C, -1), w, out, int(mg), dh, dw, Wp, L)
        return np.ascontiguousarray(out.reshape(N, -1, oh, Wp)[..., :ow])
    out = np.empty((N, w.shape[0], oh, ow), dtype=dt)
    _depthwise_rows(xp, w, out, int(mg), sh, sw, dh, dw)
    return out
