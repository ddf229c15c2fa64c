"""AdaRound: each layer's rounding learned by gradient descent on the layer's reconstruction error, through
the project's autograd engine (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020).

A weight ``w`` with step ``s`` is rounded down or up: ``w_q = s * clip(floor(w / s) + h, qmin, qmax)``
with ``h`` in {0, 1}. AdaRound relaxes ``h`` to the rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta -
gamma) + gamma, 0, 1)`` (``zeta = 1.1``, ``gamma = -0.1``), starts ``V`` where ``h`` equals the
fractional part of ``w / s`` (the float weight itself), and minimises, with Adam, the error of the
layer's output *after its activation* (ReLU, ReLU6, HardSwish, ...: errors the activation clips away
cost nothing) against the float network's, plus ``lambda * sum(1 - |2 h - 1|^beta)``, which pushes every
``h`` to 0 or 1 as ``beta`` falls from 20 to 2 after a warm-up without it. At the end ``h = [V >= 0]``:
the weights lie exactly on the layer's grid (power-of-two scales, the format's integer range), so the
emulator and the exported QDQ model run them bit for bit as any other integer weights. The bias, a
float parameter quantized at export to its own fine format, is trained in the same loop (as AdaQuant,
Hubara et al. 2021, does); it can be left alone.

The layer is fitted from the *quantized* network's input (the layers before it already rounded) to the
*float* network's output (the asymmetric reconstruction of the paper), so it also compensates what
the earlier layers lost. Forward and backward run on a one-layer graph (the layer and its activation)
with ``runtime.autograd.GradEngine``; each step sees ``batch`` random crops of ``crop`` x ``crop``
output positions (a Conv's input is padded once and cropped to exactly the window those outputs read),
so a step costs the same on a 112 x 112 layer as on a 7 x 7 one. Seeded: the same inputs and options
give the same weights. docs/ROUNDING.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.errors import OptionError
from ..core.ir import Graph, Node, Value
from ..core.qformat import QFormat, qrange
from ..runtime.autograd import BACKWARD, GradEngine
from ..runtime.executor import float_node_fn
from ..runtime.ops import conv_params
from .rounding import RoundingResult, channel_steps, round_nearest, weight_matrix, weight_tensor

ZETA, GAMMA = 1.1, -0.1

#: elementwise activations fitted together with the layer that feeds them (when it is their only reader)
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh")


@dataclass(frozen=True)
class AdaRoundOptions:
    """iters: Adam steps per layer; batch: crops (Conv) or samples (Gemm/MatMul) per step; crop: output
    positions per side of a crop; lr: Adam's learning rate; reg: lambda, the weight of the rounding
    regulariser; warmup: fraction of the steps without it; beta: its exponent, annealed from the first
    to the second value; bias: train the bias as well; seed: the crops' random order."""
    iters: int = 400
    batch: int = 16
    crop: int = 16
    lr: float = 0.01
    reg: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    bias: bool = True
    seed: int = 0

    def check(self) -> None:
        for name in ("iters", "batch", "crop"):
            if getattr(self, name) < 1:
                raise OptionError(f"adaround: {name}={getattr(self, name)} must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OptionError(f"adaround: lr={self.lr} must be a positive number (e.g. 0.01)")
        if not self.reg >= 0:
            raise OptionError(f"adaround: reg={self.reg} must be >= 0 (e.g. 0.01)")
        if not 0 <= self.warmup < 1:
            raise OptionError(f"adaround: warmup={self.warmup} must be in [0, 1) (e.g. 0.2)")


def fused_activation(node: Node) -> Node | None:
    """The elementwise activation that reads ``node``'s output, when it is the output's only reader and
    its other inputs are constants (its error is what the layer is fitted on)."""
    out = node.outputs[0]
    readers = out.consumers()
    if len(readers) != 1:
        return None
    a = readers[0]
    if a.op_type not in ACTIVATIONS or a.op_type not in BACKWARD or a.inputs[0] is not out:
        return None
    if any(v is not None and not v.is_const for v in a.inputs[1:]):
        return None
    return a


def layer_graph(node: Node, act: Node | None, x_shape: tuple[int, ...]) -> tuple[Graph, Value, Value | None]:
    """A graph of ``node`` alone (a Conv with its pads removed: its input comes padded) followed by
    ``act``, weight and bias as constants the engine trains. Returns (graph, weight, bias)."""
    g = Graph(name=f"adaround_{node.name}")
    x = Value("x", shape=x_shape)
    g.inputs.append(x)
    attrs = dict(node.attrs)
    if node.op_type == "Conv":
        nd = len(x_shape) - 2
        attrs["pads"] = [0] * (2 * nd)
        attrs.pop("auto_pad", None)
    w = g.constant("w", np.array(node.weight.const, np.float32))
    b = None
    if node.op_type in ("Conv", "Gemm"):
        src = node.bias
        rows = weight_matrix(node).shape  # (groups, channels per group, fan-in)
        b = g.constant("b", np.zeros(rows[0] * rows[1], np.float32) if src is None
                       else np.array(src.const, np.float32))
    ins = [x, w] + ([b] if b is not None else [])
    y = g.add_node(node.op_type, ins, 1, attrs, name=node.name).outputs[0]
    if act is not None:
        y = g.add_node(act.op_type, [y] + list(act.inputs[1:]), 1, dict(act.attrs), name=act.name).outputs[0]
    g.outputs.append(y)
    return g, w, b


class _Crops:
    """Random crops of a layer's (padded) quantized input and the matching float outputs."""

    def __init__(self, node: Node, xq: np.ndarray, yf: np.ndarray, crop: int):
        self.conv = node.op_type == "Conv" and xq.ndim > 2
        if self.conv:
            strides, pads, dil = conv_params(node, xq.shape, node.weight.const.shape)
            nd = xq.ndim - 2
            width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
            self.x = np.pad(xq, width)
            self.strides, self.dil = strides, dil
            self.kernel = node.weight.const.shape[2:]
            self.t = [min(crop, yf.shape[2 + i]) for i in range(nd)]
        else:
            self.x = xq
        self.y = yf

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.y)
        idx = rng.integers(0, n, size=batch)
        if not self.conv:
            return self.x[idx], self.y[idx]
        xs, ys = [], []
        for i in idx:
            sx, sy = [slice(None)], [slice(None)]
            for d, t in enumerate(self.t):
                o = int(rng.integers(0, self.y.shape[2 + d] - t + 1))
                span = (t - 1) * self.strides[d] + (self.kernel[d] - 1) * self.dil[d] + 1
                sx.append(slice(o * self.strides[d], o * self.strides[d] + span))
                sy.append(slice(o, o + t))
            xs.append(self.x[(int(i),) + tuple(sx)])
            ys.append(self.y[(int(i),) + tuple(sy)])
        return np.stack(xs), np.stack(ys)

    def full(self, chunk: int = 16):
        for s in range(0, len(self.y), chunk):
            yield self.x[s:s + chunk], self.y[s:s + chunk]


class _Adam:
    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t, self.m, self.v = lr, b1, b2, eps, 0, {}, {}

    def step(self, params: dict, grads: dict) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for k, g in grads.items():
            m = self.m[k] = self.b1 * self.m.get(k, 0) + (1 - self.b1) * g
            v = self.v[k] = self.b2 * self.v.get(k, 0) + (1 - self.b2) * g * g
            params[k] -= self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)


def rectified_sigmoid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``h(V)`` and ``dh/dV``."""
    s = 1.0 / (1.0 + np.exp(-v))
    raw = s * (ZETA - GAMMA) + GAMMA
    inside = (raw > 0) & (raw < 1)
    return np.clip(raw, 0.0, 1.0), np.where(inside, s * (1 - s) * (ZETA - GAMMA), 0.0)


def initial_v(frac: np.ndarray) -> np.ndarray:
    """``V`` with ``h(V) = frac`` (the float weight): the inverse of the rectified sigmoid."""
    p = np.clip((frac - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _output_error(engine: GradEngine, crops: _Crops) -> tuple[float, float]:
    """Sum of squared output errors and of squared float outputs over all the samples."""
    err = energy = 0.0
    for xb, yb in crops.full():
        y = engine.forward(xb, record=False).logits.astype(np.float64)
        err += float(np.sum((y - yb) ** 2))
        energy += float(np.sum(yb.astype(np.float64) ** 2))
    return err, energy or 1.0


def adaround_layer(node: Node, xq: np.ndarray, yf: np.ndarray, act: Node | None, fmt: QFormat,
                   opts: AdaRoundOptions) -> RoundingResult:
    """The learned rounding of ``node``'s weights in ``fmt``: ``xq`` the layer's (quantized) inputs on the
    calibration samples, ``yf`` the float network's outputs of ``act`` (of the layer when None). Keeps
    round to nearest when the learned rounding does not lower the output error on those samples."""
    crops = _Crops(node, np.asarray(xq, np.float32), np.asarray(yf, np.float32), opts.crop)
    graph, wv, bv = layer_graph(node, act, (None, crops.x.shape[1]) + (None,) * (crops.x.ndim - 2))
    train_bias = bv is not None and opts.bias
    params = [wv] + ([bv] if train_bias else [])
    engine = GradEngine(graph, params=params, dtype=np.float32)

    wm = weight_matrix(node, np.asarray(node.weight.const, np.float64))
    g, o, d = wm.shape
    lo, hi = qrange(fmt.bits, fmt.signed)
    step = channel_steps(fmt, g, o)
    sc = step[:, :, None]
    base = np.floor(wm / sc)

    def weights(h):
        q = base + h
        return np.clip(q, lo, hi) * sc, (q >= lo) & (q <= hi)

    def set_weight(m):
        engine.params[wv] = weight_tensor(node, m).astype(np.float32)

    near = round_nearest(wm, step, lo, hi)
    set_weight(near)
    err_near, energy = _output_error(engine, crops)

    state = {"v": initial_v(wm / sc - base)}
    if train_bias:
        state["b"] = engine.params[bv].astype(np.float64)
    adam = _Adam(opts.lr)
    rng = np.random.default_rng(opts.seed)
    warm = int(opts.warmup * opts.iters)
    b0, b1 = opts.beta
    for it in range(opts.iters):
        h, dh = rectified_sigmoid(state["v"])
        wsoft, inside = weights(h)
        set_weight(wsoft)
        if "b" in state:
            engine.params[bv] = state["b"].astype(np.float32)
        xb, yb = crops.sample(rng, opts.batch)
        tape = engine.forward(xb)
        diff = tape.logits.astype(np.float64) - yb
        positions = diff.size / diff.shape[1]  # the error summed over channels, averaged over positions
        grads = engine.backward(tape, (2.0 * diff / positions).astype(np.float32))
        gv = weight_matrix(node, grads[wv].astype(np.float64)) * sc * inside * dh
        if it >= warm and opts.reg > 0:
            beta = b1 + (b0 - b1) * (1 - (it - warm) / max(1, opts.iters - warm))
            u = 2 * h - 1
            gv -= opts.reg * beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2 * dh
        upd = {"v": gv}
        if "b" in state:
            upd["b"] = grads[bv].astype(np.float64)
        adam.step(state, upd)

    hard, _ = weights((state["v"] >= 0).astype(np.float64))
    set_weight(hard)
    if "b" in state:
        engine.params[bv] = state["b"].astype(np.float32)
    err_opt, _ = _output_error(engine, crops)
    if err_opt >= err_near:  # keep round to nearest (and the bias as it was)
        return RoundingResult(weight_tensor(node, near).astype(node.weight.const.dtype), None, fmt, 0,
                              err_near / energy, err_near / energy)
    new_b = state["b"].astype(np.float32) if "b" in state else None
    return RoundingResult(weight_tensor(node, hard).astype(node.weight.const.dtype), new_b, fmt, 0,
                          err_near / energy, err_opt / energy)


def adaround_solver(opts: AdaRoundOptions):
    """The per-layer solver ``rounding.optimise_rounding_sequential`` calls: ``solve(node, args_f, xq, fmt)``
    with the float network's arguments of ``node`` and the quantized network's inputs, batch by batch."""
    opts.check()

    def solve(node: Node, args_f: list[list], xq: list[np.ndarray], fmt: QFormat) -> RoundingResult:
        act = fused_activation(node)
        yf = []
        for a in args_f:
            y = float_node_fn(node, a)[0]
            if act is not None:
                y = float_node_fn(act, [y] + [None if v is None else v.const for v in act.inputs[1:]])[0]
            yf.append(y)
        return adaround_layer(node, np.concatenate(xq), np.concatenate(yf), act, fmt, opts)

    return solve
