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
AND + popcount; the innermost loop runs along the filters or along the positions (see
the kernel paths below) and vectorizes (AVX-512 VPOPCNTQ where the CPU has it, scalar
POPCNT otherwise; the popcount is LLVM's ``ctpop`` intrinsic). The integer sums are
followed by the float32 epilogue of :func:`epilogue_constants`. The kernels are serial
(see runtime/emulator_kernels.py on numba's thread pool at these sizes).

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
        """Integer ``q`` (int32) of ``x``: ONNX QuantizeLinear(delta, zp) + Clip(0, 2^Q-1), i.e.
        ``clip(rint(f32(x) / f32(delta)) + zp, 0, 2^Q - 1)`` (one numba pass)."""
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty(x.shape, np.int32)
        _quantize(x.reshape(-1), np.float32(self.delta), float(self.zp), float(self.qmax), out.reshape(-1))
        return out

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """``min + delta * q`` as ONNX DequantizeLinear: float32 ``(q - zp) * delta``."""
        return ((np.asarray(q, np.int64) - self.zp).astype(np.float32) * np.float32(self.delta))

    def fake_quant(self, x: np.ndarray) -> np.ndarray:
        return self.dequantize(self.quantize(x))


@numba.njit(cache=True)
def _quantize(x, delta, zp, qmax, out):
    for i in range(x.size):
        v = np.float64(np.rint(x[i] / delta)) + zp  # float32 division and rounding (ties to even)
        out[i] = np.int32(min(max(v, 0.0), qmax))


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


# --------------------------------------------------------------------------- epilogue
def epilogue_constants(M: np.ndarray | None, c: np.ndarray, act: ActQuant, bias=None, msum: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The constants of a binary layer's float32 epilogue, the one computation after the exact integer
    sums that the runtime and the exported ONNX model (compiler/bdcnn.py) both perform, in the same
    order, so that they give the same float32 bits:

        S_k = P_k - zpm[k, o]                      (= sum_j M_jk (q_j - zp), an exact integer)
        y   = ((f32(S_0) * a[0, o] + f32(S_1) * a[1, o]) + ...) + b[o]     (float32 steps)

    ``a = f32(c * delta)`` (k, O) float32 (``c`` times the float32 ``delta`` is exact in float64, so
    the one rounding is to float32), ``zpm = zp * sum_j M_jk`` (k, O) int64, ``b`` (O,) float32 (the
    layer's bias, or zeros). ``M`` (O, D, k), ``c`` (O, k); ``msum`` (O, k): ``sum_j M_jk`` when
    known (then ``M`` is not read)."""
    if msum is None:
        msum = np.asarray(M).astype(np.int64).sum(axis=1)
    a = np.ascontiguousarray((np.asarray(c, np.float64) * float(act.delta)).T.astype(np.float32))
    zpm = np.ascontiguousarray(int(act.zp) * np.asarray(msum, np.int64).T)
    O = msum.shape[0]
    b = np.zeros(O, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
    return a, zpm, np.ascontiguousarray(b)


# --------------------------------------------------------------------------- kernels
# Five paths: three chosen per layer by :func:`choose_path` (``BinaryLayer.path``), and two
# taken per call where there are more output positions than (base, filter) columns:
# ``pixels`` by a ``tap`` layer that is a 1x1, stride-1, unpadded convolution, and
# ``window-pixels`` by a ``window`` layer (``BinaryLayer.last_path`` tells which path the
# last call took):
#
# * ``tap``: the input's bit-planes are packed once per layer call, per pixel: the C/group
#   channels of pixel (iy, ix) of plane e are ``Wc = ceil(C/group / 64)`` words (channel
#   innermost, tail bits 0). A window is then the concatenation of its kh*kw taps' words
#   (D ordered (dy, dx, c), each tap padded to Wc words), gathered as whole words;
#   the weights are re-laid out the same way once, at load.
# * ``window``: when a kernel row holds few channels (kw * C/group <= 64 bits, e.g. the
#   first layer, C = 1), the taps of one kernel row (dx, c) of pixel (iy, ix) are packed
#   once per call into one word ("row segment"), and a window is its kh row segments
#   shifted into a dense (dy, dx, c) bit string of ceil(D/64) words (kh shift/ORs per
#   plane instead of D bit inserts).
# * ``direct``: depthwise-like layers (one or two filters per group: D tiny, so a 64-bit
#   word per tap would be mostly padding) compute ``P_k = sum_j M_jk q_j`` by adding or
#   subtracting each tap's run of q (M is +-1) into int16 accumulators, 32 lanes a vector,
#   along blocks of output rows. Exact as well.
# * ``pixels``: the input's bit-planes packed per channel word along the positions; the
#   popcount core runs along the positions, one filter and its k bases at a time.
# * ``window-pixels``: the same core for a ``window`` layer with more positions than
#   (base, filter) columns (e.g. a network's first layer): each position's whole window is
#   packed, in the ``window`` weights' dense (dy, dx, c) order, vectorized along the
#   output columns; no transpose of the output.
#
# The popcount core of ``tap`` and ``window`` (_bgemm) is a binary GEMM: rows = output
# positions (blocks of 4), columns = (base, filter) of a group (contiguous, the vectorized
# loop), reduction over the window's words and planes (``P += popcount(...) << e``).

RB = 4  # output positions per block of the popcount core


@numba.njit(cache=True)
def _prepack_taps(qp, G, Q, Wc, planes, qsum):
    """planes (N, G, Hp, Wp, Q, Wc) uint64 <- bit-planes of each pixel's group channels;
    qsum (N, G, Hp, Wp) int64 <- sum of q over them."""
    N, C, Hp, Wp = qp.shape
    cg = C // G
    planes[...] = 0
    for n in range(N):
        for g in range(G):
            for iy in range(Hp):
                for ix in range(Wp):
                    s = 0
                    for c in range(cg):
                        v = np.int64(qp[n, g * cg + c, iy, ix])
                        s += v
                        wi = c >> 6
                        bit = np.uint64(c & 63)
                        for e in range(Q):
                            planes[n, g, iy, ix, e, wi] |= np.uint64((v >> e) & 1) << bit
                    qsum[n, g, iy, ix] = s


@numba.njit(cache=True)
def _prepack_rows(qp, G, Q, kw, dw, SX, segs, qsum):
    """segs (N, G, Hp, SX, Q) uint64 <- row segment of pixel (iy, ix): bit dx*cg + c is
    bit e of q[c, iy, ix + dx*dw]; qsum (N, G, Hp, SX) <- the segment's sum of q."""
    N, C, Hp, Wp = qp.shape
    cg = C // G
    segs[...] = 0
    for n in range(N):
        for g in range(G):
            for iy in range(Hp):
                for ix in range(SX):
                    s = 0
                    for dx in range(kw):
                        for c in range(cg):
                            v = np.int64(qp[n, g * cg + c, iy, ix + dx * dw])
                            s += v
                            bit = np.uint64(dx * cg + c)
                            for e in range(Q):
                                segs[n, g, iy, ix, e] |= np.uint64((v >> e) & 1) << bit
                    qsum[n, g, iy, ix] = s


@numba.njit(cache=True)
def _bgemm(A, Wt, Q, tot):
    """tot[b, j] = sum_e 2^e sum_w popcount(A[b, e, w] & Wt[w, j]) for the RB rows b of A. One row at
    a time: the inner loop reads one weight row and updates one accumulator row (two arrays, so LLVM
    vectorizes it: VPOPCNTQ on AVX-512 VPOPCNTDQ CPUs; with four accumulator rows it did not)."""
    Wn = A.shape[2]
    J = Wt.shape[1]
    tot[:, :] = 0
    for b in range(A.shape[0]):
        t = tot[b]
        for e in range(Q):
            for w in range(Wn):
                a = A[b, e, w]
                wr = Wt[w]
                for j in range(J):
                    t[j] += popcount64(wr[j] & a) << e


@numba.njit(cache=True)
def _epilogue(T, SQ, n0, nn, P, g, k, mg, cd, zpm, bias, psum, y, want_psum, want_y):
    """Rows r = nl*P + p of the chunk (samples n0 .. n0+nn-1): psum[n, p, kk, o] = P_k = 2*T - SQ;
    y[n, p, o] (positions-major: vectorized along o) = the float32 epilogue of
    :func:`epilogue_constants` on S_k = P_k - zpm[k, o]."""
    o0 = g * mg
    o1 = o0 + mg
    for nl in range(nn):
        n = n0 + nl
        for p in range(P):
            r = nl * P + p
            s2 = SQ[r]
            Tr = T[r]
            if want_psum:
                for kk in range(k):
                    for o in range(mg):
                        psum[n, p, kk, o0 + o] = 2 * Tr[kk * mg + o] - s2
            if want_y:
                yr = y[n, p, o0:o1]
                c0 = cd[0, o0:o1]
                z0 = zpm[0, o0:o1]
                for o in range(mg):
                    yr[o] = np.float32(2 * Tr[o] - s2 - z0[o]) * c0[o]
                for kk in range(1, k):
                    ck = cd[kk, o0:o1]
                    zk = zpm[kk, o0:o1]
                    Tk = Tr[kk * mg:(kk + 1) * mg]
                    for o in range(mg):
                        yr[o] = yr[o] + np.float32(2 * Tk[o] - s2 - zk[o]) * ck[o]
                bb = bias[o0:o1]
                for o in range(mg):
                    yr[o] = yr[o] + bb[o]


CHUNK_P = 16  # from this many output positions per sample on, rows are blocked per sample


@numba.njit(cache=True)
def _conv_taps(planes, qsum, Wt, kh, kw, sh, sw, dh, dw, OH, OW, Q, k, cd, zpm, bias, psum, y, want_psum, want_y):
    """``tap`` path. planes/qsum from _prepack_taps; Wt (G, kh*kw*Wc, k*mg) uint64."""
    N, G, Hp, Wp, _, Wc = planes.shape
    Wn = Wt.shape[1]
    J = Wt.shape[2]
    mg = J // k
    P = OH * OW
    cn = 1 if P >= CHUNK_P else N
    Rmax = cn * P + RB
    T = np.zeros((Rmax, J), np.int64)
    SQ = np.zeros(Rmax, np.int64)
    A = np.zeros((RB, Q, Wn), np.uint64)
    for g in range(G):
        Wg = Wt[g]
        for n0 in range(0, N, cn):
            nn = min(cn, N - n0)
            R = nn * P
            for r0 in range(0, R, RB):
                for b in range(RB):
                    r = r0 + b
                    if r >= R:
                        A[b] = 0
                        continue
                    nl = r // P
                    n = n0 + nl
                    p = r - nl * P
                    oy = p // OW
                    ox = p - oy * OW
                    s = 0
                    w0 = 0
                    for dy in range(kh):
                        iy = oy * sh + dy * dh
                        for dx in range(kw):
                            ix = ox * sw + dx * dw
                            s += qsum[n, g, iy, ix]
                            for e in range(Q):
                                for wc in range(Wc):
                                    A[b, e, w0 + wc] = planes[n, g, iy, ix, e, wc]
                            w0 += Wc
                    SQ[r] = s
                _bgemm(A, Wg, Q, T[r0:r0 + RB])
            _epilogue(T, SQ, n0, nn, P, g, k, mg, cd, zpm, bias, psum, y, want_psum, want_y)


@numba.njit(cache=True)
def _conv_window(segs, qsum, Wt, kh, seg_bits, sh, sw, dh, OH, OW, Q, k, cd, zpm, bias, psum, y, want_psum,
                 want_y):
    """``window`` path. segs/qsum from _prepack_rows; Wt (G, ceil(D/64), k*mg), D in (dy, dx, c) order."""
    N, G, Hp, SX, _ = segs.shape
    Wn = Wt.shape[1]
    J = Wt.shape[2]
    mg = J // k
    P = OH * OW
    cn = 1 if P >= CHUNK_P else N
    Rmax = cn * P + RB
    T = np.zeros((Rmax, J), np.int64)
    SQ = np.zeros(Rmax, np.int64)
    A = np.zeros((RB, Q, Wn), np.uint64)
    for g in range(G):
        Wg = Wt[g]
        for n0 in range(0, N, cn):
            nn = min(cn, N - n0)
            R = nn * P
            for r0 in range(0, R, RB):
                A[...] = 0
                for b in range(RB):
                    r = r0 + b
                    if r >= R:
                        continue
                    nl = r // P
                    n = n0 + nl
                    p = r - nl * P
                    oy = p // OW
                    ox = p - oy * OW
                    s = 0
                    ix = ox * sw
                    for dy in range(kh):
                        iy = oy * sh + dy * dh
                        s += qsum[n, g, iy, ix]
                        off = dy * seg_bits
                        wi = off >> 6
                        bo = off & 63
                        for e in range(Q):
                            v = segs[n, g, iy, ix, e]
                            A[b, e, wi] |= v << np.uint64(bo)
                            if bo and bo + seg_bits > 64:
                                A[b, e, wi + 1] |= v >> np.uint64(64 - bo)
                    SQ[r] = s
                _bgemm(A, Wg, Q, T[r0:r0 + RB])
            _epilogue(T, SQ, n0, nn, P, g, k, mg, cd, zpm, bias, psum, y, want_psum, want_y)


@numba.njit(cache=True)
def _combine_bases(Pk, cnt, o, cd, zpm, yr):
    """yr[:cnt] = the float32 sum over the bases of :func:`epilogue_constants` for filter ``o``, given its
    partial sums Pk (k, >= cnt) along consecutive positions: ``(f32(P_0 - zpm[0, o]) * cd[0, o] + ...)``,
    the bases in order (the bias is the caller's last step)."""
    for kk in range(Pk.shape[0]):
        ak = cd[kk, o]
        zk = zpm[kk, o]
        pk = Pk[kk]
        if kk == 0:
            for i in range(cnt):
                yr[i] = np.float32(np.int64(pk[i]) - zk) * ak
        else:
            for i in range(cnt):
                yr[i] = yr[i] + np.float32(np.int64(pk[i]) - zk) * ak


@numba.njit(cache=True)
def _epilogue_line(Pk, n, o, p0, cnt, cd, zpm, bias, yr, psum, y, want_psum, want_y):
    """Filter ``o`` of sample ``n`` at ``cnt`` consecutive positions from ``p0``, given its partial
    sums Pk (k, >= cnt): psum[n, p, kk, o] = Pk; y[n, o, p] = the float32 epilogue of
    :func:`epilogue_constants` along the positions (yr: a float32 scratch row)."""
    k = Pk.shape[0]
    if want_psum:
        for kk in range(k):
            for i in range(cnt):
                psum[n, p0 + i, kk, o] = Pk[kk, i]
    if want_y:
        _combine_bases(Pk, cnt, o, cd, zpm, yr)
        b = bias[o]
        yo = y[n, o, p0:p0 + cnt]
        for i in range(cnt):
            yo[i] = yr[i] + b


@numba.njit(cache=True)
def _prepack_pixels(q, G, Q, planes, qsum):
    """``pixels`` layout of a 1x1 convolution's input q (N, C, P): planes (N, G, Q, Wc, P) uint64 <-
    bit c % 64 of word c // 64 is bit e of q[c, p] (channels of group g); qsum (N, G, P) <- sum of q.
    Vectorized along the positions."""
    N, C, P = q.shape
    cg = C // G
    planes[...] = 0
    qsum[...] = 0
    for n in range(N):
        for g in range(G):
            s = qsum[n, g]
            for c in range(cg):
                row = q[n, g * cg + c]
                wi = c >> 6
                bit = np.uint64(c & 63)
                for i in range(P):
                    s[i] += row[i]
                for e in range(Q):
                    dst = planes[n, g, e, wi]
                    for i in range(P):
                        dst[i] |= np.uint64((row[i] >> e) & 1) << bit


@numba.njit(cache=True)
def _prepack_windows(qp, G, Q, kh, kw, sh, sw, dh, dw, OH, OW, planes, qsum):
    """``pixels`` layout of a windowed layer (the ``window`` path's layers with many positions): planes
    (N, G, Q, Wn, OH*OW) uint64 <- bit ``b % 64`` of word ``b // 64`` is bit e of the window's element
    ``b = (dy*kw + dx)*cg + c`` (the ``window`` weights' dense (dy, dx, c) order) at each output position;
    qsum (N, G, OH*OW) <- the window's sum of q. qp: the padded input. Vectorized along the output
    columns."""
    N, C, _, _ = qp.shape
    cg = C // G
    planes[...] = 0
    qsum[...] = 0
    for n in range(N):
        for g in range(G):
            for dy in range(kh):
                for dx in range(kw):
                    for c in range(cg):
                        b = (dy * kw + dx) * cg + c
                        wi = b >> 6
                        bit = np.uint64(b & 63)
                        plane = qp[n, g * cg + c]
                        for oy in range(OH):
                            row = plane[oy * sh + dy * dh, dx * dw:dx * dw + (OW - 1) * sw + 1:sw]
                            p0 = oy * OW
                            s = qsum[n, g, p0:p0 + OW]
                            for ox in range(OW):
                                s[ox] += row[ox]
                            for e in range(Q):
                                dst = planes[n, g, e, wi, p0:p0 + OW]
                                for ox in range(OW):
                                    dst[ox] |= np.uint64((row[ox] >> e) & 1) << bit


#: positions per chunk of the pixels path (its accumulators and plane words stay in L1)
PCH = 512


@numba.njit(cache=True)
def _conv_pixels(planes, qsum, Wt, Q, k, cd, zpm, bias, psum, y, want_psum, want_y):
    """``pixels`` and ``window-pixels`` paths: the popcount core vectorized along the output positions
    instead of the filters (for layers with few filters and many positions), one filter at a time with
    its k bases, then the float32 epilogue along the positions into y (N, O, P). planes (N, G, Q, Wc, P)
    / qsum (N, G, P) the words and sum of q of each position's input: a 1x1 layer's channels
    (:func:`_prepack_pixels`, Wt the ``tap`` words) or a window (:func:`_prepack_windows`, Wt the
    ``window`` words); Wt (G, Wc, k*mg), column kk*mg + o."""
    N, G, _, Wc, P = planes.shape
    J = Wt.shape[2]
    mg = J // k
    T = np.zeros((k, PCH), np.int64)
    yr = np.zeros(PCH, np.float32)
    for n in range(N):
        for g in range(G):
            for p0 in range(0, P, PCH):
                pn = min(PCH, P - p0)
                sq = qsum[n, g, p0:p0 + pn]
                for o in range(mg):
                    oo = g * mg + o
                    for kk in range(k):  # t = P_k = 2 sum_e 2^e popcount(M+ & b_e) - sum q, built in place
                        t = T[kk]
                        for i in range(pn):
                            t[i] = -sq[i]
                        j = kk * mg + o
                        for e in range(Q):
                            for w in range(Wc):
                                m = Wt[g, w, j]
                                a = planes[n, g, e, w, p0:p0 + pn]
                                for i in range(pn):
                                    t[i] += popcount64(a[i] & m) << (e + 1)
                    _epilogue_line(T, n, oo, p0, pn, cd, zpm, bias, yr, psum, y, want_psum, want_y)


#: spare int16 lanes: the direct path runs its loops over whole vectors of this many lanes
VEC = 32
#: int16 accumulators of one block of output rows on the direct path (per base; in L1)
DIRECT_ACC = 2048


def direct_input(q: np.ndarray, pads, zp: int, sh: int, sw: int, dtype=np.int16) -> tuple[np.ndarray, int]:
    """The direct path's input: ``q`` (N, C, H, W) padded with ``zp`` (ONNX pads ``[top, left,
    bottom, right]``, none negative) as ``dtype`` (the kernel's accumulator type) flat stride phases ``(sh * sw, N, C, ceil(Hp / sh) *
    ceil(Wp / sw) + spare)``: phase ``(rh, rw)`` (index ``rh * sw + rw``) holds padded rows ``rh, rh +
    sh, ...`` and columns ``rw, rw + sw, ...``, flattened row-major with ``wq = ceil(Wp / sw)`` columns,
    followed by spare entries that the kernel's whole-vector loops may read (and whose sums it drops).
    Returns ``(phases, wq)``."""
    N, C, H, W = q.shape
    t, l, b, r = (int(v) for v in pads)
    Hp, Wp = H + t + b, W + l + r
    hq, wq = -(-Hp // sh), -(-Wp // sw)
    flat = hq * wq + wq + sw + 2 * VEC
    if sh == 1 and sw == 1:
        out = np.full((1, N, C, flat), zp, dtype)
        out[0, :, :, :Hp * Wp].reshape(N, C, Hp, Wp)[:, :, t:t + H, l:l + W] = q
        return out, wq
    qp = _pad_q(q, (t, l, b, r), zp, dtype)
    out = np.zeros((sh * sw, N, C, flat), dtype)
    for rh in range(sh):
        for rw in range(sw):
            ph = qp[:, :, rh::sh, rw::sw]
            out[rh * sw + rw, :, :, :hq * wq].reshape(N, C, hq, wq)[:, :, :ph.shape[2], :ph.shape[3]] = ph
    return out, wq


@numba.njit(cache=True)
def _conv_direct(qp, S, G, kh, kw, sh, sw, dh, dw, OH, OW, wq, cd, zpm, bias, psum, y, want_psum, want_y):
    """``direct`` path: ``P_k = sum_j M_jk q_j`` by integer additions and subtractions (``M`` is +-1), one
    base at a time, over a block of output rows at once, then the float32 epilogue of
    :func:`epilogue_constants` into y (N, O, P). qp from :func:`direct_input`: output (oy, ox) reads,
    for tap (dy, dx), phase ((dy*dh) % sh, (dx*dw) % sw) at flat index ``(oy + dy*dh // sh) * wq + ox +
    dx*dw // sw``, so a tap is one contiguous run over the block's flat positions ``i = oy * wq + ox``
    (columns ox >= OW and the run's rounding up to whole vectors are computed and dropped). S (O, cg,
    kh, kw, k) int8 the signs of M. The accumulators have qp's type: int16 (32 lanes a vector) where
    ``|P_k| <= D * (2^Q - 1) < 2^15`` (always for the layers :func:`choose_path` sends here: D <= 64),
    else int32."""
    N = qp.shape[1]
    O, cg, _, _, k = S.shape
    mg = O // G
    rb = min(OH, max(1, DIRECT_ACC // wq))
    acc = np.zeros((k, rb * wq + VEC), qp.dtype)
    yb = np.zeros(rb * wq + VEC, np.float32)
    for n in range(N):
        for o in range(O):
            g = o // mg
            for oy0 in range(0, OH, rb):
                nr = min(rb, OH - oy0)
                L = -(-nr * wq // VEC) * VEC
                acc[:, :L] = 0
                for c in range(cg):
                    ci = g * cg + c
                    for dy in range(kh):
                        ry = dy * dh
                        for dx in range(kw):
                            rx = dx * dw
                            base = (oy0 + ry // sh) * wq + rx // sw
                            src = qp[(ry % sh) * sw + rx % sw, n, ci, base:base + L]
                            for kk in range(k):
                                a = acc[kk, :L]
                                if S[o, c, dy, dx, kk] > 0:
                                    for i in range(L):
                                        a[i] += src[i]
                                else:
                                    for i in range(L):
                                        a[i] -= src[i]
                if want_psum:
                    for oyl in range(nr):
                        for kk in range(k):
                            for ox in range(OW):
                                psum[n, (oy0 + oyl) * OW + ox, kk, o] = acc[kk, oyl * wq + ox]
                if want_y:  # the float32 epilogue over the whole block, then its valid columns
                    _combine_bases(acc, L, o, cd, zpm, yb)
                    b = bias[o]
                    for oyl in range(nr):
                        p0 = (oy0 + oyl) * OW
                        yo = y[n, o, p0:p0 + OW]
                        yi = yb[oyl * wq:oyl * wq + OW]
                        for ox in range(OW):
                            yo[ox] = yi[ox] + b


# --------------------------------------------------------------------------- layer objects
def choose_path(weight_shape, group: int, k: int) -> str:
    """``direct`` for depthwise-like layers (<= 2 filters per group and C/group*kh*kw <= 64),
    ``window`` when a kernel row holds <= 64 bits and per-tap words would waste more than
    the dense window, else ``tap`` (fully connected layers: ``tap`` with one tap)."""
    if len(weight_shape) == 2:
        return "tap"
    O, cg, kh, kw = weight_shape
    mg = O // max(1, group)
    if mg <= 2 and cg * kh * kw <= 64:
        return "direct"
    if kw * cg <= 64 and kh * kw * n_words(cg) > n_words(cg * kh * kw):
        return "window"
    return "tap"


def _relayout(M: np.ndarray, weight_shape, group: int, path: str) -> np.ndarray:
    """M (O, D, k) with D in (c, dy, dx) order (``W.reshape(O, -1)``) -> the kernel's words
    Wt (G, words, k*mg): ``tap``: D in (dy, dx, c) with each tap padded to 64*Wc bits;
    ``window``: D in (dy, dx, c), dense. Column j = kk*mg + o."""
    O, D, k = M.shape
    if len(weight_shape) == 2:
        cg, kh, kw = D, 1, 1
    else:
        _, cg, kh, kw = weight_shape
    mg = O // group
    plus = (M > 0).reshape(O, cg, kh, kw, k).transpose(0, 4, 2, 3, 1)  # O, k, kh, kw, cg
    if path == "tap":
        Wc = n_words(cg)
        pad = Wc * WORD - cg
        if pad:
            plus = np.concatenate([plus, np.zeros(plus.shape[:-1] + (pad,), bool)], axis=-1)
    words = pack_bits(plus.reshape(O, k, -1))  # O, k, words
    Wn = words.shape[-1]
    return np.ascontiguousarray(words.reshape(group, mg, k, Wn).transpose(0, 3, 2, 1).reshape(group, Wn, k * mg))


@dataclass
class BinaryLayer:
    """A binary-decomposed Conv (2-D) or fully connected layer ready for the kernel.

    ``M`` (O, D, k) int8 in {-1,+1}, ``c`` (O, k), ``weight_shape`` the original weight
    shape: (O, C/group, kh, kw) for a Conv, (O, D) for a Gemm (y = x @ w~.T). ``packed``
    is ``M+`` in the bundle layout (:func:`pack_weights`); ``path`` the kernel path and
    ``kernel_words`` the bases re-laid out for it (done once, at load).
    """

    M: np.ndarray
    c: np.ndarray
    weight_shape: tuple
    group: int = 1
    path: str | None = None

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
        if self.path is None:
            self.path = choose_path(self.weight_shape, self.group, k)
        if self.path not in ("tap", "window", "direct") or (self.path != "tap" and len(self.weight_shape) == 2):
            raise DataError(f"unknown kernel path {self.path!r} for weights of shape {self.weight_shape}")
        if self.path == "window" and self.weight_shape[1] * self.weight_shape[3] > WORD:
            raise DataError("the window path needs kw * C/group <= 64")
        if self.path == "direct":  # the signs, (O, cg, kh, kw, k)
            self.kernel_words = np.ascontiguousarray(self.M.reshape(self.weight_shape + (k,)))
        else:
            self.kernel_words = _relayout(self.M, self.weight_shape, self.group, self.path)
        self.w_rec = np.einsum("odk,ok->od", self.M.astype(np.float64), self.c)  # reconstructed filters
        self.msum = self.M.astype(np.int64).sum(axis=1)  # (O, k): the epilogue's sum_j M_jk
        self.last_path = self.path  # the kernel path the last call took (``pixels`` for some 1x1 layers)

    @property
    def k(self) -> int:
        return self.M.shape[2]

    @property
    def D(self) -> int:
        return self.M.shape[1]

    def reconstructed(self) -> np.ndarray:
        return self.w_rec.reshape(self.weight_shape)

    def word_ops(self, positions: int, Q: int) -> int:
        """AND + popcount word operations per sample at ``positions`` output positions
        (0 for the direct path), padding words included."""
        if self.path == "direct":
            return 0
        return int(positions) * int(Q) * self.kernel_words.shape[1] * self.kernel_words.shape[2] * self.group


def _crop_negative(q: np.ndarray, pads) -> tuple[np.ndarray, list]:
    """Crop the spatial axes of (N, C, H, W) where a pad is negative; the pads left (none negative)."""
    t, l, b, r = pads
    if min(pads) < 0:
        H, W = q.shape[2:]
        q = q[:, :, max(-t, 0):H - max(-b, 0), max(-l, 0):W - max(-r, 0)]
    return q, [max(int(p), 0) for p in pads]


def _pad_q(q: np.ndarray, pads, value: int, dtype=None) -> np.ndarray:
    """Pad the spatial axes of (N, C, H, W) with ``value``; negative pads crop. ``dtype``: of the padded
    array (default q's; q itself is returned when nothing is padded)."""
    q, (t, l, b, r) = _crop_negative(q, pads)
    if t or l or b or r:
        N, C, H, W = q.shape
        out = np.full((N, C, H + t + b, W + l + r), value, dtype or q.dtype)  # np.pad is several times slower
        out[:, :, t:t + H, l:l + W] = q
        q = out
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


def _run(layer: BinaryLayer, q, act: ActQuant, strides, pads, dilations, *, want_psum, want_y, bias=None,
         dtype=np.float64):
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
    N = q4.shape[0]
    O = layer.M.shape[0]
    k = layer.k
    G = layer.group
    Q = int(act.Q)
    P = OH * OW
    psum = np.zeros((N, P, k, O) if want_psum else (1, 1, 1, 1), np.int64)
    # a 1x1, stride-1, unpadded convolution with more positions than (base, filter) columns: the
    # popcount core along the positions (``pixels``); else the layer's own path
    path = layer.path
    if path == "tap" and q.ndim == 4 and kh == kw == 1 and sh == sw == 1 and not any(pd) \
            and N * OH * OW >= layer.kernel_words.shape[2]:
        path = "pixels"
    elif path == "window" and N * OH * OW >= layer.kernel_words.shape[2]:
        path = "window-pixels"
    layer.last_path = path
    # the paths along the positions write (N, O, P); the others (N, P, O), transposed at the end
    along = path in ("direct", "pixels", "window-pixels")
    y = np.empty(((N, O, P) if along else (N, P, O)) if want_y else (1, 1, 1), np.float32)
    cd, zpm, b = epilogue_constants(None, layer.c, act, bias, msum=layer.msum)
    # the packing paths read q padded with zp; the direct path pads while it lays out its input
    qp = None if path == "direct" else np.ascontiguousarray(_pad_q(q4.astype(np.int32, copy=False), pd, act.zp))
    if path == "direct":
        acc_t = np.int16 if layer.D * act.qmax < 1 << 15 else np.int32  # |P_k| <= D * qmax
        phases, wq = direct_input(*_crop_negative(q4, pd), act.zp, sh, sw, acc_t)
        _conv_direct(phases, layer.kernel_words, G, kh, kw, sh, sw, dh, dw, OH, OW, wq, cd, zpm, b, psum, y,
                     want_psum, want_y)
    elif path == "pixels":
        Wc = n_words(qp.shape[1] // G)
        qf = qp.reshape(N, qp.shape[1], P)
        planes = np.empty((N, G, Q, Wc, P), np.uint64)
        qsum = np.empty((N, G, P), np.int64)
        _prepack_pixels(qf, G, Q, planes, qsum)
        _conv_pixels(planes, qsum, layer.kernel_words, Q, k, cd, zpm, b, psum, y, want_psum, want_y)
    elif path == "window-pixels":
        Wn = layer.kernel_words.shape[1]
        planes = np.empty((N, G, Q, Wn, P), np.uint64)
        qsum = np.empty((N, G, P), np.int64)
        _prepack_windows(qp, G, Q, kh, kw, sh, sw, dh, dw, OH, OW, planes, qsum)
        _conv_pixels(planes, qsum, layer.kernel_words, Q, k, cd, zpm, b, psum, y, want_psum, want_y)
    elif path == "window":
        cg = qp.shape[1] // G
        SX = (OW - 1) * sw + 1
        segs = np.empty((N, G, qp.shape[2], SX, Q), np.uint64)
        qsum = np.empty((N, G, qp.shape[2], SX), np.int64)
        _prepack_rows(qp, G, Q, kw, dw, SX, segs, qsum)
        _conv_window(segs, qsum, layer.kernel_words, kh, kw * cg, sh, sw, dh, OH, OW, Q, k, cd, zpm, b, psum, y,
                     want_psum, want_y)
    else:
        Wc = n_words(qp.shape[1] // G)
        planes = np.empty((N, G) + qp.shape[2:] + (Q, Wc), np.uint64)
        qsum = np.empty((N, G) + qp.shape[2:], np.int64)
        _prepack_taps(qp, G, Q, Wc, planes, qsum)
        _conv_taps(planes, qsum, layer.kernel_words, kh, kw, sh, sw, dh, dw, OH, OW, Q, k, cd, zpm, b, psum, y,
                   want_psum, want_y)
    if want_y and not along:
        y = y.transpose(0, 2, 1)
    if want_y:
        y = np.ascontiguousarray(y, dtype)
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
                   pads=(0, 0, 0, 0), dilations=(1, 1), dtype=np.float64) -> np.ndarray:
    """Float output ``sum_k c_k delta (P_k - zp sum_j M_jk) + bias`` (= ``sum_k c_k delta P_k + min *
    sum_j w~_j + bias``), computed by the float32 epilogue of :func:`epilogue_constants` and stored as
    ``dtype`` (float64 by default, float32 in the runtime).

    Shapes as :func:`binary_partial_sums`; returns (N, O, OH, OW) or (N, O).
    """
    _, y, N, OH, OW, fc = _run(layer, q, act, strides, pads, dilations, want_psum=False, want_y=True,
                               bias=bias, dtype=dtype)
    O = layer.M.shape[0]
    return y.reshape(N, O) if fc else y.reshape(N, O, OH, OW)


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
