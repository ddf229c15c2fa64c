"""The ``bdcnn`` target end to end: decompose, calibrate, search Q, export, bundle.

"Binary-decomposed DCNN for accelerating computation and compressing model without
retraining" (Kamiya et al., ICCV Workshops 2017) and its per-layer Q selection
(Algorithm 1; docs/BDCNN.md). ``compile_bdcnn(graph, calib_x, eval_x, eval_y, ...)``
takes a canonical float graph (after the -O0 canonicalization pipeline) and:

1. decomposes every Conv (2-D) / Gemm / 2-D MatMul weight into k binary bases per
   output filter (compiler/bdecomp.py), then (``fit="outputs"``, the default) re-fits each
   decomposition to its layer's outputs on the calibration data (:func:`refine_in_place`); a layer that cannot be decomposed (another op,
   a 1-D/3-D conv, ``transA``, a non-float weight...) keeps its weight at the target's
   8-bit fixed-point format, runs in the float path, and is listed in
   ``report["not_decomposed"]`` with the reason;
2. records each decomposed layer's input range on the calibration split (the decomposed
   network, float activations) for its quantization sub-layer;
3. chooses Q per layer: ``q_fixed`` for every layer, or Algorithm 1 (compiler/qsearch.py)
   with drop rates measured on the eval split and ``D = R * max_drop``;
4. builds (a) the ONNX model, in which each decomposed layer is its integer form
   (Clip -> QuantizeLinear -> q - zp -> a +-1 Conv/Gemm -> the float32 epilogue,
   :func:`qdq_graph`) and computes what the popcount runtime computes, bit for bit; (b) the
   program and bundle of core/bdcnn_program.py that runtime/bdcnn.py runs by AND + popcount;
   (c) the report.

The predicted accuracy (Algorithm 1) and the measured one (the popcount runtime on the
eval split) are reported side by side.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..core.bdcnn_program import BdcnnProgram, bdcnn_bundle_bytes
from ..core.errors import DataError, OptionError
from ..core.ir import Graph, Node
from ..core.program import Step
from ..core.progress import progress_iter
from ..core.qformat import QFormat, choose_frac_mse, fake_quant
from ..runtime.bdcnn import BdcnnRuntime, run_bdcnn
from ..runtime.executor import float_node_fn, run_batched
from ..runtime.popcount import ActQuant, epilogue_constants, pack_weights
from .bdecomp import METADATA_PREFIX, Decomposition, decompose_weight, refine_decomposition
from .layerstats import run_side_by_side
from .rounding import (augmented_problem, least_squares_target, mean_layer_grams, quad_rows, reduced_metric,
                       row_loss, with_free_columns)
from .export import to_onnx
from .metrics import evaluate
from .qsearch import QSearchResult, algorithm1, drop_rates
from .options import BDCNN_FITS
from .targets import get_target

log = logging.getLogger(__name__)

Runner = Callable[[Graph, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------- layers
def decomposable(node: Node) -> str | None:
    """None when ``node`` can be binary-decomposed, else the reason it cannot."""
    w = node.weight
    if w is None:
        return "no constant weight"
    if w.const.dtype.kind != "f":
        return f"weight of dtype {w.const.dtype} (binary bases decompose float weights)"
    if node.op_type == "Conv":
        if w.const.ndim != 4:
            return f"a {w.const.ndim - 2}-D convolution (the binary kernels are 2-D)"
        x = node.inputs[0]
        if x.rank not in (None, 4):
            return f"input of rank {x.rank}"
        return None
    if node.op_type == "Gemm":
        if int(node.attr("transA", 0)):
            return "Gemm with transA=1"
        b = node.bias
        if len(node.inputs) > 2 and node.inputs[2] is not None and b is None:
            return "Gemm with a non-constant C"
        O = w.shape[0] if int(node.attr("transB", 0)) else w.shape[1]
        if b is not None and b.const.size not in (1, O):
            return f"Gemm bias of shape {b.shape} (expected ({O},))"
        return None
    if node.op_type == "MatMul":
        if w.const.ndim != 2 or node.inputs[0].rank != 2:
            return "MatMul that is not a 2-D (N, D) x (D, O) product"
        return None
    return f"{node.op_type} has no binary kernel (2-D Conv, Gemm and 2-D MatMul do)"


def effective_weight(node: Node) -> tuple[np.ndarray, np.ndarray | None]:
    """(W, bias) of a decomposable layer: Conv (O, C/g, kh, kw); fully connected (O, D) with
    ``y = x @ W.T + bias`` (Gemm's alpha, beta and transB folded in)."""
    w = node.weight.const.astype(np.float64)
    b = None if node.bias is None else node.bias.const.astype(np.float64)
    if node.op_type == "Gemm":
        if not int(node.attr("transB", 0)):
            w = w.T
        w = w * float(node.attr("alpha", 1.0))
        if b is not None:
            b = np.broadcast_to(b.reshape(-1) * float(node.attr("beta", 1.0)), (w.shape[0],)).copy()
    elif node.op_type == "MatMul":
        w = w.T
    return w, b


@dataclass
class BdcnnResult:
    """``graph``: the QDQ IR graph (``onnx_bytes()`` serializes it); ``decomposed``: the float
    graph with reconstructed weights; ``program`` and ``bundle``/``manifest`` bytes; ``report``;
    ``search`` (Algorithm 1, or None with ``q_fixed``)."""
    graph: Graph
    decomposed: Graph
    program: BdcnnProgram
    bundle: bytes
    manifest: bytes
    report: dict
    search: QSearchResult | None = None
    decompositions: dict[str, Decomposition] = field(default_factory=dict)
    acts: dict[str, ActQuant] = field(default_factory=dict)

    def onnx_bytes(self) -> bytes:
        return to_onnx(self.graph).SerializeToString(deterministic=True)


def _bases_for(bases, name: str) -> int:
    if isinstance(bases, dict):
        if name in bases:
            return int(bases[name])
        if "*" in bases:
            return int(bases["*"])
        raise OptionError(f"bases: no k given for layer {name!r} (add it, or a '*' default)")
    return int(bases)


def _set_layer(g: Graph, n: Node, rec: np.ndarray, bias: np.ndarray | None, tag: str) -> None:
    """Give the decomposed layer ``n`` the reconstructed weight ``rec`` ((O, ...) in the Conv/Gemm
    transB=1 layout; a MatMul's transposed) and, when given, the bias; the constants' names end in
    ``_tag``."""
    rec = rec.astype(np.float32)
    g.set_input(n, 1, g.constant(f"{n.inputs[1].name}_{tag}",
                                 np.ascontiguousarray(rec.T) if n.op_type == "MatMul" else rec))
    if bias is not None:
        g.set_input(n, 2, g.constant(f"{n.name}_bias_{tag}", bias.astype(np.float32)))


def decompose_in_place(g: Graph, *, bases=2, restarts: int = 3, iterations: int = 20, coef_bits: int = 8,
                       seed: int = 0, progress: str | None = None
                       ) -> tuple[dict[str, Decomposition], dict[str, str]]:
    """Give every decomposable layer of ``g`` the reconstructed weight ``M c`` (fully connected
    layers normalised to Gemm transB=1, alpha=beta=1) and every other layer 8-bit fixed-point
    weights."""
    decs: dict[str, Decomposition] = {}
    skipped: dict[str, str] = {}
    layers = [n for n in g.nodes if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.inputs
              and len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].is_const]
    for i, n in enumerate(progress_iter(layers, desc=progress)):
        why = decomposable(n)
        if why is not None:
            skipped[n.name] = why
            w = n.inputs[1].const
            if w.dtype.kind == "f":  # the fixed-point path: the target's 8-bit weights
                fmt = QFormat(8, choose_frac_mse(w, 8, True), True)
                g.set_input(n, 1, g.constant(n.inputs[1].name + "_q8", fake_quant(w.astype(np.float32), fmt)))
            continue
        W, b = effective_weight(n)
        group = int(n.attr("group", 1)) if n.op_type == "Conv" else 1
        d = decompose_weight(W, _bases_for(bases, n.name), group=group, restarts=restarts, iterations=iterations,
                             coef_bits=coef_bits, seed=seed + i)
        decs[n.name] = d
        if n.op_type == "Gemm":
            n.attrs.update(transB=1, alpha=1.0, beta=1.0)
        _set_layer(g, n, d.reconstructed(), b if n.op_type == "Gemm" else None, "bdec")
    return decs, skipped


# ---------------------------------------------------------------------------- data-aware refinement
def refine_in_place(graph: Graph, dec: Graph, decs: dict[str, Decomposition], x: np.ndarray, *,
                    inputs: str = "decomposed", rounds: int = 4, damp: float = 0.01, min_samples: float = 32.0,
                    batch_size: int = 64, progress: str | None = None) -> list[dict]:
    """Data-aware decomposition: every layer of ``decs`` re-fitted to the layer's outputs on the
    calibration samples ``x`` instead of its weights (compiler/bdecomp.py ``refine_decomposition``),
    with the bias re-fitted jointly.

    ``graph`` is the float network and ``dec`` its decomposed copy (:func:`decompose_in_place` on a
    copy: the same nodes in the same order); both run side by side over ``x``. ``inputs="decomposed"`` (sequential):
    each layer is fitted to reproduce the float network's output from the *decomposed* network's input
    (``E|w~ . x_d + b~ - w . x_f - b|^2``), so it also makes up for what the layers before it lost;
    ``inputs="float"``: from the float network's input. Changes ``dec`` and ``decs`` in place; one row
    per layer with the output error (relative to the output energy) before and after."""
    if inputs not in ("decomposed", "float"):
        raise OptionError(f"refine inputs must be 'decomposed' or 'float', got {inputs!r}")
    nf, nd = list(graph.nodes), list(dec.nodes)
    if [n.name for n in nf] != [n.name for n in nd]:
        raise ValueError("the decomposed graph's nodes do not match the float graph's")
    rows: list[dict] = []

    def visit(i, args_f, args_d):
        n = nd[i]
        d = decs.get(n.name)
        if d is None:
            return
        node_f = nf[i]
        grams = mean_layer_grams(node_f, ((af[0], None if inputs == "float" else ad[0])
                                          for af, ad in zip(args_f, args_d)))
        cnt = grams[3]
        W, b = effective_weight(node_f)
        G, O, D = d.group, d.O, d.D
        mg = O // G
        wt, (hqq, hqf, hff), free = augmented_problem(W.reshape(G, mg, D), b, grams[:3], n.op_type != "MatMul")
        wstar = least_squares_target(wt, hqq, hqf, damp=damp, count=cnt, min_samples=min_samples)
        hr, _ = reduced_metric(hqq, free)
        nd_, _, _ = refine_decomposition(d, wstar[:, :, :D].reshape(O, D), hr, rounds=rounds, damp=damp)
        rec = nd_.reconstructed()
        full = with_free_columns(rec.reshape(G, mg, D), wstar, hqq, free)
        energy = float(quad_rows(wt, hff, wt).sum()) or 1.0
        err = lambda m: float(np.sum(row_loss(m, wt, hqq, hqf, hff)))  # noqa: E731
        start = with_free_columns(d.reconstructed().reshape(G, mg, D), wstar, hqq, free)
        decs[n.name] = nd_
        _set_layer(dec, n, rec.reshape((O,) + tuple(nd_.weight_shape[1:])),
                   full[:, :, D].reshape(O) if free else None, "fit")
        rows.append({"layer": n.name, "output_error_weights_fit": err(start) / energy,
                     "output_error_data_fit": err(full) / energy, "rel_error_weights_fit": d.rel_error,
                     "rel_error": nd_.rel_error, "samples": int(cnt)})

    run_side_by_side(nf, nd, graph.inputs[0], dec.inputs[0], np.asarray(x), fn_a=float_node_fn,
                     fn_b=float_node_fn, visit=visit, keep=list(graph.outputs) + list(dec.outputs),
                     batch_size=batch_size, progress=progress)
    return rows


def fit_columns(rows: list[dict] | None) -> dict[str, dict]:
    """Per layer, the report columns of :func:`refine_in_place`'s rows: the output error with the
    output fit (``output_error``) and with the weight fit (``output_error_weights_fit``)."""
    return {r["layer"]: {"output_error": r["output_error_data_fit"],
                         "output_error_weights_fit": r["output_error_weights_fit"]} for r in rows or []}


def decompose_and_fit(g: Graph, calib_x: np.ndarray | None, *, fit: str = "outputs", fit_samples: int = 32,
                      fit_rounds: int = 4, bases=2, restarts: int = 3, iterations: int = 20, coef_bits: int = 8,
                      seed: int = 0, batch_size: int = 64, quiet: bool = True, record: bool = False
                      ) -> tuple[dict[str, Decomposition], dict[str, str], list[dict] | None]:
    """:func:`decompose_in_place` on ``g``, then (``fit`` "outputs" or "outputs-float") every
    decomposition re-fitted to its layer's outputs on the first ``fit_samples`` samples of
    ``calib_x`` (:func:`refine_in_place`); ``record``: the final decompositions in ``g.metadata``.
    Returns the decompositions, the skipped layers with their reasons, and the fit's rows (None
    with ``fit="weights"``)."""
    if fit not in BDCNN_FITS:
        raise OptionError(f"fit must be one of {', '.join(BDCNN_FITS)}, got {fit!r}")
    if fit != "weights" and calib_x is None:
        raise DataError(f"fit={fit} fits each decomposition to its layer's outputs on calibration data: "
                        f"give --calib FILE.npz[:calib], or fit=weights")
    float_g = g.copy() if fit != "weights" else None
    decs, skipped = decompose_in_place(g, bases=bases, restarts=restarts, iterations=iterations,
                                       coef_bits=coef_bits, seed=seed, progress=None if quiet else "decompose")
    rows = None
    if float_g is not None and decs:
        rows = refine_in_place(float_g, g, decs, np.asarray(calib_x)[:max(1, int(fit_samples))],
                               inputs="decomposed" if fit == "outputs" else "float", rounds=fit_rounds,
                               batch_size=batch_size, progress=None if quiet else "fit to outputs")
    if record:
        for name, d in decs.items():
            g.metadata[METADATA_PREFIX + name] = d.to_metadata()
    return decs, skipped, rows


# ---------------------------------------------------------------------------- calibration
def activation_ranges(graph: Graph, names: list[str], x: np.ndarray, *, batch_size: int = 64,
                      progress: str | None = None) -> dict[str, tuple[float, float]]:
    """(min, max) of the first input of each named layer over ``x``."""
    want = set(names)
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}

    def fn(node, args):
        if node.name in want:
            a = args[0]
            lo[node.name] = min(lo[node.name], float(np.min(a)))
            hi[node.name] = max(hi[node.name], float(np.max(a)))
        return float_node_fn(node, args)

    run_batched(graph, x, batch_size=batch_size, node_fn=fn, progress=progress)
    out = {}
    for n in names:
        if not np.isfinite(lo[n]):
            raise DataError(f"layer {n!r} was not reached while calibrating (is it on a path to an output?)")
        out[n] = (lo[n], hi[n])
    return out


def _quantizer(g: Graph, n: Node, x, a: ActQuant, idx: int):
    """Insert ``n``'s quantization sub-layer at ``idx``: (Clip ->) QuantizeLinear; returns the uint8 codes
    and the next index."""
    sc = g.constant(f"{n.name}_act_scale", np.array(a.delta, np.float32))
    zp = g.constant(f"{n.name}_act_zp", np.array(a.zp, np.uint8))
    if a.Q < 8:
        # Clip(x, min, max) in float at the ends of the Q-bit range, then QuantizeLinear: the same
        # integers as clip(rint(x / delta) + zp, 0, 2^Q - 1) (the ends are exact multiples of delta).
        # A Clip on the uint8 codes would be equivalent, but onnxruntime's QDQ optimizer drops it.
        lo = g.constant(f"{n.name}_act_min", np.array(np.float32(-a.zp) * np.float32(a.delta), np.float32))
        hi = g.constant(f"{n.name}_act_max", np.array(np.float32(a.qmax - a.zp) * np.float32(a.delta), np.float32))
        xc = g.add_node("Clip", [x, lo, hi], 1, name=g.unique_name(f"{n.name}_act_clip"), index=idx).outputs[0]
        xc.shape, xc.dtype = x.shape, np.dtype(np.float32)
        idx += 1
        x = xc
    q = g.add_node("QuantizeLinear", [x, sc, zp], 1, name=g.unique_name(f"{n.name}_act_q"), index=idx).outputs[0]
    q.shape, q.dtype = x.shape, np.dtype(np.uint8)
    return q, sc, zp, idx + 1


def _add(g: Graph, op: str, inputs, idx: int, name: str, shape, dtype=np.float32, attrs=None, outputs=1):
    v = g.add_node(op, inputs, outputs, attrs, name=g.unique_name(name), index=idx).outputs[0]
    v.shape, v.dtype = shape, np.dtype(dtype)
    return v


def _integer_layer(g: Graph, n: Node, d: Decomposition, a: ActQuant) -> None:
    """Replace the decomposed layer ``n`` by its integer form (see :func:`qdq_graph`)."""
    y = n.outputs[0]
    conv = n.op_type == "Conv"
    G = d.group if conv else 1
    O, D, k = d.M.shape
    mg = O // G
    cd, _, b = epilogue_constants(d.M, d.c, a, None if n.bias is None else n.bias.const)
    x = n.inputs[0]
    idx = g.nodes.index(n)
    attrs = dict(n.attrs)
    g.remove_node(n, force=True)
    q, _, _, idx = _quantizer(g, n, x, a, idx)
    qf = _add(g, "Cast", [q], idx, f"{n.name}_codes", x.shape, attrs={"to": 1})
    zpf = g.constant(f"{n.name}_act_zp_f", np.array(a.zp, np.float32))
    xs = _add(g, "Sub", [qf, zpf], idx + 1, f"{n.name}_centred", x.shape)  # q - zp, exact integers
    idx += 2
    # the k bases of every filter as +-1 output channels, ordered (group, base, filter of the group)
    Mb = d.M.astype(np.float32).reshape(G, mg, D, k).transpose(0, 3, 1, 2)  # G, k, mg, D
    ys = y.shape
    if conv:
        wb = g.constant(f"{n.name}_bases", np.ascontiguousarray(Mb.reshape((G * k * mg,) + tuple(d.weight_shape[1:]))))
        ca = {kk: v for kk, v in attrs.items() if kk in ("strides", "pads", "dilations", "group", "auto_pad",
                                                          "kernel_shape")}
        s = _add(g, "Conv", [xs, wb], idx, f"{n.name}_binary_conv",
                 None if ys is None else [ys[0], G * k * mg] + list(ys[2:]), attrs=ca)
        bshape = (O, 1, 1)
    else:
        wb = g.constant(f"{n.name}_bases", np.ascontiguousarray(Mb.reshape(k * O, D)))
        s = _add(g, "Gemm", [xs, wb], idx, f"{n.name}_binary_gemm", None if ys is None else [ys[0], k * O],
                 attrs={"transB": 1})
        bshape = (O,)
    idx += 1
    t = None
    ch = (np.arange(G)[:, None] * (k * mg) + np.arange(mg)[None, :]).reshape(-1)  # base 0's channels, filter order
    for kk in range(k):
        sk = _add(g, "Gather", [s, g.constant(f"{n.name}_base{kk}_channels", (ch + kk * mg).astype(np.int64))], idx,
                  f"{n.name}_base{kk}", ys, attrs={"axis": 1})
        mk = _add(g, "Mul", [sk, g.constant(f"{n.name}_coef{kk}_delta", cd[kk].reshape(bshape))], idx + 1,
                  f"{n.name}_scaled{kk}", ys)
        idx += 2
        if t is None:
            t = mk
        else:
            t = _add(g, "Add", [t, mk], idx, f"{n.name}_sum{kk}", ys)
            idx += 1
    g.add_node("Add", [t, g.constant(f"{n.name}_bias_f32", np.ascontiguousarray(b.reshape(bshape)))], [y],
               name=g.unique_name(f"{n.name}_biased"), index=idx)


def qdq_graph(decomposed: Graph, acts: dict[str, ActQuant], decs: dict[str, Decomposition] | None = None) -> Graph:
    """The exported form of ``decomposed`` with each listed layer's input quantized.

    Without ``decs`` (the search's cheap simulation): each layer's input goes through
    Clip -> QuantizeLinear -> DequantizeLinear and the layer keeps its reconstructed float weights.

    With ``decs`` (the exported model): each decomposed layer becomes its integer form, which
    computes what the popcount runtime computes, bit for bit::

        codes  = QuantizeLinear(Clip(x))                  uint8, in [0, 2^Q - 1]
        xs     = Cast(codes, float) - zero_point          exact integers q - zp
        S      = Conv(xs, M as +-1 filters) (or Gemm)     exact: integer sums below 2^24
        y      = sum_k Gather(S * f32(c_k delta), k) + b  float32 steps, in the runtime's order

    (runtime/popcount.py ``epilogue_constants``). Every product and partial sum of the Conv is an
    integer of magnitude below 2^24 (|q - zp| <= 255, D < 65,793), which float32 holds exactly in any
    summation order, and the epilogue is one float32 Mul and a chain of Adds, correctly rounded in
    onnxruntime as in the runtime; so the outputs agree bit for bit and so do the next layer's codes.
    The bases are the Conv's output channels ordered (group, base, filter); a Gather per base picks
    its channels in filter order. No Conv is followed by a Mul or an Add (onnxruntime would fold
    those into the weights), and no Conv reads a DequantizeLinear (onnxruntime's int8 weight optimizer
    would quantize the +-1 filters)."""
    g = decomposed.copy()
    for n in list(g.nodes):
        a = acts.get(n.name)
        if a is None:
            continue
        if decs is not None and n.name in decs:
            _integer_layer(g, n, decs[n.name], a)
            continue
        x = n.inputs[0]
        q, sc, zp, _ = _quantizer(g, n, x, a, g.nodes.index(n))
        dq = g.add_node("DequantizeLinear", [q, sc, zp], 1, name=g.unique_name(f"{n.name}_act_dq"),
                        index=g.nodes.index(n)).outputs[0]
        dq.shape, dq.dtype = x.shape, np.dtype(np.float32)
        g.set_input(n, 0, dq)
    return g


# ---------------------------------------------------------------------------- program
def build_program(decomposed: Graph, decs: dict[str, Decomposition], acts: dict[str, ActQuant],
                  layers: list[dict] | None = None) -> BdcnnProgram:
    """The binary-decomposed program of ``decomposed`` (see core/bdcnn_program.py)."""
    consts: dict[str, np.ndarray] = {}
    steps: list[Step] = []
    for n in decomposed.nodes:
        d = decs.get(n.name)
        if d is not None and n.name in acts:
            a = acts[n.name]
            bname = ""
            if n.bias is not None:
                bname = f"{n.name}/bias"
                consts[bname] = np.asarray(n.bias.const, np.float32).reshape(-1)
            consts[f"{n.name}/bases"] = pack_weights(d.M, d.group)
            consts[f"{n.name}/coef"] = d.c_int
            consts[f"{n.name}/frac"] = d.c_frac.astype(np.int8)
            attrs = {k: v for k, v in n.attrs.items() if k in ("strides", "pads", "dilations", "group", "auto_pad",
                                                                  "kernel_shape")} if n.op_type == "Conv" else {}
            steps.append(Step("binary", "Conv" if n.op_type == "Conv" else "Gemm",
                              [n.inputs[0].name, f"{n.name}/bases", f"{n.name}/coef", f"{n.name}/frac", bname],
                              [n.outputs[0].name], attrs,
                              {"Q": a.Q, "zero_point": a.zp, "delta": a.delta, "min": a.lo, "k": d.k, "D": d.D,
                               "O": d.O, "group": d.group, "weight_shape": list(d.weight_shape),
                               "coef_bits": d.coef_bits}, n.name))
            continue
        for v in n.inputs:
            if v is not None and v.is_const:
                consts[v.name] = np.asarray(v.const)
        steps.append(Step("float", n.op_type, [v.name if v is not None else "" for v in n.inputs],
                          [v.name for v in n.outputs], dict(n.attrs), {}, n.name))
    for v in decomposed.outputs:
        if v.is_const:
            consts[v.name] = np.asarray(v.const)
    inputs = [{"name": v.name, "shape": [d if isinstance(d, int) else (d or "?") for d in (v.shape or [])],
               "dtype": str(v.dtype)} for v in decomposed.inputs]
    outputs = [{"name": v.name, "tensor": v.name} for v in decomposed.outputs]
    return BdcnnProgram(decomposed.name, inputs, outputs, consts, steps, layers or [],
                        {"target": "bdcnn"})


# ---------------------------------------------------------------------------- search + flow
def _default_runner(batch_size: int) -> Runner:
    return lambda g, x: run_batched(g, x, batch_size=batch_size)[0]


def compile_bdcnn(graph: Graph, calib_x: np.ndarray, eval_x: np.ndarray | None = None,
                  eval_y: np.ndarray | None = None, *, max_drop: float = 0.01, bases=2, restarts: int = 3,
                  iterations: int = 20, fit: str = "outputs", fit_samples: int = 32, fit_rounds: int = 4,
                  q_fixed: int | dict | None = None, qmin: int = 2, qmax: int = 8,
                  coef_bits: int | None = None, metric: str | None = None, seed: int = 0, batch_size: int = 64,
                  runner: Runner | None = None, measure: bool = True, quiet: bool = True,
                  reuse: "BdcnnResult | None" = None) -> BdcnnResult:
    """Compile a canonical float ``graph`` for the bdcnn target (see the module docstring).

    ``bases``: k for every layer, or ``{layer name: k, "*": default}``; ``fit``: "outputs" (default)
    re-fits every decomposition to its layer's outputs on the first ``fit_samples`` calibration
    samples, from the decomposed network's inputs (:func:`refine_in_place`, ``fit_rounds`` rounds),
    "outputs-float" from the float network's inputs, "weights" keeps the weight-space fit of the
    paper; ``q_fixed``: Q for every
    layer (int) or per layer name (dict) instead of Algorithm 1; ``max_drop``: tolerated relative
    drop of the eval value (``D = R * max_drop``); ``metric``: top1 with labels, agreement with the
    float network otherwise; ``runner(graph, x) -> first output`` evaluates the QDQ networks of the
    search (default: mpqc's float executor); ``measure``: run the popcount runtime on the eval split;
    ``reuse``: the result of an earlier compile of the same graph whose decompositions (and their
    fit) are taken as they are (the bases, fit and seed options are then not used again; the
    report's ``fit`` is the reused one's).
    """
    if not 0 <= max_drop < 1:
        raise OptionError(f"max_drop must be in [0, 1), got {max_drop}")
    if not 2 <= qmin <= qmax <= 8:
        raise OptionError(f"activation bits must satisfy 2 <= qmin <= qmax <= 8 (the bdcnn target), got {qmin}..{qmax}")
    tgt = get_target("bdcnn")
    coef_bits = int(coef_bits or tgt.weight_bits[0])
    runner = runner or _default_runner(batch_size)
    pg = None if quiet else "bdcnn"
    if reuse is not None:  # the decompositions (and their fit) of an earlier compile of the same graph
        dec_graph, decs = reuse.decomposed.copy(), dict(reuse.decompositions)
        skipped = {r["layer"]: r["reason"] for r in reuse.report["not_decomposed"]}
        rf = reuse.report["fit"]  # the report then says how these were fitted, not what this call was given
        fit, fit_samples, fit_rounds, fit_rows = rf["mode"], max(1, rf["samples"]), rf["rounds"], rf["layers"] or None
    else:
        dec_graph = graph.copy()
        decs, skipped, fit_rows = decompose_and_fit(dec_graph, calib_x, fit=fit, fit_samples=fit_samples,
                                                    fit_rounds=fit_rounds, bases=bases, restarts=restarts,
                                                    iterations=iterations, coef_bits=coef_bits, seed=seed,
                                                    batch_size=batch_size, quiet=quiet)
    names = [n.name for n in dec_graph.nodes if n.name in decs]
    ranges = activation_ranges(dec_graph, names, np.asarray(calib_x), batch_size=batch_size,
                               progress=None if quiet else "calibrate")

    def acts_for(qs: dict[str, int]) -> dict[str, ActQuant]:
        return {n: ActQuant.from_range(*ranges[n], qs[n]) for n in names if qs.get(n) is not None}

    # evaluation value of a network on the eval split
    ref = None
    if eval_x is not None:
        metric = metric or ("top1" if eval_y is not None else "agreement")
        ref = runner(graph, eval_x)

    def value(out: np.ndarray) -> float:
        return float(evaluate(metric, out, eval_y, ref))

    search = None
    report: dict = {"method": "binary decomposition (Kamiya et al., ICCV-W 2017) + per-layer Q (Algorithm 1)"}
    if q_fixed is not None:
        qs = {n: int(q_fixed[n] if isinstance(q_fixed, dict) else q_fixed) for n in names}
        for n, q in qs.items():
            if not 2 <= q <= 8:
                raise OptionError(f"q_fixed: Q={q} of layer {n!r} is outside 2..8")
    else:
        if eval_x is None:
            raise OptionError("the per-layer Q search (Algorithm 1) needs an eval split (--eval), or give q_fixed")
        R = value(runner(dec_graph, eval_x))

        def layer_acc(i: int, q: int) -> float:
            return value(runner(qdq_graph(dec_graph, acts_for({names[i]: q})), eval_x))

        A = drop_rates(layer_acc, len(names), R, qmin=qmin, qmax=qmax, progress=None if quiet else "drop rates")
        search = algorithm1(A, R, R * max_drop, qmin=qmin, qmax=qmax)
        qs = dict(zip(names, search.q))
    acts = acts_for(qs)
    qgraph = qdq_graph(dec_graph, acts, decs)
    rows = []
    fitted = fit_columns(fit_rows)
    for n in names:
        d, a = decs[n], acts[n]
        node = dec_graph.node_by_name(n)
        rows.append({"layer": n, "op": node.op_type, "k": d.k, "rel_error": d.rel_error, "Q": a.Q,
                     "min": a.lo, "max": a.hi, "delta": a.delta, "zero_point": a.zp,
                     "calib_range": list(ranges[n]), "D": d.D, "O": d.O, "group": d.group,
                     "binary_ops_per_output": d.k * a.Q * (-(-d.D // 64)), **fitted.get(n, {}), **d.sizes()})
    program = build_program(dec_graph, decs, acts, rows)
    bundle, manifest = bdcnn_bundle_bytes(program)
    tot = {k: int(sum(r[k] for r in rows)) for k in ("bytes", "bases_bytes", "coef_bytes", "float_bytes", "int8_bytes")}
    other_float = int(sum(v.const.nbytes for v in graph.constants() if v.const.dtype.kind == "f")) - tot["float_bytes"]
    report.update({
        "layers": rows,
        "not_decomposed": [{"layer": n, "reason": r, "path": "8-bit fixed-point weights, float activations"}
                           for n, r in skipped.items()],
        "sizes": {**tot, "vs_float": tot["bytes"] / max(1, tot["float_bytes"]),
                  "vs_int8": tot["bytes"] / max(1, tot["int8_bytes"]),
                  "other_float_bytes": max(0, other_float), "bundle_bytes": len(bundle)},
        "q": {n: qs[n] for n in names},
        "q_mode": "fixed" if q_fixed is not None else "algorithm1",
        "fit": {"mode": fit, "samples": min(len(calib_x), max(1, int(fit_samples))) if fit_rows is not None else 0,
                "rounds": fit_rounds, "layers": fit_rows or []},
        "settings": {"bases": bases if not isinstance(bases, dict) else dict(sorted(bases.items())),
                     "restarts": restarts, "iterations": iterations, "fit": fit, "coef_bits": coef_bits, "seed": seed,
                     "max_drop": max_drop, "qmin": qmin, "qmax": qmax},
    })
    if eval_x is not None:
        acc = {"metric": metric, "samples": int(len(eval_x)), "float": value(ref),
               "decomposed (float activations)": search.R if search else value(runner(dec_graph, eval_x))}
        if search is not None:
            acc["predicted"] = search.predicted
            acc["D"] = search.D
            acc["unsatisfied_layers"] = [names[i] for i in search.unsatisfied]
            report["drop_rates"] = {names[i]: {str(q): float(search.A[i, q]) for q in range(qmin, qmax + 1)}
                                    for i in range(len(names))}
        acc["qdq (float runtime)"] = value(runner(qgraph, eval_x))
        if measure:
            out = run_bdcnn(program, np.asarray(eval_x), batch_size=batch_size, progress=pg)[0]
            acc["measured (popcount runtime)"] = value(out)
            if search is not None:
                search.measured = acc["measured (popcount runtime)"]
        report["accuracy"] = acc
    return BdcnnResult(qgraph, dec_graph, program, bundle, manifest, report, search, decs, acts)


# ---------------------------------------------------------------------------- ORT agreement
def ort_agreement(result: BdcnnResult, x: np.ndarray, session=None) -> dict:
    """How the QDQ ONNX model (onnxruntime) and the popcount runtime agree on ``x``.

    * ``layer_rel``: the largest relative difference (max abs diff / max abs of ORT) of a
      decomposed layer's output when the popcount step is fed the *same* input tensor as ORT
      (teacher forcing), and ``code_diff``: the largest difference between the runtime's
      quantization sub-layer and ORT's QuantizeLinear on that same input (0: bit for bit);
    * ``end_to_end_rel``: the same measure on the network output, each side running on its own
      activations, and ``code_flips``: how many quantized activation codes differ then
      (``first_flip``: the first layer where one does), out of ``codes``.

    The exported model is the integer form of :func:`qdq_graph`, which computes the runtime's
    integers and float32 epilogue exactly, so all of these are 0 (tested on EfficientNet-Lite0:
    no code of 27 million differs). A non-zero value means the two have drifted apart: an
    activation within an ulp of a quantizer tie ``(n + 1/2) * delta`` then gets codes one apart,
    which ``delta`` times the downstream gain shows at the output; ``first_flip`` names the layer
    where it starts and the teacher-forced numbers say whether a layer itself differs.
    ``session(model_bytes)``: an onnxruntime session factory (default: CPU, one thread).
    """
    if session is None:
        import onnxruntime as ort  # start-up: onnxruntime loads in about a second, only this check needs it

        def session(b):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.intra_op_num_threads = 1
            return ort.InferenceSession(b, so, providers=["CPUExecutionProvider"])
    m = to_onnx(result.graph, check=False)
    have = {o.name for o in m.graph.output}
    for nd in m.graph.node:
        for o in nd.output:
            if o and o not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                have.add(o)
    s = session(m.SerializeToString())
    x = np.asarray(x, np.float32)
    ortv = dict(zip([o.name for o in s.get_outputs()], s.run(None, {s.get_inputs()[0].name: x})))
    qname = {}
    for nd in m.graph.node:  # the QuantizeLinear of each decomposed layer: named <layer>_act_q...
        if nd.op_type == "QuantizeLinear":
            qname[nd.name] = nd.output[0]
    rt = BdcnnRuntime(result.program)
    p = rt.p
    env = {p.inputs[0]["name"]: x}
    out = {"layer_rel": 0.0, "worst_layer": None, "code_diff": 0, "code_flips": 0, "codes": 0, "first_flip": None}
    for st, ex in zip(p.steps, rt._exec):
        if st.kind == "binary":
            xin = env[st.inputs[0]]
            qn = [v for k, v in qname.items() if k.startswith(st.node + "_act_q")]
            if qn:
                q_ort = ortv[qn[0]].astype(np.int64)
                flips = int(np.sum(ex.act.quantize(xin) != q_ort))
                out["code_flips"] += flips
                out["codes"] += int(q_ort.size)
                if flips and out["first_flip"] is None:
                    out["first_flip"] = st.node
                x_ort = ortv.get(st.inputs[0], xin)
                out["code_diff"] = max(out["code_diff"], int(np.abs(ex.act.quantize(x_ort) - q_ort).max()))
                y_ort = ortv[st.outputs[0]]
                r = float(np.abs(ex(x_ort).astype(np.float64) - y_ort).max() / max(1e-30, float(np.abs(y_ort).max())))
                if r > out["layer_rel"]:
                    out["layer_rel"], out["worst_layer"] = r, st.node
            outs = (ex(xin),)
        else:
            args = [None if not n else (p.consts[n] if n in p.consts else env[n]) for n in st.inputs]
            outs = float_node_fn(ex, args)
        for o, a in zip(st.outputs, outs):
            env[o] = a
    o0 = p.outputs[0]["tensor"]
    y, yo = env[o0], ortv[s.get_outputs()[0].name]
    out["end_to_end_rel"] = float(np.abs(y.astype(np.float64) - yo).max() / max(1e-30, float(np.abs(yo).max())))
    return out
