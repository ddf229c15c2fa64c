"""Bias correction: the expected output error of quantized weights, ``(W_q - W) E[x]``, folded
into the biases (the bias-correction pass applies it; the searches simulate it).

Analytic bias correction as in Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, with E[x] measured on the calibration
data (``LayerInputMeans``) instead of derived from BatchNorm statistics.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..core.ir import Graph, Node
from ..core.qformat import QFormat, fake_quant
from ..runtime.ops import conv_pads
from .layerstats import LayerInputStats
from .quant import bias_fits

META_KEY = "mpqc.bias_correction"


def correctable(node: Node) -> bool:
    """Layers whose bias (present or added) can absorb the correction."""
    if node.op_type == "Conv":
        return True
    if node.op_type == "Gemm":
        return not node.attr("transA", 0) and float(node.attr("beta", 1.0)) != 0.0
    return False


def _tap_means(node: Node, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Sum over the batch and output positions of each (input channel, kernel tap) of a Conv's padded
    input, and the count, so that sum / count is E[x] at each tap."""
    w = node.weight.const
    nd = x.ndim - 2
    kernel = list(node.attr("kernel_shape", w.shape[2:]))
    strides = list(node.attr("strides", [1] * nd))
    dil = list(node.attr("dilations", [1] * nd))
    pads = conv_pads(node, list(x.shape[2:]), kernel, strides, dil)
    # the sum over the batch first (it is linear): the taps then slice one (C, H, W) plane, not the batch
    width = [(0, 0)] + [(max(pads[i], 0), max(pads[i + nd], 0)) for i in range(nd)]
    xp = np.pad(x.sum(axis=0, dtype=np.float64), width)
    out = [(x.shape[2 + i] + pads[i] + pads[i + nd] - ((kernel[i] - 1) * dil[i] + 1)) // strides[i] + 1
           for i in range(nd)]
    sums = np.zeros((x.shape[1],) + tuple(kernel))
    for tap in itertools.product(*[range(k) for k in kernel]):
        sl = tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(tap, dil, out, strides))
        sums[(slice(None),) + tap] = xp[(slice(None),) + sl].sum(axis=tuple(range(1, 1 + nd)))
    return sums, int(x.shape[0] * np.prod(out))


class LayerInputMeans(LayerInputStats):
    """``{layer: E[x]}`` on the calibration data (float network): per (channel, tap) for a Conv,
    per input feature for a Gemm. Only layers that ``correctable`` accepts."""
    name = "layer-input-means"
    persist = "layer-input-means"
    desc = "bias correction: input means"
    needed_by = "bias correction"

    accepts = staticmethod(correctable)

    def accumulate(self, node: Node, x: np.ndarray) -> tuple[np.ndarray, int]:
        if node.op_type == "Conv":
            return _tap_means(node, x)
        return x.reshape(-1, x.shape[-1]).astype(np.float64).sum(axis=0), int(np.prod(x.shape[:-1]))


@dataclass(eq=False)
class BiasCorrection:
    """Callable ``(node, weight_format) -> correction`` (float64 per output channel, None where the layer
    is not corrected): the expected output error ``(W_q - W) E[x]`` to subtract from the bias."""
    means: dict[Node, np.ndarray]

    def __post_init__(self):
        self._cache: dict[tuple, np.ndarray | None] = {}

    def __call__(self, node: Node, w_fmt: QFormat) -> np.ndarray | None:
        key = (node, w_fmt)  # the Node itself (identity), not id(): this object may be pickled
        if key not in self._cache:
            self._cache[key] = self._compute(node, w_fmt)
        return self._cache[key]

    def _compute(self, node: Node, w_fmt: QFormat) -> np.ndarray | None:
        m = self.means.get(node)
        if m is None:
            return None
        w = node.weight.const
        dw = fake_quant(w, w_fmt).astype(np.float64) - w.astype(np.float64)
        if node.op_type == "Conv":
            g = int(node.attr("group", 1))
            o, cg = w.shape[0], w.shape[1]
            taps = w.shape[2:]
            return np.einsum("gmck,gck->gm", dw.reshape(g, o // g, cg, -1),
                             m.reshape(g, cg, int(np.prod(taps)))).reshape(o)
        # Gemm (transA = 0): y = alpha * x @ B + beta * C, B = W^T when transB
        c = dw @ m if node.attr("transB", 0) else m @ dw
        return c * float(node.attr("alpha", 1.0)) / float(node.attr("beta", 1.0))

    def corrected_bias(self, node: Node, w_fmt: QFormat, b_fmt: QFormat | None = None) -> np.ndarray | None:
        """The float bias with the correction folded in; None when the layer is not corrected (not
        correctable, or the corrected bias would not fit ``b_fmt``, the accumulator at the bias scale)."""
        c = self(node, w_fmt)
        if c is None:
            return None
        b = node.bias.const.astype(np.float64) if node.bias is not None else np.zeros(c.shape)
        nb = (b.reshape(-1) - c).astype(np.float32)
        if b_fmt is not None and not bias_fits(nb, b_fmt):
            return None
        return nb


def bias_correction_for(graph: Graph, ctx) -> BiasCorrection:
    return BiasCorrection(ctx.analyses.get(LayerInputMeans, graph))

