"""Rounding optimisation: each layer's integer weights chosen to minimise the error of its outputs on
the calibration data, not rounded one by one to the nearest grid point.

Rounding every weight to its nearest grid point minimises ``|W_q - W|`` element by element, but what
matters is the layer's output ``W_q x``: errors of weights that see correlated inputs add up or cancel.
With ``H = sum_x x x^T`` over the calibration inputs of a layer (its im2col patches for a Conv), the
output error of output channel ``o`` is ``(w_q - w)^T H (w_q - w)``, and choosing ``w_q`` on the grid to
minimise it is a layer-wise reconstruction problem (Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020, which solves it by gradient descent on a relaxed rounding
variable). This module solves it the way of Optimal Brain Quantization (Frantar and Alistarh, "Optimal
Brain Compression", NeurIPS 2022, and its fast form GPTQ, Frantar et al., ICLR 2023): quantize one
input column at a time and spread its rounding error over the columns not yet quantized, with the
optimal update ``-err * Hinv[i, i+1:] / Hinv[i, i]`` read from the Cholesky factor of ``H^-1``. It is
closed form (no learning rate, no iterations, no randomness), costs one ``D x D`` factorisation per
layer (per group for a grouped or depthwise Conv), and keeps every weight inside the format's integer
range, so the result is an ordinary integer weight tensor in the layer's own format: the emulator and
the exported QDQ model run it bit for bit as they run any other.

Two refinements, both measured on EfficientNet-Lite0 (docs/ROUNDING.md): columns in the order of
decreasing ``H[i, i]`` (the inputs with the most energy first, GPTQ's "act order"), and, for power-of-two
formats, each output channel may move to the next finer fractional length when that lowers its output
error (the grid is twice as fine and the few weights above its range saturate; the error spreading
compensates them); a finer format is only taken when the bias still fits the accumulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..core.ir import Graph, Node
from ..core.progress import progress_iter
from ..core.qformat import QFormat, qrange
from ..runtime.executor import float_node_fn
from ..runtime.fakequant import fake_quant_act, ir_node_fn
from ..runtime.ops import conv_pads
from .layerstats import LayerInputStats, run_side_by_side
from .quant import bias_fits

META_KEY = "mpqc.optimized_rounding"

#: columns per block of the lazy error updates (obq_round)
_BLOCK = 128

#: bytes of one chunk of im2col patches (float32) while accumulating a Conv's Gram matrix
_CHUNK_BYTES = 64 << 20


def optimizable(node: Node) -> bool:
    """Layers whose weights the rounding optimisation handles: Conv, Gemm (transA = 0) and MatMul with a
    2-D constant weight. ConvTranspose keeps round-to-nearest."""
    if node.weight is None:
        return False
    if node.op_type == "Conv":
        return True
    if node.op_type == "Gemm":
        return not node.attr("transA", 0) and node.weight.const.ndim == 2
    if node.op_type == "MatMul":
        return node.weight.const.ndim == 2
    return False


# ---------------------------------------------------------------------------------------------- Grams
def conv_patches(node: Node, x: np.ndarray) -> np.ndarray:
    """A Conv's im2col patches of the batch ``x``: ``(groups, C/groups * prod(kernel), N * positions)``
    float32, rows in the order of ``weight.reshape(O, -1)`` (channel, then kernel taps), zero padding and
    dilation included."""
    w = node.weight.const
    nd = x.ndim - 2
    kernel = list(node.attr("kernel_shape", w.shape[2:]))
    strides = list(node.attr("strides", [1] * nd))
    dil = list(node.attr("dilations", [1] * nd))
    pads = conv_pads(node, list(x.shape[2:]), kernel, strides, dil)
    g = int(node.attr("group", 1))
    x = np.asarray(x, np.float32)
    # a negative pad crops
    crop = tuple([slice(None), slice(None)] + [slice(max(-pads[i], 0), x.shape[2 + i] - max(-pads[i + nd], 0))
                                               for i in range(nd)])
    x = x[crop]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(max(pads[i], 0), max(pads[i + nd], 0)) for i in range(nd)])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    v = sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))  # N, C, *out_full, *span
    v = v[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
          + tuple(slice(None, None, d) for d in dil)]
    n, c = v.shape[:2]
    out = v.shape[2:2 + nd]
    v = v.reshape((n, g, c // g) + tuple(out) + tuple(kernel))
    # -> g, c/g, *kernel, n, *out
    order = (1, 2) + tuple(range(3 + nd, 3 + 2 * nd)) + (0,) + tuple(range(3, 3 + nd))
    return np.ascontiguousarray(v.transpose(order)).reshape(g, (c // g) * int(np.prod(kernel)), -1)


def augmented_patches(node: Node, x: np.ndarray) -> np.ndarray:
    """A layer's inputs as ``(groups, D + 1, count)`` float32 columns: im2col patches for a Conv, the
    feature vectors for a Gemm/MatMul, with a last row of ones (the bias's input)."""
    if node.op_type == "Conv":
        p = conv_patches(node, x)
    else:
        p = np.asarray(x, np.float32).reshape(-1, x.shape[-1]).T[None]
    return np.concatenate([p, np.ones((p.shape[0], 1, p.shape[2]), np.float32)], axis=1)


def _chunks(node: Node, x: np.ndarray):
    """Slices of the batch whose patches take at most ``_CHUNK_BYTES``."""
    taps = int(np.prod(node.weight.const.shape[2:])) if node.op_type == "Conv" else 1
    per_image = 4 * int(np.prod(x.shape[1:])) * taps
    step = max(1, _CHUNK_BYTES // max(per_image, 1))
    return [slice(i, i + step) for i in range(0, len(x), step)]


def layer_grams(node: Node, xf: np.ndarray, xq: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Sums over a batch of the augmented inputs' products: ``(Hff, count)`` for float inputs alone;
    ``(Hqq, Hqf, Hff, count)`` with the quantized network's inputs ``xq`` too. float64, ``(G, D+1, D+1)``."""
    acc = None
    count = 0
    for sl in _chunks(node, xf):
        pf = augmented_patches(node, xf[sl])
        if xq is None:
            parts = (np.matmul(pf, pf.transpose(0, 2, 1), dtype=np.float32),)
        else:
            pq = augmented_patches(node, xq[sl])
            pqt = pq.transpose(0, 2, 1)
            parts = (np.matmul(pq, pqt, dtype=np.float32), np.matmul(pq, pf.transpose(0, 2, 1), dtype=np.float32),
                     np.matmul(pf, pf.transpose(0, 2, 1), dtype=np.float32))
        parts = tuple(a.astype(np.float64) for a in parts)
        acc = parts if acc is None else tuple(a + b for a, b in zip(acc, parts))
        count += pf.shape[2]
    return (*acc, count)


def mean_layer_grams(node: Node, pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(Hqq, Hqf, Hff, count)``: the mean augmented Grams of ``node``'s inputs over the batches
    ``pairs`` of ``(x_f, x_q)`` (``x_q`` None: float inputs alone, and the three Grams are one)."""
    acc = None
    for xf, xq in pairs:
        part = layer_grams(node, np.asarray(xf), None if xq is None else np.asarray(xq))
        acc = part if acc is None else tuple(a + b for a, b in zip(acc, part))
    cnt = acc[-1]
    if len(acc) == 2:
        h = acc[0] / cnt
        return h, h, h, cnt
    return acc[0] / cnt, acc[1] / cnt, acc[2] / cnt, cnt


class LayerInputGrams(LayerInputStats):
    """``{layer: H}`` on the calibration data (float network): ``H = mean(x x^T)`` over a layer's inputs
    with a constant 1 appended (the bias's input), ``(groups, D+1, D+1)`` float32 for a Conv (its im2col
    patches, one matrix per group), ``(1, D+1, D+1)`` for a Gemm or MatMul. Only the layers
    ``optimizable`` accepts."""
    name = "layer-input-grams"
    persist = "layer-input-grams"
    desc = "rounding: layer input statistics"
    needed_by = "rounding optimisation"

    accepts = staticmethod(optimizable)

    def accumulate(self, node: Node, x: np.ndarray) -> tuple[np.ndarray, int]:
        return layer_grams(node, x)

    def finish(self, mean: np.ndarray) -> np.ndarray:
        return mean.astype(np.float32)  # float32 whether computed or read from the cache: the same bytes


# ---------------------------------------------------------------------------------------------- solver
def weight_matrix(node: Node, w: np.ndarray | None = None) -> np.ndarray:
    """The weight as ``(groups, O/groups, D)``: rows are output channels, columns the inputs of the Gram."""
    w = node.weight.const if w is None else w
    if node.op_type == "Conv":
        g = int(node.attr("group", 1))
        return w.reshape(g, w.shape[0] // g, -1)
    if node.op_type == "Gemm" and node.attr("transB", 0):
        return w[None]
    return w.T[None]  # Gemm (transB = 0) and MatMul: [D, O]


def weight_tensor(node: Node, m: np.ndarray) -> np.ndarray:
    """Inverse of ``weight_matrix``."""
    w = node.weight.const
    if node.op_type == "Conv":
        return m.reshape(w.shape)
    if node.op_type == "Gemm" and node.attr("transB", 0):
        return m[0]
    return m[0].T


def channel_steps(fmt: QFormat, g: int, o: int) -> np.ndarray:
    """Each output channel's grid step as ``(G, O)`` (a per-tensor format's one step broadcast)."""
    return np.broadcast_to(np.asarray(fmt.scale(), np.float64).reshape(-1), (g * o,)).reshape(g, o)


def round_nearest(wm: np.ndarray, step: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """``wm`` ``(G, O, D)`` rounded half up to its channels' grids (``step`` ``(G, O)``), saturated."""
    s = step[:, :, None]
    return np.clip(np.floor(wm / s + 0.5), qmin, qmax) * s


def obq_sweep(w: np.ndarray, h: np.ndarray, pick, *, damp: float = 0.01, act_order: bool = True,
              free: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Optimal-brain-quantization sweep of the rows of ``w`` in the metric of ``h``: column by column
    (in the order of decreasing ``h[i, i]`` with ``act_order``), ``pick(col)`` chooses each column's
    values on the caller's grid, and the column's error is spread over the columns not yet chosen
    through the Cholesky factor of ``(h + damp * mean(diag h) I)^-1`` (GPTQ's lazy block updates).
    The last ``free`` columns are never chosen: they take their share of the errors and come back as
    floats (a bias column). Inputs that never carry signal (``h[i, i] == 0``) take ``pick``'s choice
    and pass nothing on.

    ``w``: ``(G, O, D)``; ``h``: ``(G, D, D)`` symmetric positive semi-definite; ``pick(col)`` with
    ``col`` ``(G, O)`` returns ``(values, codes)``, both ``(G, O)``. Returns the codes ``(G, O, D -
    free)`` int64 in the original column order and the free columns ``(G, O, free)`` float64.
    """
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    g, o, d = w.shape
    nq = d - free
    diag = np.diagonal(h, axis1=1, axis2=2).copy()
    dead = diag <= 0
    idx = np.arange(d)
    perm = np.broadcast_to(idx, (g, d)).copy()
    if act_order:
        perm[:, :nq] = np.argsort(-diag[:, :nq], axis=1, kind="stable")
    gi = np.arange(g)[:, None]
    hp = h[gi[:, :, None], perm[:, :, None], perm[:, None, :]]
    deadp = dead[gi, perm]
    # a dead input: no coupling, unit curvature (it then takes pick's choice and passes nothing on)
    hp = np.where(deadp[:, :, None] | deadp[:, None, :], 0.0, hp)
    hp[:, idx, idx] = np.where(deadp, 1.0, hp[:, idx, idx])
    hp[:, idx, idx] += damp * np.mean(hp[:, idx, idx], axis=1)[:, None]
    u = np.linalg.cholesky(np.linalg.inv(hp)).transpose(0, 2, 1)  # upper: H^-1 = U^T U
    wp = np.take_along_axis(w, perm[:, None, :], axis=2)
    q = np.zeros((g, o, nq), dtype=np.int64)
    # GPTQ's lazy updates: columns in blocks; inside a block the errors go to the block's own columns
    # one by one, then to everything after the block in one matrix product
    for b0 in range(0, nq, _BLOCK):
        b1 = min(b0 + _BLOCK, nq)
        errs = np.empty((g, o, b1 - b0))
        for i in range(b0, b1):
            col = wp[:, :, i]
            val, code = pick(col)
            q[:, :, i] = code
            err = (col - val) / u[:, i, i][:, None]
            errs[:, :, i - b0] = err
            if i + 1 < b1:
                wp[:, :, i + 1:b1] -= err[:, :, None] * u[:, None, i, i + 1:b1]
        if b1 < d:
            wp[:, :, b1:] -= np.matmul(errs, u[:, b0:b1, b1:])
    out = np.empty_like(q)
    np.put_along_axis(out, perm[:, None, :nq], q, axis=2)
    return out, wp[:, :, nq:]


def obq_round(w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, *,
              damp: float = 0.01, act_order: bool = True, free: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Integers ``q`` with ``q * scale`` close to ``w`` in the metric of ``h``: :func:`obq_sweep` with
    each column rounded to nearest and saturated. ``scale``: ``(G, O)``, the step of each row.
    Returns ``(q, rest)``: ``(G, O, D - free)`` int64 and the free columns ``(G, O, free)`` float64.
    """
    g, o, _ = np.shape(w)
    s = np.asarray(scale, np.float64).reshape(g, o)

    def nearest(col):
        qi = np.clip(np.floor(col / s + 0.5), qmin, qmax)
        return qi * s, qi.astype(np.int64)

    return obq_sweep(w, h, nearest, damp=damp, act_order=act_order, free=free)


def quad_rows(a: np.ndarray, h: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row ``a h b^T``: ``(G, O)`` (one matrix product, not an einsum loop)."""
    return np.sum(np.matmul(a, h) * b, axis=2)


def reduced_metric(h: np.ndarray, free: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The metric of the quantized columns with the free ones at their optimum (Schur complement
    ``H_QQ - H_QF H_FF^-1 H_FQ``) and ``H_QF H_FF^-1`` (None without free columns)."""
    if not free:
        return h, None
    nq = h.shape[1] - free
    hqf = h[:, :nq, nq:]
    m = np.linalg.solve(h[:, nq:, nq:] + 1e-12 * np.eye(free), hqf.transpose(0, 2, 1)).transpose(0, 2, 1)
    return h[:, :nq, :nq] - m @ hqf.transpose(0, 2, 1), m


def with_free_columns(wq: np.ndarray, wstar: np.ndarray, h: np.ndarray, free: int) -> np.ndarray:
    """``wq`` (the quantized columns) with the free columns of ``wstar`` set to their optimum in the metric
    ``h``: ``f = w*_F - (wq - w*_Q) H_QF H_FF^-1``."""
    if not free:
        return wq
    nq = wq.shape[2]
    _, m = reduced_metric(h, free)
    f = wstar[:, :, nq:] - np.matmul(wq - wstar[:, :, :nq], m)
    return np.concatenate([wq, f], axis=2)


def row_loss(wq: np.ndarray, wt: np.ndarray, hqq: np.ndarray, hqf: np.ndarray, hff: np.ndarray) -> np.ndarray:
    """Per row ``E[(wq . x_q - wt . x_f)^2]`` from the Grams: ``(G, O)``."""
    return quad_rows(wq, hqq, wq) - 2.0 * quad_rows(wq, hqf, wt) + quad_rows(wt, hff, wt)


@dataclass
class RoundingResult:
    """One layer's optimised weights: the float tensor on the grid of ``fmt`` (exactly ``q * scale``), the
    new float bias (None: unchanged), the format (finer than the given one on ``finer`` channels), and the
    output errors of round-to-nearest and of the optimised rounding relative to the output energy."""
    weight: np.ndarray
    bias: np.ndarray | None
    fmt: QFormat
    finer: int
    error_nearest: float
    error_optimised: float


def augmented_problem(wm: np.ndarray, b: np.ndarray | None, grams, use_bias: bool
                      ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    """The layer's fitting problem: ``wm`` ``(G, O, D)`` with the bias ``b`` (None: zeros) appended as a
    free column when ``use_bias`` (the Grams keep their constant-1 input), else ``wm`` alone and the
    Grams cut to ``D x D``. Returns ``(wt, (Hqq, Hqf, Hff), free)``."""
    g, o, d = wm.shape
    hqq, hqf, hff = (np.asarray(a, np.float64) for a in grams)
    if not use_bias:
        return wm, (hqq[:, :d, :d], hqf[:, :d, :d], hff[:, :d, :d]), 0
    b = np.zeros((g, o, 1)) if b is None else np.asarray(b, np.float64).reshape(g, o, 1)
    return np.concatenate([wm, b], axis=2), (hqq, hqf, hff), 1


def least_squares_target(wt: np.ndarray, hqq: np.ndarray, hqf: np.ndarray, *, damp: float = 0.01,
                         count: int | None = None, min_samples: float = 32.0) -> np.ndarray:
    """The weights that best map the quantized network's inputs to the float layer's outputs:
    ``W* = Wt Hfq Hqq^-1 = Wt + Wt (Hfq - Hqq) Hqq^-1`` (the ridge ``damp * mean(diag Hqq)`` only on the
    correction, so that float inputs give ``W* = Wt`` exactly). ``wt`` ``(G, O, D)``, the Grams
    ``(G, D, D)``. With ``count`` input vectors below ``min_samples`` per input the correction is left
    out (it would fit the calibration samples' noise) and ``wt`` comes back."""
    dd = hqq.shape[1]
    corr = hqf - hqq
    if count is not None and count < min_samples * dd:
        return wt
    if not np.any(corr):
        return wt
    ridge = damp * np.mean(np.diagonal(hqq, axis1=1, axis2=2), axis=1)[:, None, None] * np.eye(dd)
    return wt + np.linalg.solve(hqq + ridge, corr @ wt.transpose(0, 2, 1)).transpose(0, 2, 1)


def optimise_layer(node: Node, grams: tuple[np.ndarray, np.ndarray, np.ndarray], fmt: QFormat, *,
                   damp: float = 0.01, act_order: bool = True, finer: int = 1, bias: bool = True,
                   frac_cap: np.ndarray | None = None, count: int | None = None,
                   min_samples: float = 32.0) -> RoundingResult:
    """The optimised rounding of ``node``'s weights in ``fmt`` given the augmented Grams ``(Hqq, Hqf, Hff)``
    of its inputs (the quantized network's ``x_q`` and the float network's ``x_f``, with a constant 1
    appended; all three equal when the inputs are the float ones): minimises ``E|W_q x_q - W x_f|^2``
    (with ``bias``, ``b`` is re-fitted jointly: ``[W_q, b'] [x_q; 1]`` against ``[W, b] [x_f; 1]``).
    ``count``: the number of input vectors behind the Grams; below ``min_samples`` per input the
    least-squares correction for the inputs' quantization error is left out (measured on
    EfficientNet-Lite0's late layers, 3136 patches for 1153 inputs: it fits the calibration samples'
    noise, test logit MSE 0.0076 with it against 0.0058 without)."""
    w32 = node.weight.const
    wm = weight_matrix(node, w32.astype(np.float64))
    g, o, d = wm.shape
    b = node.bias.const if node.bias is not None else None
    use_bias = bias and node.op_type in ("Conv", "Gemm")
    wt, (hqq, hqf, hff), free = augmented_problem(wm, b, grams, use_bias)
    wstar = least_squares_target(wt, hqq, hqf, damp=damp, count=count, min_samples=min_samples)
    lo, hi = qrange(fmt.bits, fmt.signed)
    sc = channel_steps(fmt, g, o)

    def solve(step):
        q, _ = obq_round(wstar, hqq, step, lo, hi, damp=damp, act_order=act_order, free=free)
        full = with_free_columns(q * step[:, :, None], wstar, hqq, free)
        return full, row_loss(full, wt, hqq, hqf, hff)

    best, err = solve(sc)
    # per channel fractional lengths: a channel may take up to ``finer`` finer power-of-two steps
    per_channel = bool(finer) and fmt.is_pow2 and fmt.per_channel
    frac0 = np.broadcast_to(fmt.frac_array().reshape(-1), (g * o,)).reshape(g, o) if per_channel else None
    frac = frac0
    if per_channel:
        cap = None if frac_cap is None else np.asarray(frac_cap).reshape(g, o)
        for k in range(1, int(finer) + 1):
            cand, err2 = solve(sc / 2.0 ** k)
            take = err2 < err
            if cap is not None:
                take &= (frac0 + k) <= cap
            best = np.where(take[:, :, None], cand, best)
            err = np.where(take, err2, err)
            frac = np.where(take, frac0 + k, frac)
    near = round_nearest(wm, sc, lo, hi)
    if use_bias:
        near = np.concatenate([near, wt[:, :, d:]], axis=2)  # the bias column, as it is
    err_near = row_loss(near, wt, hqq, hqf, hff)
    # the greedy column order can lose to plain rounding on a row: keep nearest (in the given format) there
    worse = err_near < err
    best = np.where(worse[:, :, None], near, best)
    err = np.where(worse, err_near, err)
    new_fmt, n_finer = fmt, 0
    if per_channel:
        frac = np.where(worse, frac0, frac)
        n_finer = int(np.count_nonzero(frac != frac0))
        if n_finer:
            new_fmt = QFormat(fmt.bits, tuple(int(f) for f in frac.reshape(-1)), fmt.signed, fmt.axis)
    energy = float(quad_rows(wt, hff, wt).sum()) or 1.0
    e_near = float(err_near.sum()) / energy
    weight = weight_tensor(node, best[:, :, :d]).astype(w32.dtype)
    new_b = best[:, :, d].reshape(-1).astype(w32.dtype) if use_bias else None
    return RoundingResult(weight, new_b, new_fmt, n_finer, e_near, float(err.sum()) / energy)


def _apply(graph: Graph, node: Node, r: RoundingResult, table) -> dict:
    """Write ``r`` onto the IR (weights, bias, formats; ``table``: the FormatTable kept in step)."""
    q = node.qconfig
    graph.set_input(node, 1, graph.constant(node.weight.name + "_rounded", r.weight))
    # 10 significant digits: the sums behind them change in the last bits with the BLAS thread count,
    # and the report must be byte-identical run to run
    row = {"applied": True, "error_nearest": float(f"{r.error_nearest:.10g}"),
           "error_optimised": float(f"{r.error_optimised:.10g}"),
           "finer_channels": r.finer, "bias_refit": False}
    if r.fmt != q.weight_format:
        table.set_weight_format(node, q.weight_bits, r.fmt)
        q.weight_format = r.fmt
    in_fmt = node.inputs[0].qformat
    if r.bias is not None:
        b_fmt = table.bias_format(node, in_fmt, q.weight_format) if in_fmt is not None else None
        if b_fmt is None or bias_fits(r.bias, b_fmt):
            name = node.bias.name + "_rounded" if node.bias is not None else f"{node.name}_bias_rounded"
            graph.set_input(node, 2, graph.constant(name, r.bias))
            row["bias_refit"] = True
    _sync_bias_format(node, table)
    return row


def _sync_bias_format(node: Node, table) -> None:
    """The bias format that follows the layer's (possibly finer) weight format and its input's format."""
    q, in_fmt = node.qconfig, node.inputs[0].qformat
    if node.bias is not None and in_fmt is not None:
        q.bias_format = table.bias_format(node, in_fmt, q.weight_format)


def _skip_reason(node: Node, has_grams: bool) -> str | None:
    q = node.qconfig
    if q is None or q.weight_format is None:
        return "no weight format on the layer"
    if not optimizable(node):
        return f"{node.op_type} keeps round-to-nearest"
    if not has_grams:
        return "no calibration input reached the layer"
    return None


def optimise_rounding(graph: Graph, layers: list[Node], table, grams: dict[Node, np.ndarray], *,
                      damp: float = 0.01, act_order: bool = True, finer: int = 1, bias: bool = True,
                      quiet: bool = True) -> list[dict]:
    """Float-input mode: replace the weights of ``layers`` (widths decided: ``node.qconfig``) by their
    optimised rounding given the float network's Grams (``LayerInputGrams``). One report row per layer."""
    rows = []
    for node in progress_iter(layers, desc=None if quiet else "rounding: layers"):
        row: dict = {"layer": node.name, "weight_bits": node.qconfig.weight_bits if node.qconfig else None}
        h = grams.get(node)
        why = _skip_reason(node, h is not None)
        if why:
            row.update(applied=False, reason=why)
        else:
            h = np.asarray(h, np.float64)
            r = optimise_layer(node, (h, h, h), node.qconfig.weight_format, damp=damp, act_order=act_order,
                               finer=finer, bias=bias, frac_cap=table.frac_cap(node))
            row.update(_apply(graph, node, r, table))
        rows.append(row)
    return rows


def optimise_rounding_sequential(graph: Graph, layers: list[Node], table, x: np.ndarray, *,
                                 rounding: str = "half-up", batch_size: int = 64, damp: float = 0.01,
                                 act_order: bool = True, finer: int = 1, bias: bool = True,
                                 min_samples: float = 32.0, solve=None, quiet: bool = True) -> list[dict]:
    """Quantized-input mode: the float network and the quantized network (the IR's formats, the layers
    before this one already optimised) run side by side over the calibration samples ``x``, node by
    node, in batches of ``batch_size`` (a model with a fixed batch runs at its batch); each layer is
    fitted to reproduce the float network's output from the quantized network's input
    (``E|W_q x_q - W x_f|^2``), so it also compensates what the earlier layers and activations lost.
    Holds the live activations of both networks for all of ``x`` (the caller bounds its size).
    ``solve(node, args_f, xq, fmt) -> RoundingResult``: another per-layer solver (AdaRound:
    ``adaround.adaround_solver``) given the float network's arguments of the layer and the quantized
    network's (quantized) inputs, batch by batch; default the OBQ solve from the layer's Grams."""
    todo = {id(n) for n in layers}
    rows: dict[int, dict] = {}
    nodes = list(graph.nodes)

    def visit(i, args_f, args_q):  # args_f: the original constants, read before _apply
        n = nodes[i]
        if id(n) not in todo:
            return
        row = {"layer": n.name, "weight_bits": n.qconfig.weight_bits if n.qconfig else None}
        why = _skip_reason(n, True)
        if why:
            row.update(applied=False, reason=why)
        else:
            f_in = n.inputs[0].qformat
            # batch by batch: the Grams never hold more than one quantized batch
            xq = (aq[0] if f_in is None else fake_quant_act(aq[0], f_in, rounding) for aq in args_q)
            if solve is not None:
                r = solve(n, args_f, list(xq), n.qconfig.weight_format)
            else:
                hqq, hqf, hff, cnt = mean_layer_grams(n, ((af[0], q) for af, q in zip(args_f, xq)))
                r = optimise_layer(n, (hqq, hqf, hff), n.qconfig.weight_format, damp=damp,
                                   count=cnt, min_samples=min_samples,
                                   act_order=act_order, finer=finer, bias=bias, frac_cap=table.frac_cap(n))
            row.update(_apply(graph, n, r, table))
        rows[id(n)] = row

    run_side_by_side(nodes, nodes, graph.inputs[0], graph.inputs[0], x, fn_a=float_node_fn,
                     fn_b=ir_node_fn(graph, rounding=rounding), visit=visit, keep=graph.outputs,
                     batch_size=batch_size, progress=None if quiet else "rounding: layers")
    return [rows.get(id(n), {"layer": n.name, "applied": False, "reason": "not reached"}) for n in layers]


def snapshot_layers(layers: list[Node]) -> list[tuple]:
    """What ``restore_layers`` puts back: each layer's weight and bias Values and its formats."""
    return [(n, n.inputs[1], n.input(2), n.qconfig.weight_format, n.qconfig.bias_format)
            for n in layers if n.qconfig is not None]


def restore_layers(graph: Graph, snapshot: list[tuple], table) -> None:
    """Undo an optimisation: the weights, biases (a bias the fit added is removed) and formats of
    ``snapshot_layers``, in the IR and in the FormatTable."""
    for n, w, b, wf, bf in snapshot:
        graph.set_input(n, 1, w)
        if b is not None or len(n.inputs) > 2:
            graph.set_input(n, 2, b)
        while len(n.inputs) > 2 and n.inputs[-1] is None:
            n.inputs.pop()
        if wf is not None:
            table.set_weight_format(n, n.qconfig.weight_bits, wf)
        n.qconfig.weight_format, n.qconfig.bias_format = wf, bf


def rounding_state(layers: list[Node]) -> tuple[dict, dict[str, np.ndarray]]:
    """What the optimisation wrote onto ``layers`` (weights, biases, formats) as cache ``(meta, arrays)``."""
    meta, arrays = [], {}
    for i, n in enumerate(layers):
        q = n.qconfig
        ent = {"layer": n.name, "frac": None if q is None or q.weight_format is None or not q.weight_format.is_pow2
               else q.weight_format.frac_array().reshape(-1).tolist(), "bias": n.bias is not None}
        arrays[f"w{i}"] = n.weight.const
        if n.bias is not None:
            arrays[f"b{i}"] = n.bias.const
        meta.append(ent)
    return {"layers": meta}, arrays


def check_rounding_state(layers: list[Node], meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """A cached ``rounding_state`` fits ``layers`` (names, shapes, dtypes), else ValueError."""
    ents = meta["layers"]
    if [e["layer"] for e in ents] != [n.name for n in layers]:
        raise ValueError("the cached rounding is for other layers")
    for i, (n, e) in enumerate(zip(layers, ents)):
        w = arrays[f"w{i}"]
        if w.shape != n.weight.const.shape or w.dtype != n.weight.const.dtype:
            raise ValueError(f"cached weight of {n.name!r} has another shape or type")
        if e["bias"]:
            b = arrays[f"b{i}"]
            if b.shape != (n.weight.const.shape[0 if n.op_type != "MatMul" else -1],) and n.bias is None:
                raise ValueError(f"cached bias of {n.name!r} has another shape")
        if e["frac"] is not None and n.qconfig is not None and n.qconfig.weight_format is not None \
                and len(e["frac"]) != n.qconfig.weight_format.frac_array().size:
            raise ValueError(f"cached format of {n.name!r} has another number of channels")


def apply_rounding_state(graph: Graph, layers: list[Node], table, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write a cached ``rounding_state`` back onto ``layers`` (the same graph before the pass)."""
    check_rounding_state(layers, meta, arrays)
    for i, (n, e) in enumerate(zip(layers, meta["layers"])):
        w = arrays[f"w{i}"]
        if np.array_equal(w, n.weight.const) and (not e["bias"] or n.bias is not None and np.array_equal(
                arrays[f"b{i}"], n.bias.const)):
            continue  # not applied
        q = n.qconfig
        if e["frac"] is not None:
            f = q.weight_format
            fmt = QFormat(f.bits, tuple(e["frac"]) if f.per_channel else int(e["frac"][0]), f.signed, f.axis)
            if fmt != f:
                table.set_weight_format(n, q.weight_bits, fmt)
                q.weight_format = fmt
        graph.set_input(n, 1, graph.constant(n.weight.name + "_rounded", w))
        if e["bias"]:
            name = n.bias.name + "_rounded" if n.bias is not None else f"{n.name}_bias_rounded"
            graph.set_input(n, 2, graph.constant(name, arrays[f"b{i}"]))
        _sync_bias_format(n, table)
