"""Channel selection for pruning without retraining, on arrays.

The method is REAP (Kamma & Wada, "REAP: A method for pruning convolutional neural
networks with performance preservation", IEICE Trans. Inf. & Syst. E104-D(1), 2021):
prune output channels of a layer L and refit the next layer L+1 by least squares so
that it reproduces its original outputs, choosing at each step the channel whose
removal increases the refit error the least.

Notation (all functions here are pure):

* ``X`` (N x D): sampled input patches of layer L+1 (im2col rows; ``D = C*kh*kw``).
  Channel ``c`` of layer L owns the column group ``groups[c]``; a column in no group
  (a ones column for the bias, input channels that come from elsewhere) is never pruned.
* ``Y`` (N x O): layer L+1's original outputs at those patches.
* ``G = X^T X + lambda I``, ``S = G^-1``, ``W* = S X^T Y``, with the ridge ``lambda = eps *``
  the mean squared column norm of the whole X (``ridge``): relative to the data, so that
  rank-deficient patches (a real network's dead or duplicated channels) stay solvable
  without blowing the refit weights up, and the same for every subset of columns.

The report's one-shot criterion (biorthogonal system, dual basis ``X S``): removing
channel ``c`` and refitting optimally raises the squared error by
``dE_c = trace(W*_g^T (S_gg)^-1 W*_g)``, with no least-squares solve per candidate.
After removing ``c*`` the inverse and the refit are downdated without re-solving:
``S' = S_rr - S_rg S_gg^-1 S_gr`` and ``W' = W*_r - S_rg S_gg^-1 W*_g``.

Also here: the baselines the report compares against (filter L1 norm, ThiNet's greedy
selection on next-layer contributions with a least-squares rescale), a brute-force
reference of REAP (one least-squares solve per candidate and step) and the
pruning-ratio optimizer PRO (the same authors, "Pruning ratio optimization with
layer-wise pruning method for accelerating convolutional neural networks",
IEICE Trans. Inf. & Syst. E105-D(1), 2022): piecewise-linear error-vs-FLOPs curves per
layer, advanced greedily by the smallest next-segment slope.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["ReapResult", "ProResult", "reap_prune", "brute_force_prune", "thinet_prune", "l1_select",
           "lstsq_refit", "pro_allocate", "uniform_allocate", "column_groups"]


@dataclass
class ReapResult:
    """The outcome of a channel selection on one layer pair.

    ``keep``: kept channel indices (sorted). ``removed``: channels in removal order.
    ``delta_errors``: the squared-error increase of each removal (same order).
    ``columns``: the remaining columns of X (kept groups and ungrouped columns, ascending);
    ``weights``: the refit weights of layer L+1, one row per entry of ``columns`` (D' x O).
    ``error``: the final residual ``||Y - X[:, columns] @ weights||^2``.
    ``candidate_errors``: per step, the ``dE`` of every channel (NaN for channels already
    removed), for inspection and tests. ``method``: the selection that produced it.
    """

    keep: np.ndarray
    removed: list[int]
    delta_errors: list[float]
    columns: np.ndarray
    weights: np.ndarray
    error: float
    candidate_errors: list[np.ndarray] = field(default_factory=list)
    method: str = "reap"


def column_groups(n_channels: int, group_size: int, offset: int = 0) -> list[np.ndarray]:
    """Contiguous column groups: channel ``c`` owns ``offset + c*k .. offset + (c+1)*k - 1``."""
    return [np.arange(offset + c * group_size, offset + (c + 1) * group_size) for c in range(n_channels)]


def _check(X: np.ndarray, Y: np.ndarray, groups: Sequence, n_keep: int) -> tuple[np.ndarray, np.ndarray,
                                                                                list[np.ndarray]]:
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X {X.shape} and Y {Y.shape} must be N x D and N x O with the same N")
    gs = [np.asarray(g, dtype=np.int64).reshape(-1) for g in groups]
    seen = np.zeros(X.shape[1], bool)
    for c, g in enumerate(gs):
        if g.size == 0 or g.min() < 0 or g.max() >= X.shape[1] or seen[g].any() or len(np.unique(g)) != g.size:
            raise ValueError(f"column group of channel {c} is empty, out of range or overlaps another group")
        seen[g] = True
    if not 0 <= n_keep <= len(gs):
        raise ValueError(f"n_keep={n_keep} must be between 0 and the number of channels ({len(gs)})")
    return X, Y, gs


def _solve_spd(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(A, B)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(A, B, rcond=None)[0]


def _argmin_lowest(values: np.ndarray, alive: np.ndarray, rtol: float = 1e-10) -> int:
    """Index of the smallest ``values[alive]``; values within ``rtol`` (relative to the largest
    magnitude) of the minimum count as ties, which go to the lowest index (rounding noise in
    otherwise equal errors must not decide)."""
    idx = np.flatnonzero(alive)
    v = values[idx]
    lo = float(np.min(v))
    tol = rtol * max(float(np.max(np.abs(v))), 1e-300)
    return int(idx[np.flatnonzero(v <= lo + tol)[0]])


EPS = 1e-9  # default relative ridge


def ridge(X: np.ndarray, eps: float) -> float:
    """The ridge ``lambda`` of ``X``: ``eps`` times the mean squared column norm (the mean diagonal
    of ``X^T X``)."""
    X = np.asarray(X, np.float64)
    return float(eps * max(np.einsum("ij,ij->", X, X) / max(X.shape[1], 1), 1e-30))


def lstsq_refit(X: np.ndarray, Y: np.ndarray, keep_cols: Sequence[int], eps: float = EPS) -> np.ndarray:
    """Least-squares weights of layer L+1 on the columns ``keep_cols`` of X (len(keep_cols) x O).

    Solves ``(X_k^T X_k + lambda I) W = X_k^T Y`` with ``lambda = ridge(X, eps)`` of the whole X
    (so it matches ``reap_prune``'s refit and its downdates); ``eps=0`` uses ``numpy.linalg.lstsq``.
    """
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    Xk = X[:, np.asarray(keep_cols, dtype=np.int64)]
    if eps == 0:
        return np.linalg.lstsq(Xk, Y, rcond=None)[0]
    G = Xk.T @ Xk
    G[np.diag_indices_from(G)] += ridge(X, eps)
    return _solve_spd(G, Xk.T @ Y)


def _residual(X: np.ndarray, Y: np.ndarray, cols: np.ndarray, W: np.ndarray) -> float:
    R = Y - X[:, cols] @ W
    return float(np.einsum("ij,ij->", R, R))


def reap_prune(X: np.ndarray, Y: np.ndarray, groups: Sequence, n_keep: int, eps: float = EPS) -> ReapResult:
    """REAP: remove channels one at a time, each the one whose removal (after the optimal
    least-squares refit of layer L+1) increases ``||Y - X W||^2`` the least, until ``n_keep``
    channels remain.

    As in "REAP: A method for pruning convolutional neural networks with performance
    preservation" (Kamma & Wada), the error increase of every candidate comes from the
    inverse Gram matrix in one shot, ``dE_c = trace(W*_g^T (S_gg)^-1 W*_g)``, and the inverse
    and the refit weights are downdated after each removal (Schur complement), so the only
    solve is the initial one. Ties go to the lowest channel index.
    """
    X, Y, gs = _check(X, Y, groups, n_keep)
    D = X.shape[1]
    G = X.T @ X
    G[np.diag_indices_from(G)] += ridge(X, eps)
    S = np.linalg.inv(G)
    S = 0.5 * (S + S.T)
    W = S @ (X.T @ Y)
    cols = np.arange(D)  # original column index of each row of S / W
    pos = np.full(D, -1, np.int64)  # original column -> row of S / W
    pos[cols] = np.arange(D)
    alive = np.ones(len(gs), bool)
    removed: list[int] = []
    deltas: list[float] = []
    cand_hist: list[np.ndarray] = []
    while alive.sum() > n_keep:
        de = np.full(len(gs), np.nan)
        for c in np.flatnonzero(alive):
            p = pos[gs[c]]
            Wg = W[p]
            de[c] = float(np.sum(Wg * _solve_spd(S[np.ix_(p, p)], Wg)))
        cand_hist.append(de)
        c_star = _argmin_lowest(de, alive)
        p = pos[gs[c_star]]
        r = np.setdiff1d(np.arange(len(cols)), p)
        Sgg = S[np.ix_(p, p)]
        Srg = S[np.ix_(r, p)]
        T = _solve_spd(Sgg, np.concatenate([Srg.T, W[p]], axis=1))  # S_gg^-1 [S_gr | W*_g]
        S = S[np.ix_(r, r)] - Srg @ T[:, :len(r)]
        S = 0.5 * (S + S.T)
        W = W[r] - Srg @ T[:, len(r):]
        cols = cols[r]
        pos[:] = -1
        pos[cols] = np.arange(len(cols))
        alive[c_star] = False
        removed.append(c_star)
        deltas.append(float(de[c_star]))
    return ReapResult(np.flatnonzero(alive), removed, deltas, cols.copy(), W, _residual(X, Y, cols, W),
                      cand_hist, "reap")


def brute_force_prune(X: np.ndarray, Y: np.ndarray, groups: Sequence, n_keep: int, eps: float = EPS
                      ) -> ReapResult:
    """The reference REAP selection: at each step, for every remaining channel, drop its
    columns, solve the least-squares refit and measure ``||Y - X_r W_r||^2``; remove the
    channel with the smallest error (lowest index on ties). ``dE`` is measured from the
    current refit's error. One solve per candidate and step: for tests and benchmarks.
    """
    X, Y, gs = _check(X, Y, groups, n_keep)
    D = X.shape[1]
    col_alive = np.ones(D, bool)
    alive = np.ones(len(gs), bool)
    cur_cols = np.arange(D)
    cur_err = _residual(X, Y, cur_cols, lstsq_refit(X, Y, cur_cols, eps))
    removed: list[int] = []
    deltas: list[float] = []
    cand_hist: list[np.ndarray] = []
    while alive.sum() > n_keep:
        errs = np.full(len(gs), np.nan)
        for c in np.flatnonzero(alive):
            m = col_alive.copy()
            m[gs[c]] = False
            cc = np.flatnonzero(m)
            errs[c] = _residual(X, Y, cc, lstsq_refit(X, Y, cc, eps))
        de = errs - cur_err
        cand_hist.append(de)
        c_star = _argmin_lowest(errs, alive)
        alive[c_star] = False
        col_alive[gs[c_star]] = False
        removed.append(c_star)
        deltas.append(float(de[c_star]))
        cur_err = float(errs[c_star])
        cur_cols = np.flatnonzero(col_alive)
    W = lstsq_refit(X, Y, cur_cols, eps)
    return ReapResult(np.flatnonzero(alive), removed, deltas, cur_cols, W, _residual(X, Y, cur_cols, W),
                      cand_hist, "brute-force")


def l1_select(weights_L: np.ndarray, n_keep: int) -> np.ndarray:
    """The L1-norm baseline: keep the ``n_keep`` output filters of layer L with the largest
    L1 norm (axis 0 indexes the filters; ties keep the lower index). Returns sorted indices.
    """
    w = np.asarray(weights_L, np.float64)
    norms = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1)
    if not 0 <= n_keep <= len(norms):
        raise ValueError(f"n_keep={n_keep} must be between 0 and the number of filters ({len(norms)})")
    order = np.lexsort((np.arange(len(norms)), -norms))  # largest norm first, lower index on ties
    return np.sort(order[:n_keep])


def thinet_prune(X: np.ndarray, Y: np.ndarray, groups: Sequence, n_keep: int, W: np.ndarray | None = None,
                 *, refit: str = "scale", eps: float = EPS) -> ReapResult:
    """ThiNet's greedy selection on layer L+1's output, the baseline of the REAP report.

    Channel ``c`` contributes ``Z_c = X_g W_g`` to layer L+1's output (``W`` = layer L+1's
    weights, one row per column of X; default: the least-squares fit ``W*``, which equals the
    original weights when Y was computed from X). The removed set ``T`` grows one channel at a
    time, each time the channel that keeps ``||sum_{t in T} Z_t||^2`` smallest (at the first
    step: the channel with the least squared contribution). Then the kept layer is rescaled:
    ``refit='scale'`` fits one least-squares factor per kept channel (and one for the
    ungrouped columns) as ThiNet does; ``refit='lstsq'`` refits all kept weights.
    ``delta_errors`` holds the squared norm of the removed contributions after each step.
    """
    X, Y, gs = _check(X, Y, groups, n_keep)
    D = X.shape[1]
    G = X.T @ X
    if W is None:
        W = lstsq_refit(X, Y, np.arange(D), eps)
    W = np.asarray(W, np.float64).reshape(D, -1)
    alive = np.ones(len(gs), bool)
    own = np.array([float(np.sum(W[g] * (G[np.ix_(g, g)] @ W[g]))) for g in gs])  # ||Z_c||^2
    R = np.zeros_like(Y)  # sum of removed contributions
    r2 = 0.0
    removed: list[int] = []
    deltas: list[float] = []
    hist: list[np.ndarray] = []
    while alive.sum() > n_keep:
        XtR = X.T @ R
        cand = np.full(len(gs), np.nan)
        for c in np.flatnonzero(alive):
            g = gs[c]
            cand[c] = r2 + 2.0 * float(np.sum(XtR[g] * W[g])) + own[c]
        hist.append(cand)
        c_star = _argmin_lowest(cand, alive)
        g = gs[c_star]
        R = R + X[:, g] @ W[g]
        r2 = float(np.sum(R * R))
        alive[c_star] = False
        removed.append(c_star)
        deltas.append(r2)
    keep = np.flatnonzero(alive)
    in_group = np.zeros(D, bool)
    for g in gs:
        in_group[g] = True
    free = np.flatnonzero(~in_group)
    cols = np.sort(np.concatenate([np.concatenate([gs[c] for c in keep]) if len(keep) else
                                   np.zeros(0, np.int64), free]).astype(np.int64))
    if refit == "lstsq":
        Wn = lstsq_refit(X, Y, cols, eps)
    elif refit == "scale":
        parts = [gs[c] for c in keep] + ([free] if len(free) else [])
        Z = np.stack([(X[:, p] @ W[p]).reshape(-1) for p in parts], axis=1) if parts else np.zeros((Y.size, 0))
        a = np.linalg.lstsq(Z, Y.reshape(-1), rcond=None)[0] if parts else np.zeros(0)
        scale = np.zeros(D)
        for p, s in zip(parts, a):
            scale[p] = s
        Wn = W[cols] * scale[cols][:, None]
    else:
        raise ValueError(f"refit={refit!r}: use 'scale' or 'lstsq'")
    return ReapResult(keep, removed, deltas, cols, Wn, _residual(X, Y, cols, Wn), hist, f"thinet-{refit}")


# --------------------------------------------------------------------------- PRO
@dataclass
class ProResult:
    """A per-layer pruning-ratio allocation.

    ``choice[l]``: the index of the chosen point on layer l's curve (0 = unpruned).
    ``saved``: FLOPs saved by the allocation (sum of the chosen points' savings);
    ``error``: the sum of the chosen points' errors; ``reached``: whether
    ``saved >= flops_total - flops_target``. ``trace``: one entry per committed step,
    ``(layer, new_index, slope, saved_so_far)``.
    """

    choice: list[int]
    saved: float
    error: float
    reached: bool
    trace: list[tuple[int, int, float, float]] = field(default_factory=list)


def _curves(curves: Sequence[Sequence[tuple[float, float]]]) -> list[np.ndarray]:
    out = []
    for l, c in enumerate(curves):
        a = np.asarray(c, np.float64).reshape(-1, 2)
        if len(a) == 0:
            raise ValueError(f"curve of layer {l} is empty (its first point must be (0, 0))")
        out.append(a)
    return out


def _slope(a: np.ndarray, i: int) -> float:
    df = a[i + 1, 0] - a[i, 0]
    de = a[i + 1, 1] - a[i, 1]
    if df <= 0:
        return np.inf if de >= 0 else -np.inf  # saves nothing: only worth taking if it lowers the error
    return float(de / df)


def pro_allocate(curves: Sequence[Sequence[tuple[float, float]]], flops_total: float, flops_target: float
                 ) -> ProResult:
    """PRO: choose a pruning ratio per layer from piecewise-linear error-vs-FLOPs curves.

    ``curves[l]`` lists ``(flops_saved, error)`` at increasing pruning ratios of layer ``l``
    (first point ``(0, 0)``), each measured by pruning only that layer. As in "Pruning ratio
    optimization with layer-wise pruning method for accelerating convolutional neural
    networks" (Kamma, Inoue & Wada), the layer whose next segment has the smallest slope
    ``de/df`` is advanced one point, repeatedly, until the savings reach
    ``flops_total - flops_target`` (ties: the lowest layer index). When every curve is
    exhausted first, ``reached`` is False.
    """
    cs = _curves(curves)
    need = float(flops_total) - float(flops_target)
    choice = [0] * len(cs)
    saved = float(sum(a[0, 0] for a in cs))
    trace: list[tuple[int, int, float, float]] = []
    while saved < need:
        best, best_s = -1, np.inf
        for l, a in enumerate(cs):
            if choice[l] + 1 < len(a):
                s = _slope(a, choice[l])
                if best < 0 or s < best_s:
                    best, best_s = l, s
        if best < 0:
            break
        a = cs[best]
        saved += float(a[choice[best] + 1, 0] - a[choice[best], 0])
        choice[best] += 1
        trace.append((best, choice[best], float(best_s), saved))
    err = float(sum(a[i, 1] for a, i in zip(cs, choice)))
    return ProResult(choice, saved, err, saved >= need, trace)


def uniform_allocate(curves: Sequence[Sequence[tuple[float, float]]], flops_total: float, flops_target: float
                     ) -> ProResult:
    """The uniform baseline: the same ratio index for every layer, the smallest one whose
    summed savings reach ``flops_total - flops_target`` (curves as for ``pro_allocate``, all
    measured on the same ratio grid)."""
    cs = _curves(curves)
    need = float(flops_total) - float(flops_target)
    m = min(len(a) for a in cs) if cs else 1
    j = 0
    for j in range(m):
        if sum(a[j, 0] for a in cs) >= need:
            break
    choice = [j] * len(cs)
    saved = float(sum(a[j, 0] for a in cs))
    err = float(sum(a[j, 1] for a in cs))
    return ProResult(choice, saved, err, saved >= need, [])
