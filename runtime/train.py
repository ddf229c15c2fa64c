"""Training loop over the IR: mini-batch SGD with momentum and weight decay.

``fit(engine, x, y, TrainOptions(...))`` shuffles with a seeded generator, runs
``engine.loss_and_grads`` on each mini-batch and updates the engine's working
parameters with ``SGD``; ``on_step`` is called after every update (the
weight-difference analysis records its statistics there). Same inputs, options
and seed give identical weights. ``init_weights`` re-initialises a graph's layers
(He-normal weights, zero biases) for from-scratch training.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..core.errors import DataError, OptionError
from ..core.ir import Graph, Value
from ..core.progress import progress_iter
from .autograd import GradEngine

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainOptions:
    epochs: float = 1.0  # fractional epochs allowed; ``steps`` overrides
    steps: int | None = None  # exact number of SGD steps (cycles), if given
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    seed: int = 0

    def check(self) -> None:
        if self.batch_size < 1:
            raise OptionError(f"training batch size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0) or not math.isfinite(self.lr):
            raise OptionError(f"learning rate must be positive, got {self.lr}")
        if not (0 <= self.momentum < 1):
            raise OptionError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise OptionError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in LR_SCHEDULES:
            raise OptionError(f"learning-rate schedule {self.schedule!r} is unknown; choose "
                              f"{' or '.join(LR_SCHEDULES)}")
        if self.steps is not None and self.steps < 0:
            raise OptionError(f"steps must be >= 0, got {self.steps}")
        if self.epochs < 0:
            raise OptionError(f"epochs must be >= 0, got {self.epochs}")


class SGD:
    """PyTorch-style SGD: ``g += wd * w``; ``v = mu * v + g``; ``w -= lr * v`` (or Nesterov).

    Weight decay applies to weights only (tensors of rank >= 2), not to biases.
    ``frozen`` maps a parameter to a boolean mask of elements that must not move
    (pruned weights stay exactly zero).
    """

    def __init__(self, params: dict[Value, np.ndarray], *, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, frozen: dict[Value, np.ndarray] | None = None):
        self.params = params
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.frozen = frozen or {}
        self.velocity: dict[Value, np.ndarray] = {v: np.zeros_like(a) for v, a in params.items()}

    def step(self, grads: dict[Value, np.ndarray], lr: float) -> None:
        for v, w in self.params.items():
            g = grads.get(v)
            if g is None:
                continue
            g = g.astype(w.dtype, copy=False)
            if self.weight_decay and w.ndim >= 2:
                g = g + self.weight_decay * w
            buf = self.velocity[v]
            if self.momentum:
                buf *= self.momentum
                buf += g
                upd = g + self.momentum * buf if self.nesterov else buf
            else:
                upd = g
            m = self.frozen.get(v)
            if m is not None:
                upd = np.where(m, 0, upd)
                buf[m] = 0
            w -= lr * upd


def lr_at(opts: TrainOptions, step: int, total: int) -> float:
    if opts.warmup_steps and step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    if opts.schedule == "cosine" and total > 0:
        t = (step - opts.warmup_steps) / max(1, total - opts.warmup_steps)
        return 0.5 * opts.lr * (1 + math.cos(math.pi * min(1.0, t)))
    return opts.lr


@dataclass
class TrainResult:
    steps: int
    epochs: float
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per epoch (partial last epoch included)
    train_accuracy: list[float] = field(default_factory=list)  # running accuracy per epoch

    def to_json(self, timing: bool = False) -> dict:
        """JSON form; wall time only with ``timing`` (reports stay byte-identical run to run)."""
        d = {"steps": self.steps, "epochs": round(self.epochs, 4),
             "loss": [round(v, 6) for v in self.losses], "train_accuracy": [round(v, 6) for v in self.train_accuracy]}
        if timing:
            d["seconds"] = round(self.seconds, 3)
        return d


def check_labels(x: np.ndarray, y: np.ndarray | None, what: str = "training data") -> np.ndarray:
    if y is None:
        raise DataError(f"{what} has no labels (y_SPLIT): training needs labelled data")
    y = np.asarray(y)
    if len(y) != len(x):
        raise DataError(f"{what}: {len(y)} labels for {len(x)} samples")
    if y.ndim == 1 and y.dtype.kind not in "iu":
        if y.dtype.kind != "f" or not np.all(y == np.round(y)):
            raise DataError(f"{what}: labels must be integer class indices, got dtype {y.dtype}")
        y = y.astype(np.int64)
    return y


def fit(engine: GradEngine, x: np.ndarray, y: np.ndarray, opts: TrainOptions, *,
        frozen: dict[Value, np.ndarray] | None = None,
        on_step: Callable[[int, GradEngine], None] | None = None,
        progress: str | None = None) -> TrainResult:
    """Train ``engine``'s parameters in place on ``(x, y)``."""
    opts.check()
    y = check_labels(x, y)
    n = len(x)
    if n == 0:
        raise DataError("training data is empty")
    per_epoch = -(-n // opts.batch_size)
    total = opts.steps if opts.steps is not None else int(round(opts.epochs * per_epoch))
    opt = SGD(engine.params, momentum=opts.momentum, weight_decay=opts.weight_decay, nesterov=opts.nesterov,
              frozen=frozen)
    rng = np.random.default_rng(opts.seed)
    res = TrainResult(0, 0.0, 0.0)
    t0 = time.perf_counter()
    order = None
    ep_loss = ep_correct = ep_seen = 0.0
    for step in progress_iter(range(total), desc=progress):
        pos = step % per_epoch
        if pos == 0:
            order = rng.permutation(n)
        idx = order[pos * opts.batch_size:(pos + 1) * opts.batch_size]
        xb, yb = x[idx], y[idx]
        loss, grads, logits = engine.loss_and_grads(xb, yb)
        if not math.isfinite(loss):
            raise DataError(f"training diverged at step {step} (loss {loss}); lower the learning rate")
        opt.step(grads, lr_at(opts, step, total))
        ep_loss += loss * len(idx)
        ep_seen += len(idx)
        if yb.ndim == 1:
            ep_correct += float(np.sum(np.argmax(logits.reshape(len(idx), -1), axis=1) == yb))
        res.steps = step + 1
        if on_step is not None:
            on_step(step, engine)
        if pos == per_epoch - 1 or step == total - 1:
            res.losses.append(ep_loss / ep_seen)
            res.train_accuracy.append(ep_correct / ep_seen)
            ep_loss = ep_correct = ep_seen = 0.0
    res.epochs = res.steps / per_epoch
    res.seconds = time.perf_counter() - t0
    return res


def accuracy(engine: GradEngine, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of the engine's current parameters (fake-quantized when it has a QuantSpec)."""
    logits = engine.predict(x, batch_size)
    return float(np.mean(np.argmax(logits.reshape(len(x), -1), axis=1) == np.asarray(y)))


def init_weights(graph: Graph, seed: int = 0) -> None:
    """Fresh He-normal weights (fan-in, gain sqrt(2)) and zero biases for every layer, in graph order."""
    rng = np.random.default_rng(seed)
    for n in graph.layers():
        w = n.weight
        shape = w.const.shape
        if n.op_type == "Conv":
            fan_in = int(np.prod(shape[1:]))
        elif n.op_type == "Gemm":
            fan_in = shape[1] if n.attr("transB", 0) else shape[0]
        else:
            fan_in = shape[-2] if len(shape) >= 2 else shape[0]
        std = math.sqrt(2.0 / max(1, fan_in))
        w.set_const((rng.standard_normal(shape) * std).astype(w.const.dtype))
        b = n.bias
        if b is not None:
            b.set_const(np.zeros(b.const.shape, b.const.dtype))
