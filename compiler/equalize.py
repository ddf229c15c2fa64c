"""Cross-layer equalization: per-channel scales moved from one layer into the next.

For a layer A whose output channels reach other layers only through operators that commute with a
positive per-channel scale (``f(s x) = s f(x)``: Relu, LeakyRelu, PRelu, Clip with its bounds scaled,
max/average pooling, zero padding, Flatten), scaling A's output channel c (its filter and bias) by
``s_c > 0`` and dividing the consumers' input channel c by ``s_c`` leaves the network's function
unchanged (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
ICCV 2019). The choice of ``s`` decides how well the weights quantize:

* ``mode="pow2"``: each of A's filters is scaled so that its largest weight lands just under the top
  of its power-of-two format, ``qmax * 2^-n`` at ``bits`` bits. A per-channel power-of-two format
  otherwise wastes up to one bit (0.49 bit on average over EfficientNet-Lite0's filters), which
  equalization of ranges does not recover: with per-channel formats a filter's own scale is free.
* ``mode="range"``: Nagel's rule, ``s_c = sqrt(r1_c r2_c) / r1_c`` with ``r1_c`` the range of A's filter c
  and ``r2_c`` the largest weight reading channel c in the consumers, so both ranges become
  ``sqrt(r1_c r2_c)``: for per-tensor weight formats.

ReLU6 (``Clip(0, 6)``) commutes with ``s`` only when its upper bound becomes ``6 s_c``: equalization
turns it into a Clip with per-channel bounds, which the emulator applies to the accumulator before
the requantization shift (exact, as rounding is monotone) and the ONNX export writes as ``Max`` and
``Min`` (ONNX Clip takes scalar bounds only; ``frontend.from_onnx`` reads the pair back as one Clip).

In ``pow2`` mode a filter can reach its boundary by growing (``s`` in [1, 2)) or by shrinking
(``s`` in [1/2, 1)); its output channel then grows or shrinks with it. ``direction="auto"`` grows a
channel only when the calibration data shows that its grown maximum stays within the tensor's
largest channel (so the activation format does not lose a bit), else shrinks it; ``"down"`` always
shrinks (data-free).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.errors import CompilerError
from ..core.ir import Graph, Node, Value
from ..runtime.executor import Executor, batches
from .quant import zero_pad
from .rounding import weight_matrix, weight_tensor

#: operators through which a positive per-channel scale passes unchanged (Clip: with scaled bounds)
HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
               "GlobalMaxPool", "Identity", "Dropout", "Pad", "Flatten"}
MODES = ("pow2", "range")
DIRECTIONS = ("auto", "down")


@dataclass
class Chain:
    """Layer ``producer``'s output channels reach ``consumers`` through ``path`` (homogeneous ops).

    ``factor``: how many input columns of a consumer each channel owns (H*W after a Flatten)."""
    producer: Node
    channels: int
    path: list[Node] = field(default_factory=list)
    consumers: list[tuple[Node, int]] = field(default_factory=list)  # (layer, factor)
    clips: list[tuple[Node, int]] = field(default_factory=list)  # (Clip, factor)

    @property
    def first_activation(self) -> Value:
        """The tensor whose per-channel maxima decide the direction (the first op after the layer)."""
        return self.path[0].outputs[0] if self.path else self.producer.outputs[0]


def _rows(node: Node) -> np.ndarray:
    """The layer's weights as (output channel, fan-in) in float64 (``rounding.weight_matrix``'s rows)."""
    m = weight_matrix(node)
    return m.reshape(-1, m.shape[-1]).astype(np.float64)


def _out_channels(node: Node) -> int | None:
    if node.op_type == "Gemm" and node.attr("transA", 0):
        return None
    if node.op_type == "MatMul" and (node.weight.const.ndim != 2 or node.inputs[1] is not node.weight):
        return None
    return int(_rows(node).shape[0])


def _spatial_size(v: Value) -> int | None:
    if v.shape is None or len(v.shape) < 2:
        return None
    sp = v.shape[2:]
    if not all(isinstance(d, int) for d in sp):
        return None
    return int(np.prod(sp)) if sp else 1


def find_chain(graph: Graph, a: Node) -> Chain | str:
    """The chain that starts at layer ``a``, or why its channels cannot be rescaled."""
    if not a.is_layer or a.op_type not in ("Conv", "Gemm", "MatMul"):
        return f"{a.op_type} node {a.name!r} is not a layer with constant weights"
    C = _out_channels(a)
    if C is None:
        return f"{a.op_type} node {a.name!r} has a layout whose output channels are not one weight axis"
    if a.op_type == "Gemm" and float(a.attr("alpha", 1.0)) != 1.0:
        return f"Gemm node {a.name!r} has alpha != 1"
    chain = Chain(a, C)
    outs = {id(v) for v in graph.outputs}
    stack: list[tuple[Value, int]] = [(a.outputs[0], 1)]
    while stack:
        v, fac = stack.pop()
        if id(v) in outs:
            return f"tensor {v.name!r} is a graph output"
        if not v.uses:
            return f"tensor {v.name!r} is not read"
        for n, idx in v.uses:
            op = n.op_type
            if idx != 0:
                return f"{op} node {n.name!r} reads {v.name!r} as operand {idx}"
            if n.is_layer and op in ("Conv", "Gemm", "MatMul"):
                why = _consumer_ok(n, v, C * fac)
                if why:
                    return why
                chain.consumers.append((n, fac))
                continue
            if op not in HOMOGENEOUS:
                return f"{op} node {n.name!r} reads {v.name!r} (not a per-channel positively homogeneous operator)"
            if any(u is not None and not u.is_const for u in n.inputs[1:]):
                return f"{op} node {n.name!r} has non-constant parameters"
            if len(n.outputs) > 1 and any(o.uses for o in n.outputs[1:]):
                return f"{op} node {n.name!r} has a second output in use"
            nfac = fac
            if op == "Pad" and not zero_pad(n):
                return f"Pad node {n.name!r} pads with a non-zero value"
            if op == "Flatten":
                if int(n.attr("axis", 1)) != 1:
                    return f"Flatten node {n.name!r} has axis {n.attr('axis')}"
                hw = _spatial_size(v)
                if hw is None:
                    return f"Flatten node {n.name!r} flattens a tensor of unknown shape"
                nfac = fac * hw
            elif op == "Clip":
                chain.clips.append((n, fac))
            chain.path.append(n)
            stack.append((n.outputs[0], nfac))
    if not chain.consumers:
        return f"no layer reads the channels of {a.name!r}"
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    chain.path.sort(key=lambda n: order[id(n)])
    return chain


def _consumer_ok(n: Node, v: Value, cols: int) -> str | None:
    w = n.weight.const
    if n.op_type == "Conv":
        if int(w.shape[1]) * int(n.attr("group", 1)) != cols:
            return f"Conv node {n.name!r} reads {v.name!r} with {w.shape[1]} x {n.attr('group', 1)} input channels"
        return None
    if n.op_type == "Gemm":
        if n.attr("transA", 0):
            return f"Gemm node {n.name!r} has transA=1"
        k = w.shape[1] if n.attr("transB", 0) else w.shape[0]
        return None if int(k) == cols else f"Gemm node {n.name!r} reads {k} columns, not {cols}"
    if w.ndim != 2 or int(w.shape[0]) != cols:
        return f"MatMul node {n.name!r} reads its weights in a layout equalization does not handle"
    return None


def find_chains(graph: Graph) -> tuple[list[Chain], dict[str, str]]:
    """Every chain of ``graph`` in graph order, and for each other layer why it has none."""
    chains, refused = [], {}
    for n in graph.nodes:
        if not (n.is_layer and n.op_type in ("Conv", "Gemm", "MatMul")):
            continue
        r = find_chain(graph, n)
        if isinstance(r, Chain):
            chains.append(r)
        else:
            refused[n.name] = r
    return chains, refused


def _scale_producer(graph: Graph, a: Node, s: np.ndarray) -> None:
    w = a.weight.const
    m = weight_matrix(a).astype(np.float64)
    nw = weight_tensor(a, (m.reshape(len(s), -1) * s[:, None]).reshape(m.shape))
    graph.set_input(a, 1, graph.constant(a.weight.name + "_eq", nw.astype(w.dtype)))
    b = a.bias
    if b is not None:
        bb = b.const.astype(np.float64)
        if bb.size == len(s):
            nb = (bb.reshape(-1) * s).reshape(bb.shape)
        elif bb.size == 1:
            nb = float(bb.reshape(())) * s
        else:
            raise CompilerError(f"layer {a.name!r}: bias of shape {bb.shape} does not match {len(s)} channels")
        graph.set_input(a, 2, graph.constant(b.name + "_eq", nb.astype(b.const.dtype)))


def _scale_consumer(graph: Graph, n: Node, s: np.ndarray, fac: int) -> None:
    """Divide the consumer's input columns by ``s`` (each channel owning ``fac`` columns)."""
    cols = np.repeat(s, fac)
    w = n.weight.const
    wd = w.astype(np.float64)
    if n.op_type == "Conv":
        g = int(n.attr("group", 1))
        O, cin = int(w.shape[0]), int(w.shape[1])
        per = cols.reshape(g, cin)  # group gi reads channels gi*cin .. (gi+1)*cin - 1
        div = np.repeat(per, O // g, axis=0)  # (O, cin)
        nw = wd / div.reshape(O, cin, *([1] * (w.ndim - 2)))
    elif n.op_type == "Gemm" and n.attr("transB", 0):
        nw = wd / cols[None, :]
    else:
        nw = wd / cols[:, None]
    graph.set_input(n, 1, graph.constant(n.weight.name + "_eq", nw.astype(w.dtype)))


def _scale_clip(graph: Graph, n: Node, s: np.ndarray, fac: int, rank: int | None) -> None:
    cols = np.repeat(s, fac)
    shape = (len(cols),) + (1,) * max((rank or 2) - 2, 0)
    for i in (1, 2):
        b = n.input(i)
        if b is None:
            continue
        arr = b.const.astype(np.float64)
        if arr.ndim == 0 or arr.size == 1:
            val = float(arr.reshape(()))
            if val == 0.0 or not np.isfinite(val):
                continue
            new = val * cols.reshape(shape)
        else:
            new = arr.reshape(shape) * cols.reshape(shape)
        graph.set_input(n, i, graph.constant(f"{n.name}_bound{i}_eq", new.astype(b.const.dtype)))


def apply_scales(graph: Graph, chain: Chain, s: np.ndarray) -> None:
    """Scale the producer's channels by ``s``, the path's Clip bounds with them, and divide the
    consumers' input channels by ``s``: the network computes the same function."""
    s = np.asarray(s, np.float64).reshape(-1)
    if len(s) != chain.channels or not np.all(s > 0) or not np.all(np.isfinite(s)):
        raise CompilerError(f"equalization scales for {chain.producer.name!r} must be {chain.channels} positive numbers")
    _scale_producer(graph, chain.producer, s)
    for n, fac in chain.clips:
        _scale_clip(graph, n, s, fac, n.inputs[0].rank)
    for n, fac in chain.consumers:
        _scale_consumer(graph, n, s, fac)


def pow2_scales(rows: np.ndarray, bits: int) -> np.ndarray:
    """The scale in [1, 2) that takes each row's largest |weight| to ``qmax * 2^-n`` (the top of the
    power-of-two grid at ``bits`` bits that holds it); zero rows get 1."""
    r = np.max(np.abs(rows), axis=1)
    ok = r > 0
    rr = np.where(ok, r, 1.0)
    s = grid_top(rr, bits) / rr  # in [1, 2) up to float rounding
    s = np.where(s < 1.0, s * 2.0, s)
    return np.where(ok, s, 1.0)


def range_scales(rows: np.ndarray, cons_cols: np.ndarray) -> np.ndarray:
    """Nagel's equalizing scale: both ranges become sqrt(r1 r2)."""
    r1 = np.max(np.abs(rows), axis=1)
    r2 = cons_cols
    ok = (r1 > 0) & (r2 > 0)
    return np.where(ok, np.sqrt(np.where(ok, r1 * r2, 1.0)) / np.where(ok, r1, 1.0), 1.0)


def consumer_ranges(chain: Chain) -> np.ndarray:
    """Per channel, the largest |weight| reading it in any consumer."""
    out = np.zeros(chain.channels)
    for n, fac in chain.consumers:
        w = np.abs(n.weight.const.astype(np.float64))
        if n.op_type == "Conv":
            g = int(n.attr("group", 1))
            O, cin = int(w.shape[0]), int(w.shape[1])
            m = w.reshape(g, O // g, cin, -1).max(axis=(1, 3)).reshape(-1)  # per input channel
        elif n.op_type == "Gemm" and n.attr("transB", 0):
            m = w.max(axis=0)
        else:
            m = w.max(axis=1)
        out = np.maximum(out, m.reshape(chain.channels, fac).max(axis=1))
    return out


def channel_maxima(graph: Graph, chains: list[Chain], x, batch_size: int = 64) -> dict[int, np.ndarray]:
    """Per chain (by producer id), the per-channel max |value| of its first activation on ``x``
    (one float run, reduced batch by batch)."""
    vals = [c.first_activation for c in chains]
    ex = Executor(graph)
    acc: list[np.ndarray | None] = [None] * len(vals)
    for sl in batches(len(x), batch_size):
        res = ex.run({graph.inputs[0]: x[sl]}, vals)
        for i, v in enumerate(vals):
            a = np.abs(np.asarray(res[v], np.float64))
            m = a.max(axis=tuple(k for k in range(a.ndim) if k != 1)) if a.ndim > 1 else a
            acc[i] = m if acc[i] is None else np.maximum(acc[i], m)
    return {id(c.producer): m for c, m in zip(chains, acc)}


def equalize(graph: Graph, *, mode: str = "pow2", bits: int = 8, direction: str = "auto", iterations: int = 1,
             calib=None, batch_size: int = 64) -> dict:
    """Equalize every chain of ``graph`` in place; return the report section.

    ``calib`` (an array of inputs, or None) decides the direction in ``pow2`` mode; without it every
    channel shrinks."""
    if mode not in MODES:
        raise CompilerError(f"equalization mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if direction not in DIRECTIONS:
        raise CompilerError(f"equalization direction {direction!r} is unknown; use one of {', '.join(DIRECTIONS)}")
    chains, refused = find_chains(graph)
    maxima = {}
    if mode == "pow2" and direction == "auto" and calib is not None and chains:
        maxima = channel_maxima(graph, chains, calib, batch_size)
    rows_report = []
    # the chains hold nodes, not weights: one search serves every sweep
    for it in range(max(1, iterations) if mode == "range" else 1):
        for ch in chains:  # graph order: a producer's inputs are already rescaled
            rows = _rows(ch.producer)
            before = wasted_bits(rows, bits)
            if mode == "range":
                s = range_scales(rows, consumer_ranges(ch))
                grew = int(np.sum(s > 1))
            else:
                s = pow2_scales(rows, bits)
                m = maxima.get(id(ch.producer))
                if m is not None and m.size == ch.channels:
                    up = m * s <= np.max(m)  # the tensor's largest channel stays the largest
                else:
                    up = np.zeros(ch.channels, bool)
                s = np.where(up | (s == 1.0), s, s / 2.0)
                grew = int(np.sum(up & (s > 1.0)))
            apply_scales(graph, ch, s)
            after = wasted_bits(_rows(ch.producer), bits)
            rows_report.append({"layer": ch.producer.name, "iteration": it, "channels": ch.channels,
                                "consumers": [n.name for n, _ in ch.consumers],
                                "through": [n.op_type for n in ch.path],
                                "per_channel_clips": len(ch.clips),
                                "grown": grew, "shrunk": int(np.sum(s < 1.0)),
                                "log2_scale_range": [float(np.log2(s.min())), float(np.log2(s.max()))],
                                "wasted_bits_before": before, "wasted_bits_after": after})
    return {"mode": mode, "bits": bits, "direction": direction if mode == "pow2" else None,
            "data": maxima != {}, "chains": rows_report,
            "not_equalized": [{"layer": k, "why": v} for k, v in refused.items()]}


def wasted_bits(rows: np.ndarray, bits: int) -> float:
    """Mean over rows of log2(top of the row's power-of-two grid / its largest |weight|)."""
    r = np.max(np.abs(rows), axis=1)
    r = r[r > 0]
    if not r.size:
        return 0.0
    return float(np.mean(np.log2(grid_top(r, bits) / r)))


def grid_top(r: np.ndarray, bits: int) -> np.ndarray:
    """``qmax * 2^-n`` of the power-of-two grid at ``bits`` bits whose step is the smallest holding ``r``
    (positive) without clipping."""
    qmax = 2 ** (bits - 1) - 1
    return qmax * np.ldexp(1.0, np.ceil(np.log2(r / qmax)).astype(np.int64))
