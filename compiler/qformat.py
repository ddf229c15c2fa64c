"""Fixed-point formats (Qm.n) and the per-layer quantization config stored on the IR.

A signed ``QFormat(bits=B, frac=n)`` represents ``real = int * 2**-n`` with
``int`` in ``[-2**(B-1), 2**(B-1)-1]``; an unsigned one ``[0, 2**B-1]``. ``frac``
is an int (per tensor) or an int array along ``axis`` (per channel). Scales are
always powers of two, so rescaling is a shift (ALGORITHMS.md §1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class QFormat:
    bits: int
    frac: int | tuple[int, ...]
    signed: bool = True
    axis: int | None = None  # channel axis when frac is per channel

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def frac_array(self) -> np.ndarray:
        return np.asarray(self.frac, dtype=np.int64)

    def scale(self) -> np.ndarray:
        return np.ldexp(np.float32(1.0), -self.frac_array()).astype(np.float32)

    def int_bits(self) -> int | np.ndarray:
        """m in Qm.n (B = 1 + m + n for signed formats, B = m + n unsigned)."""
        return self.bits - (1 if self.signed else 0) - self.frac_array()

    def describe(self) -> str:
        if self.per_channel:
            f = self.frac_array()
            return f"{'s' if self.signed else 'u'}{self.bits} n=[{f.min()}..{f.max()}]/ch"
        m = int(self.int_bits())
        return f"{'Q' if self.signed else 'UQ'}{m}.{int(self.frac_array())}"

    def to_json(self) -> dict:
        f = self.frac_array()
        return {"bits": self.bits, "signed": self.signed, "axis": self.axis,
                "frac": f.tolist() if self.per_channel else int(f)}

    def __eq__(self, other):
        return (isinstance(other, QFormat) and self.bits == other.bits and self.signed == other.signed
                and self.axis == other.axis and np.array_equal(self.frac_array(), other.frac_array()))

    def __hash__(self):
        return hash((self.bits, self.signed, self.axis, tuple(np.atleast_1d(self.frac_array()).tolist())))


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
