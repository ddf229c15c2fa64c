"""Algorithm 1 (per-layer Q) on crafted accuracy-drop tables with hand-computed answers."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.qsearch import algorithm1, drop_rates, expected_accuracy
from mpqc.core.errors import OptionError


def table(rows: dict[int, list[float]], qmax: int = 4) -> np.ndarray:
    """Drop rates per layer for q = 2..qmax (NaN below 2)."""
    A = np.full((len(rows), qmax + 1), np.nan)
    for i, r in rows.items():
        A[i, 2:] = r
    return A


def test_crafted_table_gives_the_hand_computed_q_vector():
    # 3 layers, q in 2..4, R = 1, D = 0.1.  Drop rates (q = 2, 3, 4):
    A = table({0: [0.20, 0.04, 0.00],   # layer 0 alone: needs q >= 3 (0.2 >= D)
               1: [0.03, 0.01, 0.00],   # layer 1 cheap
               2: [0.15, 0.08, 0.01]})  # layer 2: q=2 never fits; q=3 only with a cheap neighbour
    # T^2 (q1, q2) kept iff 1 - (1-A1[q1])(1-A2[q2]) < 0.1:
    #   q2=3: q1=2 -> 1-.97*.92=.1076 no; q1=3 -> 1-.99*.92=.0892 yes; q1=4 -> .08 yes
    # last layer: smallest q2 with a kept pair -> 3
    # layer 1: smallest q1 with (q1, 3) kept in T^2 -> 3, and T^1 (q0, 3) kept for some q0
    #   (q0=3: 1-.96*.99=.0496 yes)
    # layer 0: smallest q0 with (q0, 3) kept in T^1: q0=2 -> 1-.8*.99=.208 no; q0=3 yes -> 3,
    #   and T^0: 0.04 < 0.1 yes
    res = algorithm1(A, 1.0, 0.1, qmin=2, qmax=4)
    assert res.q == [3, 3, 3]
    assert res.unsatisfied == []
    assert res.predicted == pytest.approx(0.96 * 0.99 * 0.92)
    T2 = res.tables[2]
    assert np.isnan(T2[2, 3]) and T2[3, 3] == pytest.approx(0.99 * 0.92) and np.isnan(T2[4, 2])

    # a looser D lets the later layers drop to 2 bits: D = 0.2
    #   T^2: q2=2 with q1=2: 1-.97*.85=.1755 yes -> q2 = 2
    #   layer 1: smallest q1 with (q1, 2) kept: q1=2 yes; T^1 (q0, 2) for some q0: q0=3 -> 1-.96*.97=.0688 yes
    #   layer 0: (q0, 2) kept in T^1: q0=2 -> 1-.8*.97=.224 no; q0=3 yes -> 3
    res = algorithm1(A, 1.0, 0.2, qmin=2, qmax=4)
    assert res.q == [3, 2, 2]
    assert res.predicted == pytest.approx(0.96 * 0.97 * 0.85)


def test_unreachable_layer_falls_back_and_is_reported():
    A = table({0: [0.5, 0.5, 0.5], 1: [0.0, 0.0, 0.0]})
    res = algorithm1(A, 0.9, 0.05, qmin=2, qmax=4)
    # layer 1: T^1 needs (1-A0)(1-A1) > 0.944...: never (A0 = .5) -> nothing kept anywhere
    assert res.unsatisfied == [0, 1]
    assert res.q == [4, 4]


def test_r_and_d_are_absolute_accuracies():
    A = table({0: [0.1, 0.0, 0.0]})
    assert algorithm1(A, 0.5, 0.06, qmax=4).q == [2]  # R - S = 0.05 < 0.06
    assert algorithm1(A, 0.5, 0.04, qmax=4).q == [3]
    assert expected_accuracy(A, 0.5, 0, None, 2) == pytest.approx(0.45)


def test_drop_rates_from_a_layer_accuracy_function():
    calls = []

    def acc(i, q):
        calls.append((i, q))
        return 0.8 - 0.1 * (i + 1) / q

    A = drop_rates(acc, 2, 0.8, qmin=2, qmax=3)
    assert calls == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert np.isnan(A[:, :2]).all() and A[1, 2] == pytest.approx(0.1 / 0.8)
    with pytest.raises(OptionError):
        drop_rates(acc, 1, 1.0, qmin=3, qmax=2)
    with pytest.raises(OptionError):
        algorithm1(A, 0.8, 0.1, qmin=2, qmax=4)
