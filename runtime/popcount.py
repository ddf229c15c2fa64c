"""Binary (AND + popcount) kernels of binary-decomposed networks.

Implements the inference side of "Binary-decomposed DCNN for accelerating computation
and compressing model without retraining" (Kamiya et al., ICCV Workshops 2017):

* every output filter ``w`` (length ``D = C/group * kh * kw``, in the order of
  ``W.reshape(O, -1)``) is approximated as ``w~ = M c`` with ``M`` in {-1,+1}^(D x k);
* the input activation goes through a *quantization sub-layer* (:class:`ActQuant`):
  ``x = min + delta * q`` with integer ``q`` in [0, 2^Q - 1], split into Q bit-planes
  ``b_e`` (``q = sum_e 2^e b_e``);
* with ``M+_k`` the indicator of the +1 entries of base k,
  ``sum_j M_jk q_j = sum_e 2^e (2 popcount(M+_k & b_e) - popcount(b_e))``, so

      w~ . x = sum_k c_k delta P_k + min * sum_j w~_j,     P_k = sum_j M_jk q_j.

Layout. ``M+`` is packed per (group, base, word, filter) into uint64 words along D
(bit ``j % 64`` of word ``j // 64``; the tail of the last word is 0). The bit-planes of
the activation window of one output position are packed the same way, on the fly, in
the kernel (no im2col buffer). Padding is exact: a padded position is a real 0, which
is ``q = zp`` since ``min = -zp * delta`` (see :class:`ActQuant`), so the integer input
is padded with ``zp`` and every position, pad or not, obeys the identity above.

In the kernel the constant term ``sum_e 2^e popcount(b_e)`` is ``sum_j q_j`` of the
window, computed once per position, so each (output, base) costs ``Q * ceil(D/64)``
AND + popcount and the loop over the filters of a group is innermost (it vectorizes:
AVX-512 VPOPCNTQ where the CPU has it, scalar POPCNT otherwise; the popcount is LLVM's
``ctpop`` intrinsic). The kernels are serial (see runtime/emulator_kernels.py on
numba's thread pool at these sizes).

References: :func:`dense_partial_sums` (plain integer numpy) and
:func:`float_reference_conv` / :func:`float_reference_gemm` (reconstructed weights on
dequantized activations) are what the tests compare the kernels with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic
from numpy.lib.stride_tricks import sliding_window_view

from mpqc.core.errors import DataError, UnsupportedOpError
from mpqc.runtime.ops import conv_nd

WORD = 64


# --------------------------------------------------------------------------- quantization sub-layer
@dataclass(frozen=True)
class ActQuant:
    """Per-layer activation quantizer of the quantization sub-layer (``Q`` bits, unsigned).

    ``q = round((x - min) / delta)`` clipped to [0, 2^Q - 1] and ``x ~ min + delta * q``,
    with ``delta = (max - min) / (2^Q - 1)``. The minimum is an exact multiple of the step,
    ``min = -zp * delta`` with an integer zero point ``zp`` in [0, 2^Q - 1], so that:

    * ``(x - min) / delta = x / delta + zp``: the quantizer is exactly ONNX
      ``QuantizeLinear(x, scale=delta, zero_point=zp)`` (uint8 container, followed by a
      ``Clip`` to [0, 2^Q - 1] when Q < 8) and ``min + delta*q`` is
      ``DequantizeLinear(q, delta, zp)``. :meth:`quantize` computes it the way
      onnxruntime does: ``clip(rint(f32(x) / f32(delta)) + zp)``, ties to even, so the
      integers agree bit for bit; ``delta`` is stored as a float32 value;
    * the real value 0 (zero padding, ReLU zeros) is represented exactly, by ``q = zp``.

    :meth:`from_range` therefore widens ``[lo, hi]`` to contain 0 (a ReLU output already
    has ``lo = 0``, ``zp = 0``: the paper's "shift so that the minimum is 0") and rounds
    ``-lo / delta`` to the integer ``zp``.
    """

    lo: float  # the real value of q = 0 (``min``), = -zp * delta
    delta: float  # step, a float32 value
    Q: int  # bits
    zp: int  # zero point, in [0, 2^Q - 1]

    @classmethod
    def from_range(cls, lo: float, hi: float, Q: int) -> "ActQuant":
        Q = int(Q)
        if not 1 <= Q <= 16:
            raise DataError(f"activation bits Q={Q} out of range (1..16)")
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
            raise DataError(f"activation range [{lo}, {hi}] is not a finite interval")
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        levels = (1 << Q) - 1
        delta = (hi - lo) / levels
        if not delta > 0:
            delta = 1.0  # a constant-zero tensor: any step works
        delta = float(np.float32(delta))
        zp = int(np.clip(np.rint(-lo / delta), 0, levels))
        return cls(lo=-zp * delta, delta=delta, Q=Q, zp=zp)

    @property
    def qmax(self) -> int:
        return (1 << self.Q) - 1

    @property
    def hi(self) -> float:
        return self.lo + self.qmax * self.delta

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Integer ``q`` (int32) of ``x``: ONNX QuantizeLinear(delta, zp) + Clip(0, 2^Q-1)."""
        y = np.rint(np.asarray(x, np.float32) / np.float32(self.delta)).astype(np.float64) + self.zp
        return np.clip(y, 0, self.qmax).astype(np.int32)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """``min + delta * q`` as ONNX DequantizeLinear: float32 ``(q - zp) * delta``."""
        return ((np.asarray(q, np.int64) - self.zp).astype(np.float32) * np.float32(self.delta))

    def fake_quant(self, x: np.ndarray) -> np.ndarray:
        return self.dequantize(self.quantize(x))


# --------------------------------------------------------------------------- popcount intrinsic
@intrinsic
def popcount64(typingctx, x):
    """LLVM ``ctpop`` on a 64-bit integer, as int64 (POPCNT / VPOPCNTQ on x86)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None
    sig = types.int64(x)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@numba.njit(cache=True)
def _popcount_array(a, out):
    for i in range(a.size):
        out[i] = popcount64(a[i])


def popcount_words(a: np.ndarray) -> np.ndarray:
    """Popcount of every uint64 word of ``a`` (int64, same shape)."""
    a = np.ascontiguousarray(a, np.uint64)
    out = np.empty(a.shape, np.int64)
    _popcount_array(a.reshape(-1), out.reshape(-1))
    return out


# --------------------------------------------------------------------------- packing
def n_words(D: int) -> int:
    return -(-int(D) // WORD)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean array along its last axis (length D) into uint64 words (..., ceil(D/64))."""
    bits = np.asarray(bits, bool)
    D = bits.shape[-1]
    W = n_words(D)
    pad = W * WORD - D
    if pad:
        bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), bool)], axis=-1)
    by = np.packbits(bits.reshape(bits.shape[:-1] + (W, WORD)), axis=-1, bitorder="little")
    return np.ascontiguousarray(by).view(np.uint64).reshape(bits.shape[:-1] + (W,)) \
        if np.little_endian else _pack_slow(bits, W)


def _pack_slow(bits, W):  # pragma: no cover - big-endian hosts
    b = bits.reshape(bits.shape[:-1] + (W, WORD)).astype(np.uint64)
    return (b << np.arange(WORD, dtype=np.uint64)).sum(axis=-1, dtype=np.uint64)


def pack_weights(M: np.ndarray, group: int = 1) -> np.ndarray:
    """``M+`` of ``M`` (O, D, k) in {-1,+1} as uint64 words laid out (group, k, W, O/group)."""
    M = np.asarray(M)
    if M.ndim != 3:
        raise DataError(f"binary bases must be (O, D, k), got shape {M.shape}")
    O, D, k = M.shape
    if O % group:
        raise DataError(f"{O} filters do not split into {group} groups")
    mg = O // group
    words = pack_bits(np.transpose(M > 0, (0, 2, 1)))  # O, k, W
    W = words.shape[-1]
    return np.ascontiguousarray(words.reshape(group, mg, k, W).transpose(0, 2, 3, 1))


def unpack_weights(words: np.ndarray, D: int) -> np.ndarray:
    """Inverse of :func:`pack_weights`: (group, k, W, O/group) uint64 words -> M (O, D, k) int8 in {-1,+1}."""
    words = np.ascontiguousarray(words, np.uint64)
    if words.ndim != 4 or words.shape[2] != n_words(D):
        raise DataError(f"packed bases of shape {words.shape} do not hold filters of length D={D}")
    G, k, W, mg = words.shape
    w = np.ascontiguousarray(words.transpose(0, 3, 1, 2).reshape(G * mg, k, W))  # O, k, W
    if not np.little_endian:  # pragma: no cover
        raise DataError("unpacking bit-packed bases needs a little-endian host")
    bits = np.unpackbits(w.view(np.uint8).reshape(G * mg, k, W * 8), axis=-1, bitorder="little")[:, :, :D]
    return np.ascontiguousarray(np.where(bits.transpose(0, 2, 1) > 0, 1, -1).astype(np.int8))


def pack_planes(q: np.ndarray, Q: int) -> np.ndarray:
    """Bit-planes of integer vectors ``q`` (..., D) packed along D: (..., Q, ceil(D/64))."""
    q = np.asarray(q, np.int64)
    planes = np.stack([(q >> e) & 1 for e in range(Q)], axis=-2).astype(bool)
    return pack_bits(planes)


# --------------------------------------------------------------------------- kernel
@numba.njit(cache=True)
def _bconv_kernel(qp, Mt, kh, kw, sh, sw, dh, dw, OH, OW, Q, cd, bias, psum, y, want_psum, want_y):
    """qp: (N, C, Hp, Wp) int32 padded integer input; Mt: (G, k, W, mg) uint64 packed M+.

    psum (N, OH*OW, G*k*mg... ) laid out (N, P, k, O) int64 if want_psum;
    y (N, P, O) float64 = sum_k cd[k, o] * P_k + bias[o] if want_y (cd = c * delta).
    """
    N, C, Hp, Wp = qp.shape
    G, k, W, mg = Mt.shape
    cg = C // G
    planes = np.zeros((Q, W), np.uint64)
    acc = np.zeros((k, mg), np.int64)
    for n in range(N):
        for g in range(G):
            c0 = g * cg
            o0 = g * mg
            for oy in range(OH):
                for ox in range(OW):
                    # pack the window's bit-planes (order j = (c*kh + dy)*kw + dx)
                    planes[:, :] = 0
                    sq = 0
                    j = 0
                    for c in range(cg):
                        for dy in range(kh):
                            iy = oy * sh + dy * dh
                            for dx in range(kw):
                                v = np.int64(qp[n, c0 + c, iy, ox * sw + dx * dw])
                                sq += v
                                wi = j >> 6
                                bit = np.uint64(j & 63)
                                for e in range(Q):
                                    planes[e, wi] |= np.uint64((v >> e) & 1) << bit
                                j += 1
                    acc[:, :] = 0
                    for e in range(Q):
                        for wi in range(W):
                            bw = planes[e, wi]
                            if bw == 0:
                                continue
                            for kk in range(k):
                                for o in range(mg):
                                    acc[kk, o] += popcount64(Mt[g, kk, wi, o] & bw) << e
                    p = oy * OW + ox
                    if want_psum:
                        for kk in range(k):
                            for o in range(mg):
                                psum[n, p, kk, o0 + o] = 2 * acc[kk, o] - sq
                    if want_y:
                        for o in range(mg):
                            s = bias[o0 + o]
                            for kk in range(k):
                                s += cd[kk, o0 + o] * np.float64(2 * acc[kk, o] - sq)
                            y[n, p, o0 + o] = s


# --------------------------------------------------------------------------- layer objects
@dataclass
class BinaryLayer:
    """A binary-decomposed Conv (2-D) or fully connected layer ready for the kernel.

    ``M`` (O, D, k) int8 in {-1,+1}, ``c`` (O, k), ``weight_shape`` the original weight
    shape: (O, C/group, kh, kw) for a Conv, (O, D) for a Gemm (y = x @ w~.T).
    """

    M: np.ndarray
    c: np.ndarray
    weight_shape: tuple
    group: int = 1

    def __post_init__(self):
        self.M = np.asarray(self.M, np.int8)
        self.c = np.asarray(self.c, np.float64)
        self.weight_shape = tuple(int(d) for d in self.weight_shape)
        O, D, k = self.M.shape
        if self.c.shape != (O, k):
            raise DataError(f"coefficients of shape {self.c.shape} do not match bases {self.M.shape}")
        if int(np.prod(self.weight_shape[1:])) != D or self.weight_shape[0] != O:
            raise DataError(f"bases {self.M.shape} do not match weight shape {self.weight_shape}")
        if len(self.weight_shape) not in (2, 4):
            raise UnsupportedOpError(f"binary kernels support 2-D convolutions and Gemm, "
                                     f"not weights of shape {self.weight_shape}")
        self.packed = pack_weights(self.M, self.group)
        # reconstructed filters and their sums (the ``min * sum_j w~_j`` term)
        self.w_rec = np.einsum("odk,ok->od", self.M.astype(np.float64), self.c)
        self.w_sum = self.w_rec.sum(axis=1)

    @property
    def k(self) -> int:
        return self.M.shape[2]

    @property
    def D(self) -> int:
        return self.M.shape[1]

    def reconstructed(self) -> np.ndarray:
        return self.w_rec.reshape(self.weight_shape)


def _pad_q(q: np.ndarray, pads, value: int) -> np.ndarray:
    """Pad the spatial axes of (N, C, H, W) with ``value``; negative pads crop."""
    t, l, b, r = pads
    if min(pads) < 0:
        H, W = q.shape[2:]
        q = q[:, :, max(-t, 0):H - max(-b, 0), max(-l, 0):W - max(-r, 0)]
        t, l, b, r = (max(p, 0) for p in pads)
    if t or l or b or r:
        q = np.pad(q, ((0, 0), (0, 0), (t, b), (l, r)), mode="constant", constant_values=value)
    return q


def _geometry(layer: BinaryLayer, x_shape, strides, pads, dilations):
    if len(x_shape) != 4:
        raise UnsupportedOpError(f"binary convolution needs an NCHW input, got shape {tuple(x_shape)}")
    O, cg, kh, kw = layer.weight_shape
    C = x_shape[1]
    if C != cg * layer.group:
        raise DataError(f"input has {C} channels, weights expect {cg} x {layer.group} groups")
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    pads = [int(p) for p in pads]
    Hp = x_shape[2] + pads[0] + pads[2]
    Wp = x_shape[3] + pads[1] + pads[3]
    OH = (Hp - ((kh - 1) * dh + 1)) // sh + 1
    OW = (Wp - ((kw - 1) * dw + 1)) // sw + 1
    if OH <= 0 or OW <= 0:
        raise DataError(f"empty convolution output for input {tuple(x_shape)}")
    return kh, kw, sh, sw, dh, dw, OH, OW, pads


def _run(layer: BinaryLayer, q, act: ActQuant, strides, pads, dilations, *, want_psum, want_y, bias=None):
    q = np.asarray(q)
    if q.ndim == 2:  # fully connected: a 1x1 convolution on (N, D, 1, 1)
        if len(layer.weight_shape) != 2:
            raise DataError("a 2-D input needs a fully connected (O, D) layer")
        q4 = q.reshape(q.shape[0], q.shape[1], 1, 1)
        geo = (1, 1, 1, 1, 1, 1, 1, 1, [0, 0, 0, 0])
    else:
        if len(layer.weight_shape) != 4:
            raise DataError("a fully connected layer needs a 2-D input")
        q4 = q
        geo = _geometry(layer, q.shape, strides, pads, dilations)
    kh, kw, sh, sw, dh, dw, OH, OW, pd = geo
    if q4.shape[1] != layer.D // (kh * kw) * layer.group:
        raise DataError(f"input of shape {q.shape} does not match bases of length D={layer.D}")
    qp = np.ascontiguousarray(_pad_q(q4.astype(np.int32, copy=False), pd, act.zp))
    N = q4.shape[0]
    O = layer.M.shape[0]
    P = OH * OW
    psum = np.zeros((N, P, layer.k, O) if want_psum else (1, 1, 1, 1), np.int64)
    y = np.zeros((N, P, O) if want_y else (1, 1, 1), np.float64)
    cd = np.ascontiguousarray((layer.c * act.delta).T)  # k, O
    b = act.lo * layer.w_sum
    if bias is not None:
        b = b + np.asarray(bias, np.float64).reshape(-1)
    _bconv_kernel(qp, layer.packed, kh, kw, sh, sw, dh, dw, OH, OW, int(act.Q), cd,
                  np.ascontiguousarray(b, np.float64), psum, y, want_psum, want_y)
    return psum, y, N, OH, OW, q.ndim == 2


def binary_partial_sums(layer: BinaryLayer, q: np.ndarray, act: ActQuant, strides=(1, 1),
                        pads=(0, 0, 0, 0), dilations=(1, 1)) -> np.ndarray:
    """Integer ``P_k = sum_j M_jk q_j`` per output and base by AND + popcount.

    ``q``: integer activations (N, C, H, W) (or (N, D) for a fully connected layer) in
    [0, 2^Q - 1]; pads follow ONNX ``[top, left, bottom, right]`` and hold ``act.zp``.
    Returns int64 (N, O, k, OH, OW), or (N, O, k) for a fully connected layer.
    """
    psum, _, N, OH, OW, fc = _run(layer, q, act, strides, pads, dilations, want_psum=True, want_y=False)
    out = psum.transpose(0, 3, 2, 1)  # N, O, k, P
    return np.ascontiguousarray(out.reshape(N, layer.M.shape[0], layer.k) if fc else
                                out.reshape(N, layer.M.shape[0], layer.k, OH, OW))


def binary_forward(layer: BinaryLayer, q: np.ndarray, act: ActQuant, bias=None, strides=(1, 1),
                   pads=(0, 0, 0, 0), dilations=(1, 1)) -> np.ndarray:
    """Float output ``sum_k c_k delta P_k + min * sum_j w~_j + bias`` (float64).

    Shapes as :func:`binary_partial_sums`; returns (N, O, OH, OW) or (N, O).
    """
    _, y, N, OH, OW, fc = _run(layer, q, act, strides, pads, dilations, want_psum=False, want_y=True,
                               bias=bias)
    O = layer.M.shape[0]
    out = y.transpose(0, 2, 1)
    return np.ascontiguousarray(out.reshape(N, O) if fc else out.reshape(N, O, OH, OW))


# --------------------------------------------------------------------------- references
def dense_partial_sums(M: np.ndarray, q: np.ndarray, act_zp: int, weight_shape, group: int = 1,
                       strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)) -> np.ndarray:
    """Reference ``sum_j M_jk q_j`` with plain int64 numpy (im2col + integer matmul).

    Same shapes as :func:`binary_partial_sums`; padded positions hold ``act_zp``.
    """
    M = np.asarray(M, np.int64)
    q = np.asarray(q, np.int64)
    O, D, k = M.shape
    if q.ndim == 2:
        return np.einsum("nd,odk->nok", q, M)
    _, cg, kh, kw = weight_shape
    qp = _pad_q(q, [int(p) for p in pads], int(act_zp))
    dh, dw = dilations
    sh, sw = strides
    win = sliding_window_view(qp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # N, C, OH, OW, kh, kw
    N, C, OH, OW = win.shape[:4]
    mg = O // group
    out = np.empty((N, O, k, OH, OW), np.int64)
    for g in range(group):
        cols = win[:, g * cg:(g + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(N, OH, OW, cg * kh * kw)
        r = np.einsum("nhwd,odk->nokhw", cols, M[g * mg:(g + 1) * mg])
        out[:, g * mg:(g + 1) * mg] = r
    return out


def float_reference_conv(layer: BinaryLayer, x: np.ndarray, act: ActQuant, bias=None, strides=(1, 1),
                         pads=(0, 0, 0, 0), dilations=(1, 1)) -> np.ndarray:
    """Reconstructed weights on fake-quantized (dequantized) activations, float64 conv."""
    xd = act.fake_quant(x).astype(np.float64)
    b = None if bias is None else np.asarray(bias, np.float64)
    return conv_nd(xd, layer.reconstructed(), b, strides=list(strides), pads=list(pads),
                   dilations=list(dilations), group=layer.group, acc_dtype=np.float64)


def float_reference_gemm(layer: BinaryLayer, x: np.ndarray, act: ActQuant, bias=None) -> np.ndarray:
    xd = act.fake_quant(x).astype(np.float64)
    y = xd @ layer.w_rec.T
    return y if bias is None else y + np.asarray(bias, np.float64)
