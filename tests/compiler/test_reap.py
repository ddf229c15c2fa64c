"""REAP channel selection (one-shot dE and Schur downdate) against brute-force least squares; baselines; PRO."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.reap import (brute_force_prune, column_groups, l1_select, lstsq_refit, pro_allocate,
                                reap_prune, thinet_prune, uniform_allocate)


def layer_problem(n: int, c: int, k: int, o: int, *, bias: bool, extra: int = 0, seed: int = 0):
    """Patches of a layer with ``c`` channels of ``k`` columns (correlated across channels), optional
    ungrouped columns (another input's channels, then a ones column) and outputs with noise."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, c * k))
    mix = np.eye(c * k) + 0.3 * rng.standard_normal((c * k, c * k))
    X = np.abs(base @ mix)  # post-ReLU-like, correlated columns
    groups = column_groups(c, k)
    cols = [X]
    if extra:
        cols.append(rng.standard_normal((n, extra)))
    if bias:
        cols.append(np.ones((n, 1)))
    X = np.concatenate(cols, axis=1)
    W = rng.standard_normal((X.shape[1], o)) * rng.uniform(0.1, 2.0, (X.shape[1], 1))
    Y = X @ W + 0.1 * rng.standard_normal((n, o))
    return X, Y, groups


CASES = [dict(n=300, c=6, k=1, o=5, bias=False), dict(n=400, c=5, k=4, o=7, bias=True),
         dict(n=500, c=7, k=9, o=3, bias=True), dict(n=400, c=6, k=4, o=4, bias=True, extra=3),
         dict(n=200, c=4, k=9, o=1, bias=False)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{n}c{c}k{k}o{o}".format(**c) + ("b" if c["bias"] else ""))
def test_one_shot_errors_and_picks_equal_brute_force(case):
    X, Y, groups = layer_problem(**case, seed=case["c"] * 7 + case["k"])
    n_keep = 1
    fast = reap_prune(X, Y, groups, n_keep)
    ref = brute_force_prune(X, Y, groups, n_keep)
    assert fast.removed == ref.removed
    assert len(fast.candidate_errors) == len(ref.candidate_errors) == case["c"] - n_keep
    for de_fast, de_ref in zip(fast.candidate_errors, ref.candidate_errors):
        assert np.array_equal(np.isnan(de_fast), np.isnan(de_ref))
        m = ~np.isnan(de_ref)
        np.testing.assert_allclose(de_fast[m], de_ref[m], rtol=1e-6, atol=1e-9 * float(np.max(np.abs(de_ref[m]))))
    np.testing.assert_allclose(fast.delta_errors, ref.delta_errors, rtol=1e-6)
    assert np.array_equal(fast.keep, ref.keep) and np.array_equal(fast.columns, ref.columns)
    np.testing.assert_allclose(fast.error, ref.error, rtol=1e-9)


@pytest.mark.parametrize("case", CASES[1:4])
def test_downdated_weights_equal_lstsq_on_the_kept_columns(case):
    X, Y, groups = layer_problem(**case, seed=3)
    n_keep = case["c"] // 2
    res = reap_prune(X, Y, groups, n_keep)
    assert len(res.keep) == n_keep and list(res.keep) == sorted(res.keep)
    want_cols = np.sort(np.concatenate([groups[c] for c in res.keep]
                                       + [np.arange(case["c"] * case["k"], X.shape[1])]))
    assert np.array_equal(res.columns, want_cols)  # ungrouped columns are never pruned
    W = np.linalg.lstsq(X[:, res.columns], Y, rcond=None)[0]
    np.testing.assert_allclose(res.weights, W, rtol=1e-6, atol=1e-8 * np.abs(W).max())
    np.testing.assert_allclose(res.weights, lstsq_refit(X, Y, res.columns), rtol=1e-7, atol=1e-10)
    # the errors add up: final residual = full-fit residual + the removals' increases
    e0 = float(np.sum((Y - X @ lstsq_refit(X, Y, np.arange(X.shape[1]))) ** 2))
    assert res.error == pytest.approx(e0 + sum(res.delta_errors), rel=1e-8)
    assert all(d >= -1e-9 for d in res.delta_errors)


def test_keep_all_is_the_full_refit_and_a_redundant_channel_goes_first():
    X, Y, groups = layer_problem(300, 5, 2, 3, bias=True, seed=4)
    res = reap_prune(X, Y, groups, 5)
    assert res.removed == [] and np.array_equal(res.keep, np.arange(5))
    np.testing.assert_allclose(res.weights, np.linalg.lstsq(X, Y, rcond=None)[0], rtol=1e-6, atol=1e-9)
    # channel 3 duplicates channel 1 (scaled): removing it costs nothing after the refit
    X2 = X.copy()
    X2[:, groups[3]] = 2.0 * X2[:, groups[1]]
    res2 = reap_prune(X2, Y, groups, 4, eps=1e-10)
    assert res2.removed in ([1], [3]) and res2.delta_errors[0] < 1e-6 * res2.error


def test_ties_go_to_the_lowest_index():
    rng = np.random.default_rng(5)
    Q = np.linalg.qr(rng.standard_normal((50, 4)))[0]
    Y = Q @ np.diag([1.0, 1.0, 3.0, 1.0]) @ np.ones((4, 2))  # channels 0, 1, 3 contribute equally
    res = reap_prune(Q, Y, column_groups(4, 1), 1, eps=0.0)
    assert res.removed == [0, 1, 3] and list(res.keep) == [2]


def test_l1_select_keeps_the_largest_filters():
    w = np.zeros((5, 2, 3, 3), np.float32)
    for i, s in enumerate([3.0, 0.5, 2.0, 0.5, -4.0]):
        w[i] = s
    assert list(l1_select(w, 2)) == [0, 4]
    assert list(l1_select(w, 3)) == [0, 2, 4]
    assert list(l1_select(w, 4)) == [0, 1, 2, 4]  # tie between 1 and 3: the lower index stays
    assert list(l1_select(w.reshape(5, -1), 0)) == []


def test_thinet_removes_the_smallest_contributions_and_rescales():
    rng = np.random.default_rng(6)
    c, k, o = 5, 3, 4
    X = np.linalg.qr(rng.standard_normal((200, c * k)))[0] * 10.0  # orthogonal columns: no cross terms
    groups = column_groups(c, k)
    mags = np.array([2.0, 0.1, 3.0, 0.0, 1.0])
    W = rng.standard_normal((c * k, o)) * np.repeat(mags, k)[:, None]
    Y = X @ W
    res = thinet_prune(X, Y, groups, 2, W=W)
    assert res.removed[:1] == [3]  # zero contribution first
    assert set(res.removed) == {3, 1, 4} and list(res.keep) == [0, 2]
    # orthogonal channels: the least-squares scales are exactly 1, the kept weights are unchanged
    np.testing.assert_allclose(res.weights, W[res.columns], rtol=1e-9, atol=1e-12)
    res2 = thinet_prune(X, Y, groups, 2, refit="lstsq")  # W defaults to the least-squares fit of Y
    assert list(res2.keep) == [0, 2]
    np.testing.assert_allclose(res2.weights, W[res2.columns], rtol=1e-6, atol=1e-9)


def test_pro_advances_the_flattest_segment():
    curves = [[(0, 0), (10, 1.0), (20, 5.0)],  # slopes 0.1, 0.4
              [(0, 0), (5, 1.0), (10, 1.5)]]  # slopes 0.2, 0.1
    res = pro_allocate(curves, flops_total=100, flops_target=80)
    assert res.choice == [1, 2] and res.reached and res.saved == 20 and res.error == pytest.approx(2.5)
    assert [(l, i) for l, i, _, _ in res.trace] == [(0, 1), (1, 1), (1, 2)]
    assert [s for _, _, s, _ in res.trace] == pytest.approx([0.1, 0.2, 0.1])
    assert pro_allocate(curves, 100, 75).choice == [2, 2]
    assert pro_allocate(curves, 100, 100).choice == [0, 0]
    short = pro_allocate(curves, 100, 50)
    assert short.choice == [2, 2] and not short.reached and short.saved == 30
    uni = uniform_allocate(curves, 100, 80)
    assert uni.choice == [2, 2] and uni.saved == 30 and uni.reached
    assert uniform_allocate(curves, 100, 90).choice == [1, 1]


def test_pro_three_layers_hand_computed():
    curves = [[(0, 0), (4, 0.4), (8, 2.0), (12, 6.0)],  # 0.1, 0.4, 1.0
              [(0, 0), (6, 0.3), (12, 3.3)],  # 0.05, 0.5
              [(0, 0), (2, 0.6), (4, 0.8)]]  # 0.3, 0.1
    # 0.05 (l1 -> 6), 0.1 (l0 -> 10), 0.3 (l2 -> 12), 0.1 (l2 -> 14), 0.4 (l0 -> 18)
    res = pro_allocate(curves, 100, 83)
    assert res.choice == [2, 1, 2] and res.saved == 18
    assert [l for l, _, _, _ in res.trace] == [1, 0, 2, 2, 0]


def test_bad_groups_are_rejected():
    X, Y, groups = layer_problem(50, 3, 2, 2, bias=False)
    with pytest.raises(ValueError):
        reap_prune(X, Y, [groups[0], groups[0], groups[2]], 1)
    with pytest.raises(ValueError):
        reap_prune(X, Y, groups, 4)
