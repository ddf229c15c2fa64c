"""Channel pruning without retraining on the IR: prunable units, patches, REAP/L1/ThiNet, PRO.

A *unit* is a layer L (Conv with ``group=1`` or Gemm) whose output channels reach
exactly one refittable layer L+1 (Conv with ``group=1`` or Gemm) through channel-wise
operators only: activations (Relu, Clip, ...), pooling, BatchNormalization, elementwise
operators with a constant operand, a depthwise Conv (whose channels go with L's),
Concat along the channel axis (the other inputs' channels stay) and Flatten into a
Gemm (each channel then owns ``H*W`` columns). Removing channel ``c`` of L removes its
filter and bias, the matching entries of every coupled node and the matching input
columns of L+1, whose weights are then refit by least squares to reproduce its original
outputs. Channels joined with another tensor by a non-constant Add/Mul (a residual
connection) are not prunable: their indices are tied to another layer's; serialize the
residual blocks first (``compiler.srn``).

Selection follows REAP (Kamma & Wada, "REAP: A method for pruning convolutional neural
networks with performance preservation", IEICE Trans. Inf. & Syst. E104-D(1), 2021),
with the L1-norm and ThiNet baselines; per-layer ratios come from PRO (the same group's
pruning-ratio optimizer): each unit is pruned alone at a grid of ratios, the mean squared
error of the network's output against the original is measured, and the resulting
error-vs-MACs curves are advanced greedily (``compiler.reap.pro_allocate``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mpqc.compiler.info import layer_macs
from mpqc.compiler.options import PRUNE_METHODS, PRUNE_RATIOS
from mpqc.compiler.reap import (EPS, ProResult, ReapResult, l1_select, lstsq_refit, pro_allocate, reap_prune,
                                thinet_prune, uniform_allocate)
from mpqc.core.errors import CompilerError, DataError, OptionError
from mpqc.core.ir import Graph, Node, Value
from mpqc.runtime.executor import Executor, batches, run_batched
from mpqc.runtime.ops import conv_params

__all__ = ["PruneRecord", "PathEntry", "PruneUnit", "NotPrunable", "Patches", "UnitCurve", "PruneReport",
           "find_units", "collect_patches", "apply_prune", "prune_unit", "pro_curves", "prune_graph",
           "total_macs", "METHODS", "RATIOS", "TARGETS"]

METHODS = PRUNE_METHODS
RATIOS = PRUNE_RATIOS
TARGETS = ("original", "pruned")

_UNARY = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Identity", "Dropout",
          "Elu", "Selu", "Softplus", "Abs", "Neg"}
_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}
_BINARY = {"Add", "Sub", "Mul", "Div"}


@dataclass(frozen=True)
class PruneRecord:
    """``Node.prune`` of a pruned layer: which of its original output channels remain."""

    kept: tuple[int, ...]
    original_channels: int
    method: str

    def to_json(self) -> dict:
        return {"kept": list(self.kept), "original_channels": self.original_channels, "method": self.method}


@dataclass
class PathEntry:
    """A value between the producer and the consumer that carries the unit's channels.

    Channel ``c`` of the producer is at indices ``offset + c*factor .. offset + (c+1)*factor - 1``
    of the value's axis 1 (``factor > 1`` after a Flatten of a spatial tensor). ``node`` is the
    value's producer (the unit's producer or a coupled node)."""

    value: Value
    node: Node
    offset: int
    factor: int


@dataclass
class PruneUnit:
    """A prunable layer: ``producer`` (L), ``coupled`` nodes, ``consumers`` (L+1, exactly one).

    ``channels``: L's output channels. ``in_offset``/``in_factor``: where channel ``c`` sits in
    the consumer's input (as in ``PathEntry``). ``macs``: MACs per sample of the producer, the
    coupled depthwise convs and the consumer; ``macs_per_channel``: MACs saved per removed channel.
    """

    producer: Node
    channels: int
    coupled: list[Node]
    consumers: list[Node]
    path: list[PathEntry]
    in_offset: int
    in_factor: int
    macs: int
    macs_per_channel: float

    @property
    def name(self) -> str:
        return self.producer.name

    @property
    def consumer(self) -> Node:
        return self.consumers[0]


@dataclass
class NotPrunable:
    """A layer whose output channels cannot be pruned, and why."""

    node: Node
    reason: str


@dataclass
class Patches:
    """Least-squares data of a unit: ``X`` (N x D) the consumer's input patches (im2col rows,
    one ones column last when ``bias``), ``Y`` (N x O) its original outputs, ``groups[c]`` the
    columns of the producer's channel ``c``."""

    X: np.ndarray
    Y: np.ndarray
    groups: list[np.ndarray]
    bias: bool


def _channels_out(node: Node) -> int:
    w = node.weight.const
    if node.op_type == "Conv":
        return int(w.shape[0])
    return int(w.shape[0] if node.attr("transB", 0) else w.shape[1])


def _dim1(v: Value) -> int | None:
    if v.shape is None or len(v.shape) < 2 or not isinstance(v.shape[1], int):
        return None
    return int(v.shape[1])


def _is_depthwise(node: Node) -> bool:
    w = node.weight
    return (node.op_type == "Conv" and w is not None and w.const.ndim >= 3 and w.const.shape[1] == 1
            and int(node.attr("group", 1)) == int(w.const.shape[0]) and int(node.attr("group", 1)) > 1)


def _consumer_ok(node: Node, idx: int, spatial: bool) -> str | None:
    if idx != 0:
        return f"it is read as an operand other than the data input of {node.op_type} node {node.name!r}"
    if node.op_type == "Conv":
        if not spatial:
            return f"Conv node {node.name!r} reads it flattened"
        if int(node.attr("group", 1)) != 1:
            return f"grouped Conv node {node.name!r} reads it"
        return None
    if node.op_type == "Gemm":
        if spatial:
            return f"Gemm node {node.name!r} reads a spatial tensor"
        if int(node.attr("transA", 0)):
            return f"Gemm node {node.name!r} has transA=1"
        return None
    return f"{node.op_type} node {node.name!r} reads it"


def _analyze(graph: Graph, prod: Node) -> PruneUnit | NotPrunable:
    if prod.op_type not in ("Conv", "Gemm") or not prod.is_layer:
        return NotPrunable(prod, f"{prod.op_type} node {prod.name!r} is not a Conv or Gemm with constant weights")
    if prod.op_type == "Conv" and int(prod.attr("group", 1)) != 1:
        return NotPrunable(prod, f"Conv node {prod.name!r} is grouped (its channels follow its input's)")
    if prod.op_type == "Gemm" and int(prod.attr("transA", 0)):
        return NotPrunable(prod, f"Gemm node {prod.name!r} has transA=1")
    C = _channels_out(prod)
    v0 = prod.outputs[0]
    spatial0 = prod.op_type == "Conv"
    path: list[PathEntry] = [PathEntry(v0, prod, 0, 1)]
    coupled: list[Node] = []
    consumers: list[tuple[Node, int, int]] = []
    stack: list[tuple[Value, int, int, bool]] = [(v0, 0, 1, spatial0)]
    seen_nodes: set[int] = set()
    graph_outs = {id(o) for o in graph.outputs}

    def refuse(why: str) -> NotPrunable:
        return NotPrunable(prod, f"channels of {prod.name!r} cannot be pruned: {why}")

    while stack:
        v, off, fac, spatial = stack.pop()
        if id(v) in graph_outs:
            return refuse(f"tensor {v.name!r} is a graph output")
        for node, idx in v.uses:
            if id(node) in seen_nodes:
                return refuse(f"node {node.name!r} reads the channels twice")
            seen_nodes.add(id(node))
            op = node.op_type
            nxt: tuple[int, int, bool] | None = (off, fac, spatial)
            if op in _UNARY or op in _POOL or op == "BatchNormalization" or op == "PRelu":
                if idx != 0 or any(u is not None and not u.is_const for u in node.inputs[1:]):
                    return refuse(f"{op} node {node.name!r} has non-constant parameters")
                if op in _POOL and not spatial:
                    return refuse(f"{op} node {node.name!r} pools a flattened tensor")
                if len(node.outputs) > 1 and any(o.uses for o in node.outputs[1:]):
                    return refuse(f"{op} node {node.name!r} has a second output in use")
            elif op in _BINARY:
                other = node.inputs[1 - idx]
                if other is None or not other.is_const:
                    oname = other.name if other is not None else "-"
                    return refuse(f"it is joined with {oname!r} by {op} node {node.name!r} (a residual "
                                  "connection ties its channels to another layer's; serialize it first)")
            elif op == "Conv" and _is_depthwise(node) and spatial and idx == 0:
                if off != 0 or _dim1(v) != C:
                    return refuse(f"depthwise Conv node {node.name!r} reads a concatenation")
                if any(u is not None and not u.is_const for u in node.inputs[1:]):
                    return refuse(f"depthwise Conv node {node.name!r} has non-constant weights")
            elif op == "Concat":
                rank = v.rank
                axis = int(node.attr("axis", 1))
                if rank is not None and axis < 0:
                    axis += rank
                if axis != 1:
                    return refuse(f"Concat node {node.name!r} joins along axis {node.attr('axis')}, not the channels")
                shift = 0
                for u in node.inputs[:idx]:
                    d = _dim1(u) if u is not None else 0
                    if d is None:
                        return refuse(f"Concat node {node.name!r} has an input of unknown channel count")
                    shift += d
                if sum(1 for u in node.inputs if u is v) > 1:
                    return refuse(f"Concat node {node.name!r} reads the channels twice")
                nxt = (off + shift, fac, spatial)
            elif op == "Flatten":
                axis = int(node.attr("axis", 1))
                if axis != 1:
                    return refuse(f"Flatten node {node.name!r} has axis {axis}")
                hw = 1
                if spatial:
                    sp = v.shape[2:] if v.shape is not None else None
                    if sp is None or not all(isinstance(d, int) for d in sp):
                        return refuse(f"Flatten node {node.name!r} flattens a tensor of unknown shape")
                    hw = int(np.prod(sp)) if len(sp) else 1
                nxt = (off * hw, fac * hw, False)
            elif op in ("Conv", "Gemm") and node.is_layer:
                why = _consumer_ok(node, idx, spatial)
                if why is not None:
                    return refuse(why)
                consumers.append((node, off, fac))
                nxt = None
            else:
                return refuse(f"{op} node {node.name!r} reads it (not a channel-wise operator)")
            if nxt is not None:
                coupled.append(node)
                out = node.outputs[0]
                path.append(PathEntry(out, node, nxt[0], nxt[1]))
                stack.append((out, *nxt))
    if not consumers:
        return refuse("no layer reads its channels")
    if len(consumers) > 1:
        return refuse(f"{len(consumers)} layers read its channels ({', '.join(c.name for c, _, _ in consumers)}); "
                      "only a single consumer is refit")
    cons, off, fac = consumers[0]
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    coupled.sort(key=lambda n: order.get(id(n), 0))
    cin = int(cons.weight.const.shape[1]) if cons.op_type == "Conv" else (
        int(cons.weight.const.shape[1] if cons.attr("transB", 0) else cons.weight.const.shape[0]))
    pm = layer_macs(prod)
    dm = sum(layer_macs(n) for n in coupled if n.op_type == "Conv")
    cm = layer_macs(cons)
    per = (pm + dm) / C + cm * fac / cin
    return PruneUnit(prod, C, coupled, [cons], path, off, fac, int(pm + dm + cm), float(per))


def find_units(graph: Graph) -> tuple[list[PruneUnit], list[NotPrunable]]:
    """The prunable units of ``graph`` (in graph order) and, for every other Conv/Gemm layer,
    why its channels cannot be pruned (a residual Add, a graph output, an unsupported reader...)."""
    units: list[PruneUnit] = []
    refused: list[NotPrunable] = []
    for n in graph.nodes:
        if n.op_type not in ("Conv", "Gemm") or not n.is_layer:
            continue
        if _is_depthwise(n):
            continue  # its channels follow its input's: coupled to the layer before it
        r = _analyze(graph, n)
        (units if isinstance(r, PruneUnit) else refused).append(r)
    return units, refused


def _resolve(graph: Graph, unit: PruneUnit | str) -> PruneUnit:
    """The unit of ``graph`` whose producer has the given unit's (or name's) producer name."""
    name = unit if isinstance(unit, str) else unit.name
    node = None if isinstance(unit, str) else next((n for n in graph.nodes if n is unit.producer), None)
    if node is None:
        try:
            node = graph.node_by_name(name)
        except KeyError:
            raise CompilerError(f"layer {name!r} is not in graph {graph.name!r}") from None
    r = _analyze(graph, node)
    if isinstance(r, NotPrunable):
        raise CompilerError(r.reason)
    return r


def total_macs(graph: Graph) -> int:
    """MACs per sample of every layer of ``graph``."""
    return int(sum(layer_macs(n) for n in graph.layers()))


# --------------------------------------------------------------------------- patches
def _feeds(graph: Graph, data) -> dict:
    if isinstance(data, Mapping):
        return {graph.value_by_name(k) if isinstance(k, str) else k: np.asarray(v) for k, v in data.items()}
    if len(graph.inputs) != 1:
        raise DataError(f"graph {graph.name!r} has {len(graph.inputs)} inputs: give the data as {{name: array}}")
    return {graph.inputs[0]: np.asarray(data)}


def _conv_rows(node: Node, a: np.ndarray, w_shape, out_hw, b_idx, pos) -> np.ndarray:
    """im2col rows of a 2-D Conv's input ``a`` at output positions ``pos`` of images ``b_idx``."""
    strides, pads, dil = conv_params(node, a.shape, w_shape)
    kh, kw = int(w_shape[2]), int(w_shape[3])
    ap = np.pad(a, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh, ow = pos // out_hw[1], pos % out_hw[1]
    ih = (oh * strides[0])[:, None, None] + (np.arange(kh) * dil[0])[None, :, None]
    iw = (ow * strides[1])[:, None, None] + (np.arange(kw) * dil[1])[None, None, :]
    # (n, kh, kw, C) -> (n, C, kh, kw): the weight's (O, C, kh, kw) column order
    rows = ap[b_idx[:, None, None], :, ih, iw]
    return np.ascontiguousarray(rows.transpose(0, 3, 1, 2)).reshape(len(b_idx), -1)


def collect_patches(graph: Graph, unit: PruneUnit | str, data, n_samples: int = 4000, seed: int = 0, *,
                    reference: Graph | None = None, positions_per_image: int | None = None,
                    batch_size: int = 64, bias: bool = True) -> Patches:
    """Sample the consumer's input patches and original outputs of ``unit`` with the float executor.

    A Conv consumer gives one im2col row (``D = C*kh*kw``, channel-major like its weight) per
    sampled output position, ``positions_per_image`` positions per image (default: enough to
    reach ``n_samples`` over the images given), at random with ``seed``; a Gemm consumer one row
    per image. Rows beyond ``n_samples`` are dropped at random (deterministically). ``bias`` adds
    a ones column (never pruned). X comes from ``graph``; Y from ``reference`` (default
    ``graph``), the CP-style variant of the REAP report: X from the already pruned network, Y from
    the original one, so that errors do not accumulate.
    """
    unit = _resolve(graph, unit)
    cons = unit.consumer
    ref = reference if reference is not None else graph
    ref_cons = ref.node_by_name(cons.name) if ref is not graph else cons
    ex_x, ex_y = Executor(graph), Executor(ref)
    fx, fy = _feeds(graph, data), _feeds(ref, data)
    n_img = len(next(iter(fx.values())))
    if n_img == 0:
        raise DataError("no images to sample patches from")
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    w_shape = cons.weight.const.shape
    conv = cons.op_type == "Conv"
    if conv and len(w_shape) != 4:
        raise CompilerError(f"Conv node {cons.name!r}: patch sampling supports 2-D convolutions only")
    for sl in batches(n_img, batch_size):
        rx = ex_x.run({k: v[sl] for k, v in fx.items()}, [cons.inputs[0]])
        a = np.asarray(rx[cons.inputs[0]], np.float64)
        ry = ex_y.run({k: v[sl] for k, v in fy.items()}, [ref_cons.outputs[0]])
        y = np.asarray(ry[ref_cons.outputs[0]], np.float64)
        nb = a.shape[0]
        if conv:
            out_hw = y.shape[2:]
            hw = int(out_hw[0] * out_hw[1])
            ppi = positions_per_image or max(1, math.ceil(n_samples / n_img))
            ppi = min(ppi, hw)
            pos = np.concatenate([np.sort(rng.choice(hw, ppi, replace=False)) for _ in range(nb)])
            b_idx = np.repeat(np.arange(nb), ppi)
            xs.append(_conv_rows(cons, a, w_shape, out_hw, b_idx, pos))
            ys.append(y.reshape(nb, y.shape[1], hw)[b_idx, :, pos])
        else:
            xs.append(a.reshape(nb, -1))
            ys.append(y.reshape(nb, -1))
    X = np.concatenate(xs)
    Y = np.concatenate(ys)
    if len(X) > n_samples:
        sel = np.sort(rng.choice(len(X), n_samples, replace=False))
        X, Y = X[sel], Y[sel]
    k = int(np.prod(w_shape[2:])) if conv else 1
    if conv:
        groups = [np.arange((unit.in_offset + c) * k, (unit.in_offset + c + 1) * k) for c in range(unit.channels)]
    else:
        groups = [unit.in_offset + c * unit.in_factor + np.arange(unit.in_factor) for c in range(unit.channels)]
    if X.shape[1] != (w_shape[1] * k if conv else (w_shape[1] if cons.attr("transB", 0) else w_shape[0])):
        raise CompilerError(f"layer {cons.name!r}: its input in graph {graph.name!r} does not match its weights")
    if bias:
        X = np.concatenate([X, np.ones((len(X), 1))], axis=1)
    return Patches(X, Y, groups, bias)


# --------------------------------------------------------------------------- applying a selection
def _kept_index(total: int, offset: int, factor: int, keep: np.ndarray, channels: int) -> np.ndarray:
    """Indices of an axis of size ``total`` that stay when only ``keep`` of the unit's channels stay."""
    mask = np.ones(total, bool)
    removed = np.setdiff1d(np.arange(channels), keep)
    for c in removed:
        mask[offset + c * factor: offset + (c + 1) * factor] = False
    return np.flatnonzero(mask)


def _set(graph: Graph, node: Node, i: int, array: np.ndarray, suffix: str = "pruned") -> None:
    old = node.input(i)
    graph.set_input(node, i, graph.constant(f"{old.name if old is not None else node.name}_{suffix}", array))


def _slice_const(graph: Graph, node: Node, i: int, rank: int, total: int, kidx: np.ndarray) -> None:
    """Slice a broadcast constant operand along the tensor's axis 1 (when it spans it)."""
    c = node.inputs[i]
    if c is None or c.const is None or c.const.ndim == 0:
        return
    arr = c.const
    axis = arr.ndim - (rank - 1)
    if node.op_type in ("BatchNormalization", "PRelu") and arr.ndim == 1:
        axis = 0
    if axis < 0 or axis >= arr.ndim or arr.shape[axis] == 1:
        return
    if arr.shape[axis] != total:
        raise CompilerError(f"{node.op_type} node {node.name!r}: constant {c.name!r} of shape {arr.shape} "
                            f"does not match {total} channels")
    _set(graph, node, i, np.take(arr, kidx, axis=axis))


def consumer_weights_from_fit(unit: PruneUnit, weights: np.ndarray, bias: bool
                              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Turn refit rows (one per remaining column of X, the ones column last when ``bias``) into the
    consumer's weight tensor (its own layout) and bias."""
    cons = unit.consumer
    w = np.asarray(weights, np.float64)
    b = w[-1] if bias else None
    rows = w[:-1] if bias else w
    dt = cons.weight.const.dtype
    if cons.op_type == "Conv":
        k = cons.weight.const.shape[2:]
        kk = int(np.prod(k))
        W = rows.reshape(rows.shape[0] // kk, *k, rows.shape[1])
        W = np.moveaxis(W, -1, 0)
    else:
        W = rows.T if cons.attr("transB", 0) else rows
    return np.ascontiguousarray(W).astype(dt), (None if b is None else b.astype(dt))


def apply_prune(graph: Graph, unit: PruneUnit | str, keep: Sequence[int], new_consumer_weight=None,
                new_consumer_bias=None, *, method: str = "manual") -> PruneRecord:
    """Remove the channels of ``unit`` not in ``keep``, in place.

    Drops the producer's filters (and bias), the matching entries of every coupled node
    (BatchNorm parameters, per-channel constants, depthwise filters) and the consumer's input
    channels (columns). ``new_consumer_weight`` (the consumer's weight tensor in its own layout,
    after pruning) and ``new_consumer_bias`` replace the sliced ones (a Gemm's ``alpha``/``beta``
    become 1). Updates the shapes on the path and sets ``producer.prune``. Returns the record.
    """
    unit = _resolve(graph, unit)
    keep = np.unique(np.asarray(keep, dtype=np.int64))
    C = unit.channels
    if keep.size == 0 or keep.min() < 0 or keep.max() >= C:
        raise CompilerError(f"layer {unit.name!r}: keep must name between 1 and {C} of its channels")
    removed = C - keep.size
    prod = unit.producer
    # producer
    W = prod.weight.const
    if prod.op_type == "Conv" or prod.attr("transB", 0):
        _set(graph, prod, 1, W[keep])
    else:
        _set(graph, prod, 1, W[:, keep])
    if prod.bias is not None and prod.bias.const.ndim >= 1 and prod.bias.const.shape[-1] == C:
        _set(graph, prod, 2, np.take(prod.bias.const, keep, axis=-1))
    # coupled nodes and the values on the path
    for n in unit.coupled:
        on_path = {id(e.value): e for e in unit.path}
        e_in = next(on_path[id(u)] for u in n.inputs if u is not None and id(u) in on_path)
        src = e_in.value
        total = _dim1(src)
        if total is None:
            raise CompilerError(f"node {n.name!r}: its input {src.name!r} has an unknown channel count")
        kidx = _kept_index(total, e_in.offset, e_in.factor, keep, C)
        rank = src.rank or 2
        if n.op_type == "Conv":  # depthwise
            _set(graph, n, 1, n.weight.const[kidx])
            if n.bias is not None:
                _set(graph, n, 2, n.bias.const[kidx])
            n.attrs["group"] = int(len(kidx))
        elif n.op_type in ("BatchNormalization", "PRelu", "Clip") or n.op_type in ("Add", "Sub", "Mul", "Div"):
            for i in range(len(n.inputs)):
                if n.inputs[i] is not None and n.inputs[i].is_const:
                    _slice_const(graph, n, i, rank, total, kidx)
    for e in unit.path:
        v = e.value
        if v.shape is not None and len(v.shape) >= 2 and isinstance(v.shape[1], int):
            v.shape = (v.shape[0], v.shape[1] - removed * e.factor) + tuple(v.shape[2:])
    # consumer
    cons = unit.consumer
    src = cons.inputs[0]
    e_in = next(e for e in unit.path if e.value is src)
    Wc = cons.weight.const
    if cons.op_type == "Conv":
        kidx = _kept_index(int(Wc.shape[1]), e_in.offset, e_in.factor, keep, C)
        Wn = Wc[:, kidx]
    else:
        d = int(Wc.shape[1] if cons.attr("transB", 0) else Wc.shape[0])
        kidx = _kept_index(d, e_in.offset, e_in.factor, keep, C)
        Wn = Wc[:, kidx] if cons.attr("transB", 0) else Wc[kidx]
    if new_consumer_weight is not None:
        nw = np.asarray(new_consumer_weight).astype(Wc.dtype)
        if nw.shape != Wn.shape:
            raise CompilerError(f"layer {cons.name!r}: new weight of shape {nw.shape}, expected {Wn.shape}")
        Wn = nw
    _set(graph, cons, 1, Wn)
    if new_consumer_bias is not None:
        nb = np.asarray(new_consumer_bias).astype(Wc.dtype).reshape(-1)
        _set(graph, cons, 2, nb, "refit")
    if cons.op_type == "Gemm" and (new_consumer_weight is not None or new_consumer_bias is not None):
        if new_consumer_bias is None and cons.bias is not None:
            _set(graph, cons, 2, (float(cons.attr("beta", 1.0)) * cons.bias.const).astype(Wc.dtype), "refit")
        if new_consumer_weight is None:
            _set(graph, cons, 1, (float(cons.attr("alpha", 1.0)) * Wn).astype(Wc.dtype), "refit")
        cons.attrs["alpha"] = 1.0
        cons.attrs["beta"] = 1.0
    old = prod.prune if isinstance(prod.prune, PruneRecord) else None
    if old is not None and len(old.kept) == C:
        rec = PruneRecord(tuple(int(old.kept[i]) for i in keep), old.original_channels, method)
    else:
        rec = PruneRecord(tuple(int(i) for i in keep), C, method)
    prod.prune = rec
    return rec


# --------------------------------------------------------------------------- one unit
def _n_keep(channels: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise OptionError(f"pruning ratio {ratio} must be in [0, 1)")
    return int(min(channels, max(1, channels - int(round(ratio * channels)))))


def _filters(node: Node) -> np.ndarray:
    w = node.weight.const
    if node.op_type == "Gemm" and not node.attr("transB", 0):
        return w.T
    return w


def _consumer_rows(unit: PruneUnit, bias: bool) -> np.ndarray:
    """The consumer's current weights as rows over X's columns (ones column last when ``bias``)."""
    cons = unit.consumer
    W = cons.weight.const.astype(np.float64)
    if cons.op_type == "Conv":
        rows = W.reshape(W.shape[0], -1).T
        b = cons.bias.const.astype(np.float64) if cons.bias is not None else np.zeros(W.shape[0])
    else:
        alpha = float(cons.attr("alpha", 1.0))
        rows = alpha * (W.T if cons.attr("transB", 0) else W)
        b = (float(cons.attr("beta", 1.0)) * cons.bias.const.astype(np.float64).reshape(-1)
             if cons.bias is not None else np.zeros(rows.shape[1]))
    return np.concatenate([rows, b[None, :]], axis=0) if bias else rows


def prune_unit(graph: Graph, unit: PruneUnit | str, ratio: float, method: str = "reap", data=None, *,
               n_samples: int = 4000, seed: int = 0, eps: float = EPS, reference: Graph | None = None,
               patches: Patches | None = None, n_keep: int | None = None) -> tuple[PruneRecord, ReapResult | None]:
    """Prune ``ratio`` of ``unit``'s channels in place and refit its consumer.

    ``method``: ``reap`` (the REAP report's selection with the least-squares refit), ``l1``
    (largest filter L1 norms kept, then the least-squares refit), ``l1-norefit`` (L1 selection,
    weights only sliced; needs no data) or ``thinet`` (ThiNet's greedy with a per-channel
    least-squares rescale). ``patches`` (from ``collect_patches``) or ``data`` feed the fits;
    ``reference`` is the graph Y comes from (see ``collect_patches``). ``n_keep`` overrides
    ``ratio``. Returns the producer's prune record and the selection (None for ``l1-norefit``).
    """
    if method not in METHODS:
        raise OptionError(f"pruning method {method!r}: use one of {', '.join(METHODS)}")
    unit = _resolve(graph, unit)
    k = n_keep if n_keep is not None else _n_keep(unit.channels, ratio)
    if method == "l1-norefit":
        return apply_prune(graph, unit, l1_select(_filters(unit.producer), k), method=method), None
    if patches is None:
        if data is None:
            raise DataError(f"pruning method {method!r} needs calibration data to refit {unit.consumer.name!r}")
        patches = collect_patches(graph, unit, data, n_samples, seed, reference=reference)
    X, Y, gs = patches.X, patches.Y, patches.groups
    if method == "reap":
        res = reap_prune(X, Y, gs, k, eps)
    elif method == "thinet":
        res = thinet_prune(X, Y, gs, k, W=_consumer_rows(unit, patches.bias), refit="scale", eps=eps)
    else:
        keep = l1_select(_filters(unit.producer), k)
        in_g = np.zeros(X.shape[1], bool)
        for g in gs:
            in_g[g] = True
        cols = np.sort(np.concatenate([gs[c] for c in keep] + [np.flatnonzero(~in_g)]))
        Wl = lstsq_refit(X, Y, cols, eps)
        R = Y - X[:, cols] @ Wl
        res = ReapResult(keep, [int(c) for c in np.setdiff1d(np.arange(len(gs)), keep)], [], cols, Wl,
                         float(np.sum(R * R)), [], "l1")
    W, b = consumer_weights_from_fit(unit, res.weights, patches.bias)
    rec = apply_prune(graph, unit, res.keep, W, b, method=method)
    return rec, res


# --------------------------------------------------------------------------- PRO
@dataclass
class UnitCurve:
    """A unit's PRO curve: at each ratio (0 first), the kept channels, the MACs saved and the
    mean squared error of the network's first output against the unpruned network."""

    unit: str
    ratios: list[float]
    n_keep: list[int]
    macs_saved: list[int]
    errors: list[float]

    def points(self) -> list[tuple[float, float]]:
        return list(zip(map(float, self.macs_saved), self.errors))

    def to_json(self) -> dict:
        return {"unit": self.unit, "ratios": self.ratios, "n_keep": self.n_keep, "macs_saved": self.macs_saved,
                "errors": self.errors}


def _output_mse(graph: Graph, feeds, ref_out: np.ndarray, batch_size: int) -> float:
    out = run_batched(graph, feeds, batch_size=batch_size, outputs=[graph.outputs[0]])[0]
    return float(np.mean((np.asarray(out, np.float64) - ref_out) ** 2))


def pro_curves(graph: Graph, units: Sequence[PruneUnit], data, ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4,
               0.5, 0.6, 0.7, 0.8, 0.9), *, method: str = "reap", eval_data=None, n_samples: int = 4000,
               seed: int = 0, eps: float = EPS, batch_size: int = 64) -> list[UnitCurve]:
    """PRO's measurement: prune each unit alone at every ratio (``method``, patches from ``data``)
    and record the MACs saved and the mean squared error of the first graph output on
    ``eval_data`` (default ``data``) against the unpruned graph. ``graph`` is not modified."""
    ev = _feeds(graph, eval_data if eval_data is not None else data)
    ev_named = {v.name: a for v, a in ev.items()}
    ref = np.asarray(run_batched(graph, ev, batch_size=batch_size, outputs=[graph.outputs[0]])[0], np.float64)
    base = total_macs(graph)
    curves = []
    for u in units:
        u = _resolve(graph, u)
        patches = None if method == "l1-norefit" else collect_patches(graph, u, data, n_samples, seed)
        rs, ks, saved, errs = [0.0], [u.channels], [0], [0.0]
        for r in sorted(set(float(x) for x in ratios)):
            k = _n_keep(u.channels, r)
            if k >= u.channels or k == ks[-1]:
                continue
            g2 = graph.copy()
            prune_unit(g2, u.name, r, method, patches=patches, eps=eps, n_keep=k)
            rs.append(r)
            ks.append(k)
            saved.append(base - total_macs(g2))
            errs.append(_output_mse(g2, ev_named, ref, batch_size))
        curves.append(UnitCurve(u.name, rs, ks, saved, errs))
    return curves


@dataclass
class PruneReport:
    """What ``prune_graph`` did: the allocation, per-unit kept channels, MACs before/after, curves."""

    allocation: str
    method: str
    macs_before: int
    macs_after: int
    target_macs: float
    kept: dict[str, int]
    channels: dict[str, int]
    curves: list[UnitCurve] = field(default_factory=list)
    pro: ProResult | None = None
    refused: list[str] = field(default_factory=list)

    @property
    def macs_fraction(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def to_json(self) -> dict:
        return {"allocation": self.allocation, "method": self.method, "macs_before": self.macs_before,
                "macs_after": self.macs_after, "macs_fraction": self.macs_fraction, "target_macs": self.target_macs,
                "kept": self.kept, "channels": self.channels, "curves": [c.to_json() for c in self.curves],
                "refused": self.refused}


def _macs_of_allocation(graph: Graph, units: Sequence[PruneUnit], keeps: Mapping[str, int]) -> float:
    """MACs per sample after pruning every unit to ``keeps[name]`` channels (exact for Conv/Gemm)."""
    out_frac: dict[int, float] = {}
    in_frac: dict[int, float] = {}
    for u in units:
        k = keeps.get(u.name, u.channels)
        f = k / u.channels
        out_frac[id(u.producer)] = f
        for n in u.coupled:
            if n.op_type == "Conv":
                out_frac[id(n)] = f
        cons = u.consumer
        Wc = cons.weight.const
        d = int(Wc.shape[1]) if cons.op_type == "Conv" else int(Wc.shape[1] if cons.attr("transB", 0) else Wc.shape[0])
        in_frac[id(cons)] = in_frac.get(id(cons), 1.0) - (u.channels - k) * u.in_factor / d
    return float(sum(layer_macs(n) * out_frac.get(id(n), 1.0) * in_frac.get(id(n), 1.0) for n in graph.layers()))


def prune_graph(graph: Graph, data, macs_fraction: float, *, ratios: str = "pro", method: str = "reap",
                grid: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), eval_data=None,
                n_samples: int = 4000, seed: int = 0, eps: float = EPS, units: Sequence[str] | None = None,
                batch_size: int = 64, targets: str = "original", in_place: bool = False
                ) -> tuple[Graph, PruneReport]:
    """Prune a copy of ``graph`` (``graph`` itself with ``in_place``) to about ``macs_fraction`` of
    its MACs.

    ``ratios='pro'`` allocates per-unit ratios with PRO's curves (``pro_curves``); ``'uniform'``
    uses the same grid ratio everywhere (the smallest that reaches the target). Because the
    savings of adjacent units overlap (a consumer loses input and output channels), the
    allocation is repeated against a lowered target until the exact MACs reach the goal. The
    units are then pruned in graph order, each refit on patches whose X comes from the partly
    pruned copy and whose Y comes from the unpruned network (``targets='original'``, CP-style) or
    from the partly pruned one as well (``targets='pruned'``). Returns the pruned graph and a report.
    """
    if not 0.0 < macs_fraction <= 1.0:
        raise OptionError(f"MACs fraction {macs_fraction} must be in (0, 1]")
    if ratios not in RATIOS:
        raise OptionError(f"ratios={ratios!r}: use 'pro' or 'uniform'")
    if targets not in TARGETS:
        raise OptionError(f"targets={targets!r}: use 'original' (CP-style) or 'pruned'")
    all_units, refused = find_units(graph)
    if units is not None:
        want = set(units)
        all_units = [u for u in all_units if u.name in want]
    before = total_macs(graph)
    target = macs_fraction * before
    if ratios == "pro":
        curves = pro_curves(graph, all_units, data, grid, method=method, eval_data=eval_data,
                            n_samples=n_samples, seed=seed, eps=eps, batch_size=batch_size)
    else:
        curves = []
        for u in all_units:
            rs, ks, saved = [0.0], [u.channels], [0]
            for r in sorted(set(float(x) for x in grid)):
                k = _n_keep(u.channels, r)
                rs.append(r)
                ks.append(k)
                saved.append(int(round(_macs_of_allocation(graph, [u], {})
                                       - _macs_of_allocation(graph, [u], {u.name: k}))))
            curves.append(UnitCurve(u.name, rs, ks, saved, [0.0] * len(rs)))
    alloc = pro_allocate if ratios == "pro" else uniform_allocate
    goal = float(target)
    res = alloc([c.points() for c in curves], before, goal)
    for _ in range(20):
        keeps = {c.unit: c.n_keep[i] for c, i in zip(curves, res.choice)}
        exact = _macs_of_allocation(graph, all_units, keeps)
        if exact <= target + 1e-9 or not res.reached:
            break
        goal -= exact - target  # overlapping savings: ask the allocator for more
        res = alloc([c.points() for c in curves], before, goal)
    keeps = {c.unit: c.n_keep[i] for c, i in zip(curves, res.choice)}
    original = graph.copy()
    work = graph if in_place else original.copy()
    for u in all_units:
        k = keeps[u.name]
        if k >= u.channels:
            continue
        prune_unit(work, u.name, 0.0, method, data, n_samples=n_samples, seed=seed, eps=eps,
                   reference=original if targets == "original" else None, n_keep=k)
    work.verify()
    report = PruneReport(ratios, method, before, total_macs(work), target, keeps,
                         {u.name: u.channels for u in all_units}, curves, res, [r.reason for r in refused])
    return work, report
