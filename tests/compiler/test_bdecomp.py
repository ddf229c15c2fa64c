"""Binary decomposition of weights: exact recovery, monotone error in k, fixed-point c, sizes."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.bdecomp import decompose_weight, sign_vectors
from mpqc.core.errors import DataError, OptionError


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exactly_representable_filter_is_recovered_exactly(k):
    r = np.random.default_rng(k)
    O, D = 6, 75
    M = np.where(r.random((O, D, k)) < 0.5, -1, 1)
    base = np.array([1.0, -0.5, 0.25][:k])
    c = base * np.array([[1], [0.5], [2], [1], [0.25], [4]])  # representable in 8-bit pow2 per filter
    W = np.einsum("odk,ok->od", M, c).reshape(O, 3, 5, 5).astype(np.float32)
    d = decompose_weight(W, k, restarts=3, iterations=30)
    assert d.rel_error == 0.0
    np.testing.assert_array_equal(d.reconstructed(), W.astype(np.float64))
    assert d.M.dtype == np.int8 and set(np.unique(d.M)) <= {-1, 1}
    # c is exactly its fixed-point integers times 2^-frac
    np.testing.assert_array_equal(d.c, np.ldexp(d.c_int.astype(np.float64), -d.c_frac[:, None]))
    assert np.abs(d.c_int).max() <= 127


def test_error_falls_with_more_bases_and_is_deterministic():
    W = np.random.default_rng(0).normal(size=(16, 8, 3, 3))
    errs = [decompose_weight(W, k, seed=1).rel_error for k in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[0] < 0.65  # sign(w) * mean|w| of a Gaussian: sqrt(1 - 2/pi) = 0.60
    a, b = decompose_weight(W, 2, seed=3), decompose_weight(W, 2, seed=3)
    np.testing.assert_array_equal(a.M, b.M)
    np.testing.assert_array_equal(a.c, b.c)


def test_restarts_never_hurt():
    W = np.random.default_rng(5).normal(size=(8, 40))
    e1 = decompose_weight(W, 3, restarts=1).rel_error
    e4 = decompose_weight(W, 3, restarts=4).rel_error
    assert e4 <= e1


def test_sizes_of_packed_bases():
    W = np.random.default_rng(0).normal(size=(10, 3, 5, 5))  # D = 75 -> 2 uint64 words
    s = decompose_weight(W, 2).sizes()
    assert s["bases_bytes"] == 10 * 2 * 2 * 8 and s["coef_bytes"] == 20
    assert s["float_bytes"] == 4 * 750 and s["int8_bytes"] == 750
    assert s["bytes"] == s["bases_bytes"] + s["coef_bytes"] and s["vs_float"] < 0.2


def test_sign_vectors_and_bad_options():
    assert sign_vectors(2).tolist() == [[-1, -1], [-1, 1], [1, -1], [1, 1]]
    W = np.ones((2, 3))
    with pytest.raises(OptionError):
        decompose_weight(W, 0)
    with pytest.raises(OptionError):
        decompose_weight(W, 2, restarts=0)
    with pytest.raises(DataError):
        decompose_weight(np.ones(3), 1)
    z = decompose_weight(np.zeros((2, 4)), 2)  # an all-zero filter: error 0, no NaN
    assert z.rel_error == 0.0 and np.all(z.reconstructed() == 0)


# ------------------------------------------------------------------ data-aware refinement
def _correlated_inputs(D, n, seed):
    r = np.random.default_rng(seed)
    A = r.normal(size=(D, D)) / np.sqrt(D)
    X = r.normal(size=(n, D)) @ A + 0.3 * r.normal(size=(n, D))  # correlated inputs
    return X, X.T @ X / n


def test_signs_by_feedback_without_coupling_is_the_nearest_sign_vector():
    from mpqc.compiler.bdecomp import _search_rows, signs_by_feedback
    r = np.random.default_rng(3)
    W = r.normal(size=(5, 12))
    c = np.abs(r.normal(size=(5, 3)))
    S = sign_vectors(3)
    h = np.diag(r.uniform(0.5, 2.0, 12))[None]  # a diagonal metric: no error to pass on
    idx = signs_by_feedback(W[None], c[None], S, h, damp=0.0)[0]
    want, _ = _search_rows(W, c, S)
    np.testing.assert_array_equal(idx, want)


def test_weighted_coefficients_solve_the_normal_equations():
    from mpqc.compiler.bdecomp import weighted_coefficients
    r = np.random.default_rng(4)
    D, k = 20, 3
    _, h = _correlated_inputs(D, 400, 5)
    M = np.where(r.random((1, 4, D, k)) < 0.5, -1.0, 1.0)
    w = r.normal(size=(1, 4, D))
    c = weighted_coefficients(M, w, h[None])
    for o in range(4):  # brute force: least squares on the square root of h
        L = np.linalg.cholesky(h)
        want = np.linalg.lstsq(L.T @ M[0, o], L.T @ w[0, o], rcond=None)[0]
        np.testing.assert_allclose(c[0, o], want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_refinement_lowers_the_output_error_and_never_raises_it(k):
    from mpqc.compiler.bdecomp import metric_error, refine_decomposition
    D, O = 48, 16
    X, h = _correlated_inputs(D, 2000, k)
    W = np.random.default_rng(10 + k).normal(size=(O, D))
    d = decompose_weight(W, k, restarts=2, iterations=10, seed=0)
    nd, e0, e1 = refine_decomposition(d, W, h[None], rounds=4)
    # the errors reported are the output errors of both decompositions, measured on the data
    out = lambda dec: np.mean(((W - dec.reconstructed()) @ X.T) ** 2, axis=1)  # noqa: E731
    np.testing.assert_allclose(e0, out(d), rtol=1e-9)
    np.testing.assert_allclose(e1, out(nd), rtol=1e-9)
    np.testing.assert_allclose(e1, metric_error(W[None], nd.reconstructed()[None], h[None])[0], rtol=1e-9)
    assert np.all(e1 <= e0) and e1.sum() < 0.8 * e0.sum()
    # still a decomposition of the format: +-1 bases, coefficients exactly their 8-bit integers
    assert set(np.unique(nd.M)) <= {-1, 1} and nd.M.shape == d.M.shape
    np.testing.assert_array_equal(nd.c, np.ldexp(nd.c_int.astype(np.float64), -nd.c_frac[:, None]))
    assert np.abs(nd.c_int).max() <= 127
    # deterministic
    nd2, _, _ = refine_decomposition(d, W, h[None], rounds=4)
    np.testing.assert_array_equal(nd2.M, nd.M)
    np.testing.assert_array_equal(nd2.c, nd.c)
