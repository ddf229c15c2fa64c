"""Binary decomposition of layer weights: every output filter ``w ~= M c``.

Implements the weight side of "Binary-decomposed DCNN for accelerating computation and
compressing model without retraining" (Kamiya et al., ICCV Workshops 2017; docs/BDCNN.md):
each output filter ``w`` (length ``D = C/group * kh * kw``, in the order of
``W.reshape(O, -1)``) is approximated by ``M c`` with ``M`` in {-1,+1}^(D x k) and ``c``
in R^k.

Optimisation, per filter and vectorised over all the filters of a layer:

* initialisation: restart 0 is the greedy residual one (``m_i = sign(r)``,
  ``c_i = m_i . r / D``, ``r -= m_i c_i``); restarts 1.. start from seeded random signs;
* alternating optimisation for ``iterations`` rounds: ``c`` by least squares given ``M``
  (the k x k normal equations, pseudo-inverse), then every row ``m_j`` of ``M`` by an
  exhaustive search over the 2^k sign vectors (the candidate values ``s . c`` nearest to
  ``w_j``); stops early when no sign changes;
* the coefficients are then rounded to the target's fixed-point format (signed
  ``coef_bits``-bit power-of-two scale per output filter, see core/qformat.py) and one
  last row search is made against the rounded ``c`` (it can only lower the error);
* every filter keeps its best restart (filters are independent).

``decompose_weight`` returns a :class:`Decomposition` with the relative Frobenius error
and byte counts (bit-packed ``M`` as stored in uint64 words, ``c`` at ``coef_bits``)
against float32 and int8. Deterministic for a given seed.
"""
from __future__ import annotations

import base64
import itertools
import json
import math
from dataclasses import dataclass

import numba
import numpy as np

from ..core.errors import DataError, OptionError
from ..core.qformat import QFormat, choose_frac_mse_per_channel, dequantize_pow2, quantize_pow2
from .rounding import obq_sweep, quad_rows

MAX_BASES = 8  # 2^k candidates per row: 256 at k = 8


@dataclass
class Decomposition:
    """``M`` (O, D, k) int8 in {-1,+1}; ``c`` (O, k) float64, exactly ``c_int * 2^-c_frac``
    (``c_int`` int8/16 values, ``c_frac`` per filter); ``weight_shape`` of the layer (Conv
    (O, C/g, kh, kw) or fully connected (O, D)); ``group``; ``rel_error`` = ||W - Mc||_F / ||W||_F."""
    M: np.ndarray
    c: np.ndarray
    c_int: np.ndarray
    c_frac: np.ndarray
    coef_bits: int
    weight_shape: tuple
    group: int
    rel_error: float

    @property
    def k(self) -> int:
        return int(self.M.shape[2])

    @property
    def D(self) -> int:
        return int(self.M.shape[1])

    @property
    def O(self) -> int:
        return int(self.M.shape[0])

    def reconstructed(self) -> np.ndarray:
        """``M c`` in the weight's shape (float64)."""
        return np.einsum("odk,ok->od", self.M.astype(np.float64), self.c).reshape(self.weight_shape)

    @property
    def c_format(self) -> QFormat:
        return QFormat(self.coef_bits, tuple(int(f) for f in self.c_frac), signed=True, axis=0)

    def sizes(self) -> dict:
        """Bytes: ``M`` packed in uint64 words along D, ``c`` at coef_bits, against float32 and int8."""
        words = -(-self.D // 64)
        m_bytes = self.O * self.k * words * 8
        c_bytes = int(math.ceil(self.O * self.k * self.coef_bits / 8))
        n = self.O * self.D
        return {"bases_bytes": m_bytes, "coef_bytes": c_bytes, "bytes": m_bytes + c_bytes,
                "float_bytes": 4 * n, "int8_bytes": n,
                "vs_float": (m_bytes + c_bytes) / (4 * n), "vs_int8": (m_bytes + c_bytes) / n}


    def to_metadata(self) -> str:
        """JSON text of the decomposition (stored under ``METADATA_PREFIX + layer`` in
        ``Graph.metadata``): k, error, coefficient integers and fractions, and ``M+`` bit-packed
        along (O, k, D), little bit order, base64."""
        bits = np.packbits((self.M > 0).transpose(0, 2, 1).reshape(-1), bitorder="little")
        return json.dumps({"k": self.k, "D": self.D, "O": self.O, "group": self.group,
                           "weight_shape": list(self.weight_shape), "rel_error": self.rel_error,
                           "coef_bits": self.coef_bits, "c_int": self.c_int.tolist(),
                           "c_frac": self.c_frac.tolist(),
                           "bases_plus": base64.b64encode(bits.tobytes()).decode("ascii")}, sort_keys=True)

    @classmethod
    def from_metadata(cls, text: str) -> "Decomposition":
        m = json.loads(text)
        O, D, k = int(m["O"]), int(m["D"]), int(m["k"])
        bits = np.unpackbits(np.frombuffer(base64.b64decode(m["bases_plus"]), np.uint8), bitorder="little")
        M = np.where(bits[:O * k * D].reshape(O, k, D).transpose(0, 2, 1) > 0, 1, -1).astype(np.int8)
        ci = np.asarray(m["c_int"], np.int16 if m["coef_bits"] > 8 else np.int8).reshape(O, k)
        cf = np.asarray(m["c_frac"], np.int64)
        c = np.ldexp(ci.astype(np.float64), -cf[:, None])
        return cls(M, c, ci, cf, int(m["coef_bits"]), tuple(m["weight_shape"]), int(m["group"]),
                   float(m["rel_error"]))


#: ``Graph.metadata`` key prefix of a layer's decomposition (the binary-decompose pass)
METADATA_PREFIX = "mpqc.bdcnn."


def sign_vectors(k: int) -> np.ndarray:
    """All 2^k vectors of {-1,+1}^k (rows), in a fixed order."""
    return np.array(list(itertools.product((-1.0, 1.0), repeat=k)), np.float64)


def _solve_c(M: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Least-squares ``c`` (O, k) of ``W ~ M c`` per filter."""
    Mt = M.transpose(0, 2, 1)
    G = np.matmul(Mt, M)
    b = np.matmul(Mt, W[:, :, None])
    return np.matmul(np.linalg.pinv(G), b)[:, :, 0]


@numba.njit(cache=True)
def _nearest(W, V, idx, vals):
    O, D = W.shape
    nc = V.shape[1]
    for o in range(O):
        for j in range(D):
            x = W[o, j]
            b = 0
            bd = abs(x - V[o, 0])
            for s in range(1, nc):
                d = abs(x - V[o, s])
                if d < bd:
                    bd = d
                    b = s
            idx[o, j] = b
            vals[o, j] = V[o, b]


def _search_rows(W: np.ndarray, c: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best sign vector per row (exhaustive over the 2^k candidates ``s . c``; ties: the first):
    index (O, D) into ``S`` and the row values (O, D)."""
    V = np.ascontiguousarray(c @ S.T)  # O, 2^k candidate values per filter
    idx = np.empty(W.shape, np.int64)
    vals = np.empty(W.shape, np.float64)
    _nearest(np.ascontiguousarray(W), V, idx, vals)
    return idx, vals


def _alternate(W, M, S, iterations):
    c = _solve_c(M, W)
    for _ in range(iterations):
        idx, _ = _search_rows(W, c, S)
        M2 = S[idx]
        changed = not np.array_equal(M2, M)
        M = M2
        c = _solve_c(M, W)
        if not changed:
            break
    return M, c


def _greedy(W: np.ndarray, k: int) -> np.ndarray:
    r = W.copy()
    D = W.shape[1]
    M = np.empty(W.shape + (k,), np.float64)
    for i in range(k):
        m = np.where(r >= 0, 1.0, -1.0)
        ci = np.sum(m * r, axis=1, keepdims=True) / D
        r = r - m * ci
        M[:, :, i] = m
    return M


def quantize_coefficients(c: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c rounded, integers, frac per filter): signed ``bits``, power-of-two scale per filter
    chosen by the smallest squared error (core/qformat.py)."""
    frac = choose_frac_mse_per_channel(c, bits, axis=0)
    q = quantize_pow2(c, bits, frac[:, None])
    return dequantize_pow2(q, frac[:, None]), q, frac


def decompose_weight(w: np.ndarray, k: int, *, group: int = 1, restarts: int = 3, iterations: int = 20,
                     coef_bits: int = 8, seed: int = 0) -> Decomposition:
    """Decompose ``w`` (Conv (O, C/g, kh, kw) or fully connected (O, D)) into k binary bases per filter."""
    w = np.asarray(w)
    if w.ndim < 2 or w.size == 0:
        raise DataError(f"cannot decompose a weight of shape {w.shape}: need (O, ...) with O >= 1")
    k = int(k)
    if not 1 <= k <= MAX_BASES:
        raise OptionError(f"bases k={k} must be in 1..{MAX_BASES}")
    if restarts < 1 or iterations < 0:
        raise OptionError(f"restarts={restarts} must be >= 1 and iterations={iterations} >= 0")
    if not 2 <= coef_bits <= 16:
        raise OptionError(f"coefficient bits {coef_bits} must be in 2..16")
    O = w.shape[0]
    W = w.reshape(O, -1).astype(np.float64)
    D = W.shape[1]
    S = sign_vectors(k)
    rng = np.random.default_rng(seed)
    best_M = best_c = best_e = None
    for r in range(restarts):
        M0 = _greedy(W, k) if r == 0 else np.where(rng.random((O, D, k)) < 0.5, -1.0, 1.0)
        M, c = _alternate(W, M0, S, iterations)
        cq, _, _ = quantize_coefficients(c, coef_bits)
        idx, vals = _search_rows(W, cq, S)  # rows against the rounded coefficients
        M = S[idx]
        cq, _, _ = quantize_coefficients(_solve_c(M, W), coef_bits)
        idx, vals = _search_rows(W, cq, S)
        M = S[idx]
        e = np.sum((W - vals) ** 2, axis=1)
        if best_e is None:
            best_M, best_c, best_e = M, cq, e
        else:
            better = e < best_e
            best_M = np.where(better[:, None, None], M, best_M)
            best_c = np.where(better[:, None], cq, best_c)
            best_e = np.where(better, e, best_e)
    # the integers and formats of the kept coefficients (re-derived: per-filter choices may mix restarts)
    cq, ci, cf = quantize_coefficients(best_c, coef_bits)
    if not np.array_equal(cq, best_c):  # pragma: no cover - rounding a rounded value is exact
        best_c = cq
    rel = relative_error(W, np.matmul(best_M, best_c[:, :, None])[:, :, 0])
    return Decomposition(best_M.astype(np.int8), best_c, ci.astype(np.int16 if coef_bits > 8 else np.int8),
                         cf.astype(np.int64), coef_bits, tuple(int(d) for d in w.shape), int(group), rel)


# ---------------------------------------------------------------------------- data-aware refinement
def signs_by_feedback(w: np.ndarray, c: np.ndarray, S: np.ndarray, h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Rows of ``M`` for fixed coefficients in the metric ``h``: an optimal-brain-quantization sweep
    (compiler/rounding.py ``obq_sweep``) whose grid is the 2^k values ``s . c`` of each filter
    instead of integers: input by input, in the order of decreasing ``h[i, i]``, each row takes the
    sign vector whose value is nearest to the weight, and its error is spread over the inputs not
    yet chosen. ``w`` ``(G, mg, D)``, ``c`` ``(G, mg, k)``, ``h`` ``(G, D, D)``; returns indices into
    ``S`` ``(G, mg, D)``."""
    V = np.matmul(c, S.T)  # G, mg, 2^k candidate values

    def nearest(col):
        j = np.argmin(np.abs(col[:, :, None] - V), axis=2)
        return np.take_along_axis(V, j[:, :, None], axis=2)[:, :, 0], j

    idx, _ = obq_sweep(w, h, nearest, damp=damp)
    return idx


def weighted_coefficients(M: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Least-squares ``c`` of ``w ~ M c`` in the metric ``h``: ``(M^T h M) c = M^T h w`` per filter.
    ``M`` ``(G, mg, D, k)``, ``w`` ``(G, mg, D)``, ``h`` ``(G, D, D)``; returns ``(G, mg, k)``."""
    hm = np.matmul(h[:, None], M)  # G, mg, D, k
    a = np.matmul(M.transpose(0, 1, 3, 2), hm)
    b = np.einsum("gmdk,gmd->gmk", hm, w)
    k = M.shape[3]
    tr = np.trace(a, axis1=2, axis2=3)[:, :, None, None] / k
    return np.linalg.solve(a + 1e-12 * tr * np.eye(k) + 1e-300 * np.eye(k), b[..., None])[..., 0]


def metric_error(w: np.ndarray, rec: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``(w - rec)^T h (w - rec)`` per filter, ``(G, mg)``."""
    e = w - rec
    return quad_rows(e, h, e)


def relative_error(W: np.ndarray, rec: np.ndarray) -> float:
    """``||W - rec||_F / ||W||_F`` (0 for a zero ``W``)."""
    norm = float(np.linalg.norm(W))
    return float(np.linalg.norm(W - rec) / norm) if norm > 0 else 0.0


def refine_decomposition(d: Decomposition, w: np.ndarray, h: np.ndarray, *, rounds: int = 4,
                         damp: float = 0.01) -> tuple[Decomposition, np.ndarray, np.ndarray]:
    """The decomposition of ``w`` (``(O, D)``, the layer's target filters) that minimises the layer's
    output error ``(w - M c)^T h (w - M c)`` instead of the weight error, starting from ``d``.

    ``h`` ``(G, D, D)``: the metric of each group's inputs (their second moments, or their covariance
    when the bias absorbs the mean). Each round sets ``c`` by least squares in ``h`` for the signs, then
    the signs by :func:`signs_by_feedback` for ``c``; the coefficients are then rounded to ``d``'s
    format and the signs chosen once more for them. Every filter keeps the best of ``d`` and the rounds
    (so it never ends worse than ``d`` in ``h``). Returns the new decomposition (``rel_error`` still the
    relative Frobenius error of the weights) and the metric errors per filter before and after ``(O,)``."""
    G = d.group
    O, D, k = d.M.shape
    mg = O // G
    S = sign_vectors(k)
    h = np.asarray(h, np.float64)
    wg = np.asarray(w, np.float64).reshape(G, mg, D)

    def finish(c):  # coefficients rounded to the format, signs chosen for them
        cq, _, _ = quantize_coefficients(c.reshape(O, k), d.coef_bits)
        cq = cq.reshape(G, mg, k)
        M = S[signs_by_feedback(wg, cq, S, h, damp)]
        return M, cq, metric_error(wg, np.matmul(M, cq[..., None])[..., 0], h)

    M0 = d.M.astype(np.float64).reshape(G, mg, D, k)
    c0 = d.c.reshape(G, mg, k)
    e0 = metric_error(wg, np.matmul(M0, c0[..., None])[..., 0], h)
    best_M, best_c, best_e = M0, c0, e0
    M = M0
    for _ in range(max(1, int(rounds))):
        c = weighted_coefficients(M, wg, h)
        M = S[signs_by_feedback(wg, c, S, h, damp)]
        Mf, cf, ef = finish(weighted_coefficients(M, wg, h))
        take = ef < best_e
        best_M = np.where(take[:, :, None, None], Mf, best_M)
        best_c = np.where(take[:, :, None], cf, best_c)
        best_e = np.where(take, ef, best_e)
    c = best_c.reshape(O, k)
    cq, ci, cf = quantize_coefficients(c, d.coef_bits)  # the kept ones are on the grid already
    Mo = best_M.reshape(O, D, k)
    rel = relative_error(np.asarray(w, np.float64).reshape(O, D), np.matmul(Mo, cq[:, :, None])[:, :, 0])
    nd = Decomposition(Mo.astype(np.int8), cq, ci.astype(d.c_int.dtype), cf.astype(np.int64), d.coef_bits,
                       d.weight_shape, G, rel)
    return nd, e0.reshape(O), best_e.reshape(O)
