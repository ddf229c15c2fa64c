"""numba kernel of the core's fake quantization (per-tensor power-of-two formats).

Serial on purpose: on a loaded 2-core machine numba's thread pool oversubscribes
the cores and is far slower than one thread."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, fastmath=False)
def _fq_flat(x, out, s, inv, lo, hi):
    for i in range(x.size):
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
