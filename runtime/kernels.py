"""numba kernels shared by the runtimes (depthwise convolution).

Serial on purpose: on a loaded 2-core machine (CI runs two test workers) numba's
thread pool oversubscribes the cores and is far slower than one thread."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, fastmath=False)
def _depthwise2d(xp, w, out, mg, sh, sw, dh, dw):
    # tap by tap over whole output rows (the inner loop runs along a row: contiguous at stride 1,
    # vectorized by LLVM); each output element still sums its taps in the order (a, b) starting from
    # 0, so the result is bit for bit the per-element loop's
    N, C, _, _ = xp.shape
    M, _, kh, kw = w.shape
    oh, ow = out.shape[2], out.shape[3]
    for nm in range(N * M):
        n = nm // M
        m = nm % M
        c = m // mg
        o = out[n, m]
        for i in range(oh):
            for j in range(ow):
                o[i, j] = 0
        for a in range(kh):
            for b in range(kw):
                wv = w[m, 0, a, b]
                off = b * dw
                for i in range(oh):
                    row = xp[n, c, i * sh + a * dh]
                    orow = o[i]
                    for j in range(ow):
                        orow[j] += row[j * sw + off] * wv


def depthwise_conv2d(xp: np.ndarray, w: np.ndarray, mg: int, strides, dilations, out_sp) -> np.ndarray:
    """Depthwise (one input channel per group) 2-D convolution of an already padded input.

    Output channel m reads input channel m // mg. Accumulates in the result dtype of
    the operands (float32 for float32 inputs, float64 for exact integer emulation).
    """
    dt = np.result_type(xp.dtype, w.dtype)
    out = np.empty((xp.shape[0], w.shape[0], out_sp[0], out_sp[1]), dtype=dt)
    _depthwise2d(np.ascontiguousarray(xp, dtype=dt), np.ascontiguousarray(w, dtype=dt), out, int(mg),
                 int(strides[0]), int(strides[1]), int(dilations[0]), int(dilations[1]))
    return out
