"""Evaluation values (docs/LAYER_INFLUENCE.md, "Evaluation values"): higher is better for every metric.

``evaluate(metric, outputs, labels, reference)``: ``outputs`` are the network's
first output (logits or scores), ``labels`` the integer classes (or boxes for IoU),
``reference`` the float network's outputs (for agreement, mse and psnr).
"""
from __future__ import annotations

import numpy as np

from ..core.errors import DataError, OptionError

METRICS = ("top1", "top5", "mean-score", "agreement", "mse", "psnr")
NEEDS_LABELS = {"top1", "top5", "mean-score"}
NEEDS_REFERENCE = {"agreement", "mse", "psnr"}


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _flat(z: np.ndarray) -> np.ndarray:
    return z.reshape(len(z), -1)


def top_k(outputs: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    z = _flat(outputs)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if k == 1:
        return float(np.mean(np.argmax(z, axis=1) == labels))
    # ties broken by index (stable), as argsort is
    idx = np.argsort(-z, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(idx == labels[:, None], axis=1)))


def mean_score(outputs: np.ndarray, labels: np.ndarray) -> float:
    p = softmax(_flat(outputs))
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    return float(np.mean(p[np.arange(len(p)), labels]))


def agreement(outputs: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(np.argmax(_flat(outputs), 1) == np.argmax(_flat(reference), 1)))


def neg_mse(outputs: np.ndarray, reference: np.ndarray) -> float:
    return -float(np.mean((outputs.astype(np.float64) - reference.astype(np.float64)) ** 2))


def _check_comparable(outputs: np.ndarray, reference: np.ndarray) -> None:
    """The outputs and the float model's outputs they are compared with have one shape."""
    if np.shape(outputs) != np.shape(reference):
        raise DataError(f"outputs of shape {list(np.shape(outputs))} cannot be compared with the reference "
                        f"model's outputs of shape {list(np.shape(reference))}")


def neg_kl(outputs: np.ndarray, reference: np.ndarray) -> float:
    """-mean over samples of KL(p_ref || p_out): the softmax of each sample's flattened outputs, or
    the outputs themselves when the reference already is a probability vector per sample (a network
    ending in Softmax: every row non-negative and summing to 1). 0 when equal, below 0 otherwise."""
    z, r = _flat(outputs).astype(np.float64), _flat(reference).astype(np.float64)
    if r.size and np.all(r >= 0) and np.allclose(r.sum(1), 1.0, atol=1e-3):
        tiny = np.finfo(np.float64).tiny
        p, logq = r, np.log(np.clip(z, tiny, None))
        logp = np.log(np.clip(r, tiny, None))
    else:
        logp = r - r.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        logq = z - z.max(1, keepdims=True)
        logq -= np.log(np.exp(logq).sum(1, keepdims=True))
        p = np.exp(logp)
    return -float(np.mean(np.sum(p * (logp - logq), axis=1)))


def signal_value(signal: str, outputs: np.ndarray, reference: np.ndarray) -> float:
    """A continuous ranking signal against the float network's outputs (higher is better, 0 when
    equal): ``kl`` (``neg_kl``) or ``mse`` (``neg_mse``); see ``compiler.options.SIGNALS``."""
    _check_comparable(outputs, reference)
    if signal == "kl":
        return neg_kl(outputs, reference)
    if signal == "mse":
        return neg_mse(outputs, reference)
    raise OptionError(f"ranking signal {signal!r} is unknown; choose metric, kl or mse")


def psnr(outputs: np.ndarray, reference: np.ndarray) -> float:
    mse = -neg_mse(outputs, reference)
    peak = float(np.max(np.abs(reference))) or 1.0
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(peak ** 2 / mse))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``[N,4]`` and ``[M,4]`` in (x1, y1, x2, y2) form -> ``[N, M]``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def mean_iou(pred_boxes: np.ndarray, ref_boxes: np.ndarray) -> float:
    """Mean IoU of matched (same index) predicted and reference boxes."""
    p = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    r = np.asarray(ref_boxes, np.float64).reshape(-1, 4)
    if len(p) != len(r):
        raise DataError(f"IoU needs as many predicted boxes ({len(p)}) as reference boxes ({len(r)})")
    return float(np.mean(np.diag(box_iou(p, r)))) if len(p) else 0.0


def average_precision(pred_boxes, scores, ref_boxes, iou_threshold: float = 0.5) -> float:
    """AP of one class: predictions sorted by score, greedy matching at ``iou_threshold``
    (VOC-style all-point interpolation)."""
    p = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    s = np.asarray(scores, np.float64).reshape(-1)
    r = np.asarray(ref_boxes, np.float64).reshape(-1, 4)
    if len(r) == 0:
        return 0.0
    order = np.argsort(-s, kind="stable")
    ious = box_iou(p[order], r) if len(p) else np.zeros((0, len(r)))
    taken = np.zeros(len(r), bool)
    tp = np.zeros(len(order))
    for i in range(len(order)):
        j = int(np.argmax(ious[i])) if len(r) else -1
        if j >= 0 and ious[i, j] >= iou_threshold and not taken[j]:
            taken[j] = True
            tp[i] = 1
    ctp = np.cumsum(tp)
    recall = ctp / len(r)
    precision = ctp / np.arange(1, len(order) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def mean_average_precision(per_class: list[tuple], iou_threshold: float = 0.5) -> float:
    """mAP over classes; ``per_class`` holds ``(pred_boxes, scores, ref_boxes)`` tuples."""
    aps = [average_precision(p, s, r, iou_threshold) for p, s, r in per_class]
    return float(np.mean(aps)) if aps else 0.0


def check_metric(metric: str, have_labels: bool) -> str:
    if metric not in METRICS:
        raise OptionError(f"--metric {metric!r} is unknown; choose one of {', '.join(METRICS)}")
    if metric in NEEDS_LABELS and not have_labels:
        raise DataError(f"--metric {metric} needs labels (y_SPLIT) in the data file; "
                        "use --metric agreement to compare with the float model instead")
    return metric


def _check_labels(outputs: np.ndarray, labels) -> None:
    if labels is None:
        raise DataError("this metric needs labels (y_SPLIT) in the data file")
    y = np.asarray(labels).reshape(-1)
    classes = _flat(outputs).shape[1]
    if len(y) != len(outputs):
        raise DataError(f"{len(y)} labels for {len(outputs)} outputs")
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0)):
        raise DataError(f"labels must be integer class indices, got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"labels must be class indices in [0, {classes}), got values from {y.min()} to {y.max()}")


def evaluate(metric: str, outputs: np.ndarray, labels: np.ndarray | None = None,
             reference: np.ndarray | None = None) -> float:
    if metric in NEEDS_LABELS:
        _check_labels(outputs, labels)
    if metric in NEEDS_REFERENCE and reference is not None:
        _check_comparable(outputs, reference)
    if metric == "top1":
        return top_k(outputs, labels, 1)
    if metric == "top5":
        return top_k(outputs, labels, 5)
    if metric == "mean-score":
        return mean_score(outputs, labels)
    if reference is None:
        raise OptionError(f"metric {metric!r} needs the float model's outputs as reference")
    if metric == "agreement":
        return agreement(outputs, reference)
    if metric == "mse":
        return neg_mse(outputs, reference)
    if metric == "psnr":
        return psnr(outputs, reference)
    raise OptionError(f"--metric {metric!r} is unknown; choose one of {', '.join(METRICS)}")
