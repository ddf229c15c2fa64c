"""The training loop: SGD update rule, schedules, determinism, and learning digits from scratch."""
from __future__ import annotations

import time

import numpy as np
import pytest

from mpqc.core.errors import DataError, OptionError
from mpqc.runtime.autograd import GradEngine
from mpqc.runtime.train import SGD, TrainOptions, accuracy, check_labels, fit, init_weights, lr_at
from tests.conftest import bench_path
from tests.graphs import GraphBuilder


def linear(seed=0):
    b = GraphBuilder()
    x = b.input("x", ["N", 3])
    w = b.const("w", np.random.default_rng(seed).standard_normal((4, 3)).astype(np.float32))
    c = b.const("c", np.zeros(4, np.float32))
    return b.output(b.op("Gemm", [x, w, c], transB=1))


def test_sgd_matches_the_update_rule():
    b = GraphBuilder()
    w = b.const("w", np.ones((2, 2), np.float32))
    c = b.const("c", np.ones(2, np.float32))
    params = {w: np.ones((2, 2), np.float32), c: np.ones(2, np.float32)}
    opt = SGD(params, momentum=0.5, weight_decay=0.1)
    g = {w: np.full((2, 2), 2.0, np.float32), c: np.full(2, 2.0, np.float32)}
    opt.step(g, lr=0.1)
    # weights: v = g + wd*w = 2.1; w = 1 - 0.1*2.1; bias: no decay, v = 2, b = 0.8
    np.testing.assert_allclose(params[w], 1 - 0.1 * 2.1, rtol=1e-6)
    np.testing.assert_allclose(params[c], 0.8, rtol=1e-6)
    opt.step(g, lr=0.1)
    # v = 0.5*2.1 + (2 + 0.1*0.79) = 3.129
    np.testing.assert_allclose(params[w], 0.79 - 0.1 * (0.5 * 2.1 + 2 + 0.1 * 0.79), rtol=1e-6)
    np.testing.assert_allclose(params[c], 0.8 - 0.1 * (0.5 * 2 + 2), rtol=1e-6)


def test_sgd_nesterov_and_frozen_elements():
    b = GraphBuilder()
    w = b.const("w", np.ones((1, 3), np.float32))
    params = {w: np.ones((1, 3), np.float32)}
    frozen = {w: np.array([[True, False, False]])}
    opt = SGD(params, momentum=0.9, nesterov=True, frozen=frozen)
    opt.step({w: np.full((1, 3), 1.0, np.float32)}, lr=0.1)
    # nesterov: v = g; update = g + mu * v = 1.9
    np.testing.assert_allclose(params[w], [[1.0, 1 - 0.19, 1 - 0.19]], rtol=1e-6)
    assert opt.velocity[w][0, 0] == 0


def test_learning_rate_schedules():
    o = TrainOptions(lr=0.1, schedule="cosine", warmup_steps=2)
    assert lr_at(o, 0, 10) == pytest.approx(0.05) and lr_at(o, 1, 10) == pytest.approx(0.1)
    assert lr_at(o, 2, 10) == pytest.approx(0.1) and lr_at(o, 6, 10) == pytest.approx(0.05)
    assert lr_at(TrainOptions(lr=0.1), 7, 10) == 0.1


def test_fit_is_deterministic_and_reduces_the_loss():
    x = np.random.default_rng(1).standard_normal((50, 3)).astype(np.float32)
    y = np.argmax(x @ np.random.default_rng(2).standard_normal((3, 4)), axis=1)
    results = []
    for _ in range(2):
        eng = GradEngine(linear())
        res = fit(eng, x, y, TrainOptions(epochs=5, batch_size=8, lr=0.1, seed=4))
        results.append((eng, res))
    (e1, r1), (e2, r2) = results
    assert r1.steps == 5 * 7 and len(r1.losses) == 5 and r1.losses[-1] < r1.losses[0] / 2
    for v1, v2 in zip(e1.params.values(), e2.params.values()):
        assert np.array_equal(v1, v2)
    assert r1.losses == r2.losses
    eng3 = GradEngine(linear())
    fit(eng3, x, y, TrainOptions(epochs=5, batch_size=8, lr=0.1, seed=5))  # another shuffle order
    assert not np.array_equal(list(eng3.params.values())[0], list(e1.params.values())[0])
    assert accuracy(e1, x, y) > 0.9


def test_fit_steps_override_epochs_and_on_step():
    x = np.zeros((10, 3), np.float32)
    y = np.zeros(10, int)
    seen = []
    res = fit(GradEngine(linear()), x, y, TrainOptions(epochs=100, steps=3, batch_size=4),
              on_step=lambda s, e: seen.append(s))
    assert seen == [0, 1, 2] and res.steps == 3 and res.epochs == pytest.approx(1.0)


def test_user_errors():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(DataError, match="no labels"):
        check_labels(x, None)
    with pytest.raises(DataError, match="integer class indices"):
        check_labels(x, np.array([0.5, 1, 2, 3]))
    assert check_labels(x, np.array([0.0, 1, 2, 3])).dtype == np.int64
    with pytest.raises(OptionError, match="learning rate"):
        fit(GradEngine(linear()), x, np.zeros(4, int), TrainOptions(lr=0))
    with pytest.raises(OptionError, match="schedule"):
        fit(GradEngine(linear()), x, np.zeros(4, int), TrainOptions(schedule="step"))
    with pytest.raises(DataError, match="diverged"), np.errstate(all="ignore"):
        big = np.full((4, 3), 1e30, np.float32)
        fit(GradEngine(linear()), big, np.zeros(4, int), TrainOptions(lr=1e10, steps=3))


def test_init_weights_is_seeded_he_normal():
    g1, g2 = linear(), linear()
    init_weights(g1, seed=3)
    init_weights(g2, seed=3)
    w1, c1 = g1.nodes[0].weight.const, g1.nodes[0].bias.const
    assert np.array_equal(w1, g2.nodes[0].weight.const) and np.all(c1 == 0)
    big = GraphBuilder()
    x = big.input("x", ["N", 400])
    gb = big.output(big.op("Gemm", [x, big.const("w", np.zeros((300, 400), np.float32))], transB=1))
    init_weights(gb, seed=0)
    assert np.std(gb.nodes[0].weight.const) == pytest.approx(np.sqrt(2 / 400), rel=0.02)


@pytest.mark.slow
def test_digits_vgg_learns_from_scratch():
    """The engine learns, not only steps: digits_vgg's architecture (BN folded away), freshly
    initialised, reaches >= 97% test accuracy after 12 epochs of SGD on the 1097 training digits
    (about a minute on two free cores; slow because shared machines take up to three)."""
    from mpqc.compiler.frontend import load_graph
    from mpqc.compiler.passes import PassContext, PassManager
    from mpqc.compiler.pipelines import build_pipeline
    g = load_graph(bench_path("digits_vgg.onnx"))
    PassManager(build_pipeline(0)).run(g, PassContext())
    init_weights(g, seed=0)
    d = np.load(bench_path("digits.npz"))
    eng = GradEngine(g)
    before = accuracy(eng, d["x_test"], d["y_test"])
    t0 = time.perf_counter()
    res = fit(eng, d["x_train"], d["y_train"], TrainOptions(epochs=12, batch_size=32, lr=0.02, momentum=0.9,
                                                            weight_decay=5e-4, schedule="cosine", warmup_steps=35,
                                                            seed=0))
    seconds = time.perf_counter() - t0
    acc = accuracy(eng, d["x_test"], d["y_test"])
    print(f"digits_vgg from scratch: test accuracy {before:.4f} -> {acc:.4f} in {seconds:.1f}s "
          f"({res.steps} steps, final loss {res.losses[-1]:.4f})")
    assert before < 0.3 and acc >= 0.97
