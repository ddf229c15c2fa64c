"""Per-layer activation bits Q of a binary-decomposed network (Algorithm 1).

The method of the follow-up to "Binary-decomposed DCNN for accelerating computation and
compressing model without retraining" (Kamiya et al., ICCV Workshops 2017) that chooses
the quantization sub-layer's bits Q per layer instead of one Q for all (docs/BDCNN.md):

1. accuracy-drop rates ``A[i, q] = (R - acc_i(q)) / R``: the network with only layer i's
   input quantized to q bits (every other layer's input in float), measured on the eval
   split; ``R`` is the accuracy before activation quantization;
2. for each layer i and each pair ``(q_(i-1), q_i)`` in [qmin, qmax]^2 the expected
   accuracy ``S = R (1 - A[i-1, q_(i-1)]) (1 - A[i, q_i])`` (for the first layer
   ``S = R (1 - A[0, q_0])``); the pairs with ``R - S < D`` are kept in the table ``T^i``;
3. from the last layer to the first, ``q_i`` is the smallest width that has a kept pair in
   ``T^i`` and is consistent with the neighbour already chosen (``(q_i, q_(i+1))`` kept in
   ``T^(i+1)``); a layer with no consistent kept pair takes the widest consistent one
   (or ``qmax``) and is listed in ``unsatisfied``.

The predicted accuracy of the choice is ``R prod_i (1 - A[i, q_i])``; the measured one
comes from running the network (the caller's ``measure``). ``D`` is absolute here;
``max_drop`` callers pass ``D = R * max_drop``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..core.errors import OptionError
from ..core.progress import progress_iter


@dataclass
class QSearchResult:
    """``q``: chosen bits per layer; ``predicted``: expected accuracy of the choice; ``R``, ``D``;
    ``A`` (I, qmax+1) drop rates (NaN below qmin); ``tables``: per layer a (qmax+1, qmax+1) array
    of the kept expected accuracies ``T^i[q_prev, q_i]`` (NaN where not kept); ``unsatisfied``:
    layers where no kept pair was consistent."""
    q: list[int]
    predicted: float
    R: float
    D: float
    A: np.ndarray
    tables: list[np.ndarray]
    unsatisfied: list[int] = field(default_factory=list)
    measured: float | None = None

    def to_json(self) -> dict:
        return {"q": list(self.q), "predicted": self.predicted, "measured": self.measured, "R": self.R,
                "D": self.D, "unsatisfied": list(self.unsatisfied),
                "drop_rates": [[None if np.isnan(a) else float(a) for a in row] for row in self.A]}


def _check_range(qmin: int, qmax: int) -> None:
    if not 1 <= qmin <= qmax <= 16:
        raise OptionError(f"activation bits range [{qmin}, {qmax}] must satisfy 1 <= qmin <= qmax <= 16")


def drop_rates(layer_accuracy: Callable[[int, int], float], n_layers: int, R: float, *, qmin: int = 2,
               qmax: int = 8, progress: str | None = None) -> np.ndarray:
    """``A[i, q] = (R - layer_accuracy(i, q)) / R`` for q in [qmin, qmax] (NaN elsewhere)."""
    _check_range(qmin, qmax)
    A = np.full((n_layers, qmax + 1), np.nan)
    pairs = [(i, q) for i in range(n_layers) for q in range(qmin, qmax + 1)]
    for i, q in progress_iter(pairs, desc=progress):
        A[i, q] = (R - float(layer_accuracy(i, q))) / R if R else 0.0
    return A


def expected_accuracy(A: np.ndarray, R: float, i: int, q_prev: int | None, q_i: int) -> float:
    """``S`` of layer i with its input at ``q_i`` bits and the previous layer's at ``q_prev``."""
    s = R * (1.0 - A[i, q_i])
    if i > 0 and q_prev is not None:
        s *= 1.0 - A[i - 1, q_prev]
    return float(s)


def algorithm1(A: np.ndarray, R: float, D: float, *, qmin: int = 2, qmax: int = 8) -> QSearchResult:
    """Choose Q per layer from the drop rates ``A`` (see the module docstring)."""
    _check_range(qmin, qmax)
    A = np.asarray(A, np.float64)
    I = A.shape[0]
    if I == 0:
        return QSearchResult([], float(R), float(R), float(D), A, [])
    if A.shape[1] < qmax + 1 or np.isnan(A[:, qmin:qmax + 1]).any():
        raise OptionError(f"drop rates must cover bits {qmin}..{qmax} for every layer")
    qs = range(qmin, qmax + 1)
    tables = []
    for i in range(I):
        T = np.full((qmax + 1, qmax + 1), np.nan)
        for q_i in qs:
            for q_p in qs:
                S = expected_accuracy(A, R, i, q_p if i > 0 else None, q_i)
                if R - S < D:
                    T[q_p, q_i] = S
        tables.append(T)
    kept = [~np.isnan(T) for T in tables]
    a = [qmax] * I
    unsat: list[int] = []
    for i in range(I - 1, -1, -1):
        has = [q for q in qs if kept[i][qmin:, q].any()]
        if i == I - 1:
            cons = list(qs)
        else:
            cons = [q for q in qs if kept[i + 1][q, a[i + 1]]]
        both = [q for q in has if q in cons]
        if both:
            a[i] = both[0]
        else:
            unsat.append(i)
            a[i] = max(cons) if cons else qmax
    pred = float(R * np.prod([1.0 - A[i, a[i]] for i in range(I)]))
    return QSearchResult(a, pred, float(R), float(D), A, tables, sorted(unsat))
