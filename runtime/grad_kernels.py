"""numba kernels of the training engine: fake quantization with its straight-through mask.

``fake_quant_ste(x, fmt)`` returns the fake-quantized tensor (exactly what
``core.qformat.fake_quant`` returns) together with the clipped
straight-through mask: 1 where the rounded integer fell inside the format's range
(the gradient passes), 0 where it saturated (the gradient is cut). One pass over
the data for float32 tensors, per tensor or per channel.
"""
from __future__ import annotations

import numba
import numpy as np

from ..core.qformat import QFormat, _frac_b, fake_quant, qrange


@numba.njit(cache=True, fastmath=False)
def _fq_ste_flat(x, out, mask, s, inv, lo, hi):
    for i in range(x.size):
        q = np.floor(x[i] * s + np.float32(0.5))
        if q < lo:
            q = lo
            mask[i] = 0.0
        elif q > hi:
            q = hi
            mask[i] = 0.0
        else:
            mask[i] = 1.0
        out[i] = q * inv


@numba.njit(cache=True, fastmath=False)
def _fq_ste_rows(x, out, mask, s, inv, lo, hi):
    # x: (outer, C, inner); s, inv: (C,)
    for a in range(x.shape[0]):
        for c in range(x.shape[1]):
            sc = s[c]
            iv = inv[c]
            for b in range(x.shape[2]):
                q = np.floor(x[a, c, b] * sc + np.float32(0.5))
                if q < lo:
                    q = lo
                    mask[a, c, b] = 0.0
                elif q > hi:
                    q = hi
                    mask[a, c, b] = 0.0
                else:
                    mask[a, c, b] = 1.0
                out[a, c, b] = q * iv


def fake_quant_ste(x: np.ndarray, fmt: QFormat) -> tuple[np.ndarray, np.ndarray]:
    """``(fake_quant(x, fmt), mask)``; both in ``x``'s dtype, mask is 1 where x did not saturate."""
    x = np.asarray(x)
    lo, hi = qrange(fmt.bits, fmt.signed)
    fscale = getattr(fmt, "fscale", None)
    if fscale is not None:  # float-scale kind (ort-int8): ONNX QuantizeLinear rounding, zero point
        ax = fmt.axis if fmt.axis is not None else 0
        s = np.asarray(fscale, np.float32)
        if s.ndim:
            shp = [1] * x.ndim
            shp[ax % x.ndim] = -1
            s = s.reshape(shp)
        q = np.rint(x.astype(np.float32) / s) + np.float32(getattr(fmt, "zero_point", 0))
        mask = ((q >= lo) & (q <= hi)).astype(x.dtype)
        return fake_quant(x, fmt).astype(x.dtype, copy=False), mask
    if x.dtype == np.float32 and fmt.bits <= 16:
        xc = np.ascontiguousarray(x)
        out = np.empty_like(xc)
        mask = np.empty_like(xc)
        if fmt.axis is None:
            n = int(fmt.frac)
            _fq_ste_flat(xc.reshape(-1), out.reshape(-1), mask.reshape(-1), np.float32(2.0 ** n),
                         np.float32(2.0 ** -n), np.float32(lo), np.float32(hi))
        else:
            ax = fmt.axis % x.ndim
            C = x.shape[ax]
            outer = int(np.prod(x.shape[:ax], dtype=np.int64))
            f = fmt.frac_array().reshape(-1)
            s = np.ldexp(np.float32(1.0), f).astype(np.float32)
            inv = np.ldexp(np.float32(1.0), -f).astype(np.float32)
            shp = (outer, C, -1)
            _fq_ste_rows(xc.reshape(shp), out.reshape(shp), mask.reshape(shp), s, inv, np.float32(lo),
                         np.float32(hi))
        return out, mask
    # other dtypes (float64 in gradient checks): the reference path, in x's dtype
    f = _frac_b(fmt.frac, x, fmt.axis)
    q = np.floor(np.ldexp(x.astype(np.float64), f) + 0.5)
    mask = ((q >= lo) & (q <= hi)).astype(x.dtype)
    return fake_quant(x, fmt).astype(x.dtype, copy=False), mask


@numba.njit(cache=True, fastmath=False)
def _col2im2d(dcols, dxp, kh, kw, sh, sw, dh, dw, oh, ow):
    # dcols: (N, C, kh*kw, oh*ow); dxp: (N, C, Hp, Wp), accumulated in place
    for n in range(dcols.shape[0]):
        for c in range(dcols.shape[1]):
            for i in range(kh):
                for j in range(kw):
                    t = i * kw + j
                    for a in range(oh):
                        r = i * dh + a * sh
                        for b in range(ow):
                            dxp[n, c, r, j * dw + b * sw] += dcols[n, c, t, a * ow + b]


def col2im(dcols: np.ndarray, xp_shape, kernel, strides, dilations, out_sp) -> np.ndarray:
    """Scatter-add columns ``(N, C, K, P)`` back onto a zero padded input of shape ``xp_shape``."""
    dxp = np.zeros(xp_shape, dtype=dcols.dtype)
    nd = len(kernel)
    if nd == 2:
        _col2im2d(np.ascontiguousarray(dcols), dxp, int(kernel[0]), int(kernel[1]), int(strides[0]),
                  int(strides[1]), int(dilations[0]), int(dilations[1]), int(out_sp[0]), int(out_sp[1]))
        return dxp
    N, C = dcols.shape[:2]
    for t, kidx in enumerate(np.ndindex(*kernel)):
        sl = tuple(slice(k * d, k * d + (o - 1) * s + 1, s) for k, s, d, o in zip(kidx, strides, dilations, out_sp))
        dxp[(slice(None), slice(None)) + sl] += dcols[:, :, t].reshape(N, C, *out_sp)
    return dxp
