"""Fixed-point formats (Qm.n) and the per-layer quantization config stored on the IR.

A signed ``QFormat(bits=B, frac=n)`` represents ``real = int * 2**-n`` with
``int`` in ``[-2**(B-1), 2**(B-1)-1]``; an unsigned one ``[0, 2**B-1]``. ``frac``
is an int (per tensor) or an int array along ``axis`` (per channel). Scales are
powers of two, so rescaling is a shift (docs/FIXED_POINT.md).

Targets whose scale kind is ``"float"`` (``ort-int8``: what onnxruntime's CPU int8
path executes) use the float-scale kind instead: ``fscale`` set, ``real = (int -
zero_point) * fscale`` with ONNX QuantizeLinear rounding (half to even); ``frac`` is
then unused (0). The power-of-two path never sets ``fscale``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .kernels import fake_quant_scalar


@dataclass(frozen=True, eq=False)
class QFormat:
    bits: int
    frac: int | tuple[int, ...]
    signed: bool = True
    axis: int | None = None  # channel axis when frac is per channel
    #: float-scale kind only: the scale (float, or a tuple per channel along ``axis``) and zero point
    fscale: float | tuple[float, ...] | None = None
    zero_point: int = 0

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def is_pow2(self) -> bool:
        """True for Qm.n formats (scale 2^-frac), False for the float-scale kind."""
        return self.fscale is None

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def frac_array(self) -> np.ndarray:
        return np.asarray(self.frac, dtype=np.int64)

    def scale(self) -> np.ndarray:
        if self.fscale is not None:
            return np.asarray(self.fscale, dtype=np.float32)
        return np.ldexp(np.float32(1.0), -self.frac_array()).astype(np.float32)

    def int_bits(self) -> int | np.ndarray:
        """m in Qm.n (B = 1 + m + n for signed formats, B = m + n unsigned)."""
        return self.bits - (1 if self.signed else 0) - self.frac_array()

    def describe(self) -> str:
        if self.fscale is not None:
            sc = np.asarray(self.fscale, dtype=np.float64)
            s = f"s=[{sc.min():.3g}..{sc.max():.3g}]/ch" if self.per_channel else f"s={float(sc):.4g}"
            return f"{'s' if self.signed else 'u'}{self.bits} {s} zp={self.zero_point}"
        if self.per_channel:
            f = self.frac_array()
            return f"{'s' if self.signed else 'u'}{self.bits} n=[{f.min()}..{f.max()}]/ch"
        m = int(self.int_bits())
        return f"{'Q' if self.signed else 'UQ'}{m}.{int(self.frac_array())}"

    def to_json(self) -> dict:
        f = self.frac_array()
        out = {"bits": self.bits, "signed": self.signed, "axis": self.axis,
               "frac": f.tolist() if self.per_channel else int(f)}
        if self.fscale is not None:
            sc = np.asarray(self.fscale, dtype=np.float32)
            out.update(frac=None, scale=[float(x) for x in sc] if self.per_channel else float(sc),
                       zero_point=int(self.zero_point))
        return out

    def __eq__(self, other):
        return (isinstance(other, QFormat) and self.bits == other.bits and self.signed == other.signed
                and self.axis == other.axis and np.array_equal(self.frac_array(), other.frac_array())
                and self.zero_point == other.zero_point
                and (self.fscale is None) == (other.fscale is None)
                and (self.fscale is None or np.array_equal(np.asarray(self.fscale, np.float32),
                                                           np.asarray(other.fscale, np.float32))))

    def __hash__(self):
        fs = None if self.fscale is None else tuple(np.atleast_1d(np.asarray(self.fscale, np.float32)).tolist())
        return hash((self.bits, self.signed, self.axis, tuple(np.atleast_1d(self.frac_array()).tolist()),
                     fs, self.zero_point))


@dataclass(eq=False)
class LayerQConfig:
    """Bit decisions of one layer (a node with weights): weight and activation widths."""
    weight_bits: int
    act_bits: int
    weight_format: QFormat | None = None
    bias_format: QFormat | None = None
    history: list = field(default_factory=list)  # (pass name, old bits) per change

    def __repr__(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"


def _bshape(scale: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    scale = np.asarray(scale)
    if scale.ndim == 0 or scale.size == 1 and x.ndim == 0:
        return scale.reshape(())
    shp = [1] * x.ndim
    shp[axis % x.ndim] = -1
    return scale.reshape(shp)


def quantize_linear(x, scale, zp=None, axis=1, out_dtype=np.uint8):
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zp)."""
    out_dtype = np.dtype(out_dtype)
    s = _bshape(np.asarray(scale, dtype=np.float32), x, axis)
    q = np.rint(np.asarray(x, dtype=np.float32) / s)
    if zp is not None:
        q = q + _bshape(np.asarray(zp), x, axis).astype(np.float32)
    info = np.iinfo(out_dtype)
    return np.clip(q, info.min, info.max).astype(out_dtype)


def dequantize_linear(x, scale, zp=None, axis=1):
    """ONNX DequantizeLinear: (x - zp) * scale, in float32."""
    s = _bshape(np.asarray(scale, dtype=np.float32), x, axis)
    xi = np.asarray(x).astype(np.int64 if np.asarray(x).dtype.itemsize >= 4 else np.int32)
    if zp is not None:
        xi = xi - _bshape(np.asarray(zp), x, axis).astype(xi.dtype)
    return (xi.astype(np.float32) * s).astype(np.float32)


# ---------------------------------------------------------------------------- fixed-point math
def round_half_up(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties towards +inf (what an arithmetic shift with +half does)."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _frac_b(frac, x: np.ndarray, axis: int | None) -> np.ndarray:
    f = np.asarray(frac, dtype=np.int64)
    if axis is None or f.ndim == 0:
        return f
    shp = [1] * x.ndim
    shp[axis % x.ndim] = -1
    return f.reshape(shp)


def quantize_pow2(x: np.ndarray, bits: int, frac, signed: bool = True, axis: int | None = None) -> np.ndarray:
    """Integers of ``x`` in format (bits, frac): round half up, saturate. Returns int64."""
    lo, hi = qrange(bits, signed)
    f = _frac_b(frac, np.asarray(x), axis)
    q = round_half_up(np.ldexp(np.asarray(x, dtype=np.float64), f))
    return np.clip(q, lo, hi).astype(np.int64)


def dequantize_pow2(q: np.ndarray, frac, axis: int | None = None) -> np.ndarray:
    f = _frac_b(frac, np.asarray(q), axis)
    return np.ldexp(np.asarray(q, dtype=np.float64), -f)


def fake_quant(x: np.ndarray, fmt: QFormat) -> np.ndarray:
    """Quantize then dequantize ``x`` with ``fmt`` (float32 out).

    Computed in float32, which is exact here: scaling by a power of two is exact,
    and for widths up to 16 bits every unclipped ``x * 2^n + 0.5`` is below 2^22.
    """
    x = np.asarray(x)
    if fmt.fscale is not None:  # float-scale kind: ONNX QuantizeLinear / DequantizeLinear
        lo, hi = qrange(fmt.bits, fmt.signed)
        ax = fmt.axis if fmt.axis is not None else 0
        s = _bshape(np.asarray(fmt.fscale, np.float32), x, ax)
        q = np.clip(np.rint(x.astype(np.float32) / s) + np.float32(fmt.zero_point), lo, hi)
        return ((q - np.float32(fmt.zero_point)) * s).astype(np.float32)
    if fmt.bits > 16 or x.dtype != np.float32:
        q = quantize_pow2(x, fmt.bits, fmt.frac, fmt.signed, fmt.axis)
        return dequantize_pow2(q, fmt.frac, fmt.axis).astype(np.float32)
    lo, hi = qrange(fmt.bits, fmt.signed)
    if fmt.axis is None:
        n = int(fmt.frac)
        return fake_quant_scalar(np.ascontiguousarray(x), np.float32(2.0 ** n), np.float32(2.0 ** -n),
                                 np.float32(lo), np.float32(hi))
    f = _frac_b(fmt.frac, x, fmt.axis)
    s = np.ldexp(np.float32(1.0), f).astype(np.float32)
    q = np.clip(np.floor(x * s + np.float32(0.5)), lo, hi)
    return (q / s).astype(np.float32)


def range_frac(absmax, bits: int, signed: bool) -> np.ndarray:
    """Range-derived fractional length n0: the largest n that does not clip ``absmax``.

    Signed: m = ceil(log2(r)) integer bits, n = B - 1 - m; unsigned: n = B - m.
    A zero range gives n = B - 1 (any n is exact for zeros).
    """
    r = np.asarray(absmax, dtype=np.float64)
    m = np.ceil(np.log2(np.where(r > 0, r, 1.0)))
    n = np.where(r > 0, (bits - (1 if signed else 0)) - m, bits - 1)
    return n.astype(np.int64)


def mse_for_frac(x: np.ndarray, bits: int, frac: int, signed: bool) -> float:
    return float(np.mean((fake_quant(x, QFormat(bits, int(frac), signed)).astype(np.float64) - x) ** 2))


def choose_frac_mse(x: np.ndarray, bits: int, signed: bool, *, search: int = 2, absmax: float | None = None) -> int:
    """Per-tensor fractional length minimising MSE over n0-search .. n0+search (ties prefer n0)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    r = float(np.max(np.abs(x))) if absmax is None else float(absmax)
    n0 = int(range_frac(r, bits, signed))
    if x.size == 0 or r == 0:
        return n0
    cands = [n0] + [n0 + d for k in range(1, search + 1) for d in (-k, k)]
    errs = [mse_for_frac(x, bits, n, signed) for n in cands]
    return int(cands[int(np.argmin(errs))])


def choose_frac_mse_per_channel(w: np.ndarray, bits: int, axis: int = 0, *, search: int = 2) -> np.ndarray:
    """Per-channel (along ``axis``) fractional lengths minimising each channel's MSE."""
    wc = np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0).reshape(w.shape[axis], -1)
    r = np.max(np.abs(wc), axis=1)
    n0 = range_frac(r, bits, True)
    offs = [0] + [d for k in range(1, search + 1) for d in (-k, k)]
    lo, hi = qrange(bits, True)
    errs = []
    for d in offs:
        n = (n0 + d)[:, None]
        q = np.clip(round_half_up(np.ldexp(wc, n)), lo, hi)
        errs.append(np.mean((np.ldexp(q, -n) - wc) ** 2, axis=1))
    best = np.argmin(np.stack(errs), axis=0)
    out = n0 + np.asarray(offs)[best]
    return np.where(r > 0, out, n0).astype(np.int64)


def sqnr_db(x: np.ndarray, xq: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    x = np.asarray(x, np.float64)
    noise = float(np.sum((x - np.asarray(xq, np.float64)) ** 2))
    sig = float(np.sum(x ** 2))
    if noise == 0:
        return float("inf")
    return 10 * np.log10(sig / noise) if sig > 0 else float("-inf")
