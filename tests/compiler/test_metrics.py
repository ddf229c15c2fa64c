"""Evaluation values on hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mpqc.core.errors import DataError, OptionError
from mpqc.compiler.metrics import (METRICS, agreement, average_precision, box_iou, check_metric, evaluate,
                                   mean_average_precision, mean_iou, mean_score, neg_mse, psnr, softmax, top_k)


def test_top1():
    z = np.array([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.3, 0.3, 0.4], [1.0, 1.0, 0.0]])
    y = np.array([1, 1, 2, 1])
    # row 3: a tie between classes 0 and 1 goes to the lower index (np.argmax): wrong
    assert top_k(z, y, 1) == pytest.approx(2 / 4)
    assert evaluate("top1", z, y) == pytest.approx(0.5)
    assert evaluate("top1", z[:, :, None, None], y[:, None]) == pytest.approx(0.5)  # flattened


def test_top5_with_ties():
    z = np.array([
        [1, 1, 1, 1, 1, 1, 0],  # all tied: the five lowest indices (0-4) are the top 5
        [1, 1, 1, 1, 1, 1, 0],
        [0, 5, 4, 3, 2, 1, 6],  # order 6, 1, 2, 3, 4
        [0, 5, 4, 3, 2, 1, 6],
        [3, 3, 0, 0, 0, 0, 3],  # 0, 1, 6 then ties 2, 3 (lowest indices)
    ], np.float32)
    y = np.array([4, 5, 4, 5, 3])
    hits = [True, False, True, False, True]
    assert top_k(z, y, 5) == pytest.approx(np.mean(hits))
    assert evaluate("top5", z, y) == pytest.approx(0.6)
    assert top_k(z[:, :3], np.array([2, 2, 0, 1, 2]), 5) == 1.0  # fewer classes than k: always a hit


def test_mean_score():
    z = np.array([[0.0, math.log(3)], [math.log(2), 0.0]])
    assert mean_score(z, np.array([1, 0])) == pytest.approx((0.75 + 2 / 3) / 2)
    assert evaluate("mean-score", z, np.array([0, 0])) == pytest.approx((0.25 + 2 / 3) / 2)
    np.testing.assert_allclose(softmax(np.array([[1000.0, 1000.0]])), [[0.5, 0.5]])  # stable


def test_agreement():
    out = np.array([[1, 0, 0], [0, 2, 1], [0, 0, 3], [5, 6, 0]])
    ref = np.array([[9, 1, 1], [0, 1, 2], [0, 1, 2], [0, 1, 0]])
    assert agreement(out, ref) == pytest.approx(3 / 4)
    assert evaluate("agreement", out, None, ref) == pytest.approx(0.75)


def test_mse_and_psnr():
    out = np.array([[1.0, 2.0, 3.0]], np.float32)
    ref = np.array([[1.0, 2.0, 5.0]], np.float32)
    assert neg_mse(out, ref) == pytest.approx(-4 / 3)  # higher is better
    assert evaluate("mse", out, None, ref) == pytest.approx(-4 / 3)
    assert psnr(out, ref) == pytest.approx(10 * math.log10(25 / (4 / 3)))
    assert evaluate("psnr", out, None, ref) == pytest.approx(12.7300, abs=1e-4)
    assert psnr(ref, ref) == math.inf and neg_mse(ref, ref) == 0.0
    assert psnr(np.array([0.5]), np.zeros(1)) == pytest.approx(10 * math.log10(1 / 0.25))  # zero peak -> 1


def test_box_iou_and_mean_iou():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [1, 1, 1, 1]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 4)
    np.testing.assert_allclose(iou, [[1 / 7, 1, 0, 0], [0, 1 / 4, 0, 0]])
    assert mean_iou(a, b[:2]) == pytest.approx((1 / 7 + 1 / 4) / 2)
    assert mean_iou(np.zeros((0, 4)), np.zeros((0, 4))) == 0.0
    with pytest.raises(DataError, match="as many predicted boxes \\(2\\) as reference boxes \\(1\\)"):
        mean_iou(a, b[:1])


# two ground-truth boxes; four detections, hand-sorted by score: TP, FP, TP (IoU 0.81), FP (duplicate of G1)
GT = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float64)
PRED = np.array([[0, 0, 10, 9], [21, 21, 30, 30], [50, 50, 60, 60], [0, 0, 10, 10]], np.float64)
SCORES = np.array([0.6, 0.7, 0.8, 0.9])


def test_average_precision_hand_worked():
    # precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1 -> AP = 1/2 * 1 + 1/2 * 2/3
    assert average_precision(PRED, SCORES, GT) == pytest.approx(0.5 + 1 / 3)
    # at IoU 0.85 the 0.81 detection is a miss: only G1 is found, at precision 1
    assert average_precision(PRED, SCORES, GT, iou_threshold=0.85) == pytest.approx(0.5)
    assert average_precision(PRED[[3]], SCORES[[3]], GT[[0]]) == pytest.approx(1.0)
    assert average_precision(np.zeros((0, 4)), np.zeros(0), GT) == 0.0
    assert average_precision(PRED, SCORES, np.zeros((0, 4))) == 0.0


def test_mean_average_precision():
    per_class = [(PRED, SCORES, GT), (np.array([[0, 0, 1, 1]]), np.array([0.5]), np.array([[5, 5, 6, 6]]))]
    assert mean_average_precision(per_class) == pytest.approx((0.5 + 1 / 3 + 0.0) / 2)
    assert mean_average_precision([]) == 0.0


def test_check_metric_and_evaluate_errors():
    assert check_metric("top1", True) == "top1"
    assert check_metric("agreement", False) == "agreement"
    with pytest.raises(OptionError, match="--metric 'top7' is unknown; choose one of " + ", ".join(METRICS)):
        check_metric("top7", True)
    with pytest.raises(DataError, match="--metric top5 needs labels"):
        check_metric("top5", False)
    with pytest.raises(OptionError, match="needs the float model's outputs"):
        evaluate("psnr", np.ones((1, 2)))
    with pytest.raises(OptionError, match="unknown"):
        evaluate("nope", np.ones((1, 2)), None, np.ones((1, 2)))


def test_evaluate_checks_labels_and_reference_shape():
    z = np.zeros((3, 4))
    with pytest.raises(DataError, match=r"class indices in \[0, 4\), got values from 0 to 4"):
        evaluate("mean-score", z, np.array([0, 4, 1]))
    with pytest.raises(DataError, match=r"class indices in \[0, 4\), got values from -1 to 1"):
        evaluate("top1", z, np.array([0, -1, 1]))
    with pytest.raises(DataError, match="integer class indices"):
        evaluate("top5", z, np.array([0.5, 1, 1]))
    with pytest.raises(DataError, match="2 labels for 3 outputs"):
        evaluate("top1", z, np.array([0, 1]))
    with pytest.raises(DataError, match="needs labels"):
        evaluate("top1", z)
    assert evaluate("top1", z, np.array([0.0, 0.0, 1.0])) == pytest.approx(2 / 3)  # integral floats are fine
    with pytest.raises(DataError, match=r"shape \[3, 4\] cannot be compared .* shape \[3, 5\]"):
        evaluate("mse", z, None, np.zeros((3, 5)))
