"""numba kernels shared by the runtimes (fake quantization, requantization epilogues)."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, parallel=True, fastmath=False)
def _fq_flat(x, out, s, inv, lo, hi):
    for i in numba.prange(x.size):
        q = np.floor(x[i] * s + np.float32(0.5))
        if q < lo:
            q = lo
        elif q > hi:
            q = hi
        out[i] = q * inv


def fake_quant_scalar(x: np.ndarray, s, inv, lo, hi) -> np.ndarray:
    """``clip(floor(x*s + 0.5), lo, hi) * inv`` elementwise, float32, one pass."""
    out = np.empty_like(x)
    _fq_flat(x.reshape(-1), out.reshape(-1), s, inv, lo, hi)
    return out
