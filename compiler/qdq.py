"""QDQ form of a quantized IR: the rewrite behind the insert-qdq pass, its report, and views.

``insert_qdq`` materialises the formats choose-formats (and any bit-width search)
left on the IR as QuantizeLinear/DequantizeLinear nodes (semantics in
passes/insert_qdq.py and docs/FIXED_POINT.md); ``quantization_report`` is the
per-layer report written before the rewrite; ``is_qdq_graph``/``is_quantized``/
``dequantized_view`` answer questions about a graph in either form.
"""
from __future__ import annotations

import json

import numpy as np

from ..core.errors import OptionError, PassError
from ..core.ir import Graph, Node, Value, topo_values
from ..core.qformat import QFormat, dequantize_linear, fake_quant, qrange, quantize_pow2, sqnr_db
from .info import layer_macs
from .quant import QuantPlanAnalysis
from .ranges import ActivationRanges

QDQ_OPSET = 21
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def container_dtype(fmt: QFormat, *, weight: bool = False) -> np.dtype:
    """The integer type holding a ``fmt`` tensor (int8/uint8 up to 8 bits, int16/uint16 up to 16,
    int32 for 17..32-bit constants such as biases)."""
    if fmt.bits <= 8:
        return np.dtype(np.int8 if fmt.signed else np.uint8)
    if fmt.bits <= 16:
        return np.dtype(np.int16 if fmt.signed else np.uint16)
    if weight and fmt.bits <= 32 and fmt.signed:
        return np.dtype(np.int32)
    raise PassError(f"a {'signed' if fmt.signed else 'unsigned'} {fmt.bits}-bit format has no QDQ container "
                    "(activations up to 16 bits, constants up to 32 bits signed)")


def quantize_const(x: np.ndarray, fmt: QFormat) -> np.ndarray:
    """Integers of a constant in ``fmt`` (weights: round half up for Qm.n, onnxruntime's
    round half to even for the float-scale kind), saturated, in its container type."""
    x = np.asarray(x)
    lo, hi = qrange(fmt.bits, fmt.signed)
    if fmt.fscale is None:
        q = quantize_pow2(x, fmt.bits, fmt.frac, fmt.signed, fmt.axis)
    else:
        sc = np.asarray(fmt.fscale, np.float32)
        if fmt.axis is not None and sc.ndim:
            shp = [1] * x.ndim
            shp[fmt.axis % x.ndim] = -1
            sc = sc.reshape(shp)
        q = np.clip(np.rint(x.astype(np.float32) / sc).astype(np.float64) + fmt.zero_point, lo, hi)
    return q.astype(container_dtype(fmt, weight=True))


def _scale_array(fmt: QFormat) -> np.ndarray:
    s = fmt.scale()
    return s.astype(np.float32) if fmt.per_channel else np.float32(s.reshape(()))


def is_qdq_graph(graph: Graph) -> bool:
    return any(n.op_type in QDQ_OPS for n in graph.nodes)


def is_quantized(graph: Graph) -> bool:
    """QDQ nodes, or formats from choose-formats on any tensor."""
    return is_qdq_graph(graph) or any(v.qformat is not None for v in graph.values() if not v.is_const)


def dequantized_view(graph: Graph) -> Graph:
    """A copy of a QDQ graph with the Q/DQ removed: weights and biases become their
    dequantized float constants, activations read the tensor before its QuantizeLinear;
    ``qconfig`` and ``qformat`` stay. Statistics (``mpqc info``, the report's compiled
    model) see layers again. Returns ``graph`` itself when it has no Q/DQ."""
    if not is_qdq_graph(graph):
        return graph
    g = graph.copy()
    for n in list(g.nodes):
        if n.op_type != "DequantizeLinear":
            continue
        x = n.inputs[0]
        if x is not None and x.is_const and all(v is None or v.is_const for v in n.inputs[1:]):
            zp = n.inputs[2].const if len(n.inputs) > 2 and n.inputs[2] is not None else None
            arr = dequantize_linear(x.const, n.inputs[1].const, zp, axis=int(n.attr("axis", 1)))
            out = n.outputs[0]
            c = Value(out.name, const=arr)
            c.qformat = x.qformat
            g.replace_all_uses_with(out, c)
            g.remove_node(n)
    for op in ("DequantizeLinear", "Clip", "QuantizeLinear"):
        for n in list(g.nodes):
            if n.op_type != op:
                continue
            src = n.inputs[0]
            if op == "Clip" and not (src is not None and src.producer is not None
                                     and src.producer.op_type == "QuantizeLinear"):
                continue
            g.bypass(n)
    return g


class _Names:
    """Unique names for new values and nodes (one scan of the graph, then incremental)."""

    def __init__(self, graph: Graph):
        self.taken = graph.names()

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def insert_qdq(graph: Graph, target=None, *, int4: bool = True, rounding: str = "target") -> dict:
    """Rewrite the annotated ``graph`` into QDQ form (see the insert-qdq pass for the semantics);
    returns the counts of quantized weights, biases, activations and clamps (all zero when
    nothing is annotated, and then the graph is unchanged). ``target``: a ``Target`` or None."""
    counts = {"weights": 0, "biases": 0, "activations": 0, "clamps": 0}
    layers = annotated_layers(graph)
    acts = [v for v in topo_values(graph) if v.qformat is not None and not _already_quantized(v)]
    if not layers and not acts:
        return counts
    names = _Names(graph)
    # widths travel in the file: a 2-bit layer sits in an int8 container (read by 'mpqc info')
    graph.metadata["mpqc.layer_bits"] = json.dumps(
        {n.name: [n.qconfig.weight_bits, n.qconfig.act_bits] for n in layers if n.qconfig is not None},
        sort_keys=True)
    for n in layers:
        _quantize_layer(graph, n, names, int4, counts)
    for v in acts:
        _quantize_activation(graph, v, names, counts)
    graph.opset = max(graph.opset, QDQ_OPSET)
    if target is not None:
        graph.metadata["mpqc.target"] = target.name
    rounding = rounding if rounding != "target" else (target.rounding if target is not None else "half-even")
    if target is not None and target.scale == "float" and rounding != "half-even":
        raise OptionError(f"insert-qdq: target {target.name} has float scales, which onnxruntime rounds half to "
                          f"even; rounding={rounding} applies to power-of-two targets only")
    graph.metadata["mpqc.rounding"] = rounding
    return counts


def annotated_layers(graph: Graph) -> list[Node]:
    """Layers whose weights carry a format (what insert-qdq quantizes)."""
    return [n for n in graph.nodes if n.qconfig is not None and n.qconfig.weight_format is not None
            and n.weight is not None]


def needs_qdq(graph: Graph) -> bool:
    """Whether insert-qdq would change ``graph``: annotated layers or activations not yet quantized."""
    return bool(annotated_layers(graph)) or any(
        v.qformat is not None and not _already_quantized(v) for v in topo_values(graph))


def _already_quantized(v: Value) -> bool:
    if v.is_const:
        return True
    if v.producer is not None and v.producer.op_type in QDQ_OPS:
        return True
    if v.producer is not None and v.producer.op_type == "Clip" and v.producer.inputs[0] is not None \
            and v.producer.inputs[0].producer is not None \
            and v.producer.inputs[0].producer.op_type == "QuantizeLinear":
        return True
    return any(n.op_type == "QuantizeLinear" for n, i in v.uses if i == 0)


def _quantize_layer(graph: Graph, n: Node, names: _Names, int4: bool, counts: dict) -> None:
    q = n.qconfig
    w = n.weight
    wf = q.weight_format
    wq = Value(names(f"{w.name}_quantized"), const=quantize_const(w.const, wf))
    if int4 and wf.bits == 4:
        wq.qformat = wf  # a 4-bit format on an integer constant: the exporter stores it as int4
    ws = Value(names(f"{w.name}_scale"), const=_scale_array(wf))
    attrs = {"axis": int(wf.axis)} if wf.per_channel else {}
    idx = graph.nodes.index(n)
    dq = graph.add_node("DequantizeLinear", [wq, ws], [Value(names(f"{w.name}_dequantized"), w.shape)],
                        attrs, name=names(f"{w.name}_DequantizeLinear"), index=idx)
    graph.set_input(n, 1, dq.outputs[0])
    counts["weights"] += 1
    b = n.bias
    if b is not None and q.bias_format is not None:
        bf = q.bias_format
        bq = Value(names(f"{b.name}_quantized"), const=quantize_const(b.const, bf))
        bs = Value(names(f"{b.name}_scale"), const=_scale_array(bf))
        battrs = {"axis": 0} if bf.per_channel else {}
        bdq = graph.add_node("DequantizeLinear", [bq, bs], [Value(names(f"{b.name}_dequantized"), b.shape)],
                             battrs, name=names(f"{b.name}_DequantizeLinear"), index=idx + 1)
        graph.set_input(n, 2, bdq.outputs[0])
        counts["biases"] += 1


def _quantize_activation(graph: Graph, v: Value, names: _Names, counts: dict) -> None:
    fmt: QFormat = v.qformat
    if fmt.per_channel:
        raise PassError(f"tensor {v.name!r} has a per-channel activation format; activations are per tensor")
    try:
        cdt = container_dtype(fmt)
    except PassError as e:
        raise PassError(f"tensor {v.name!r}: {e.message}") from None
    readers = [(n, i) for n, i in v.uses]
    is_out = v in graph.outputs
    idx = 0 if v.producer is None else graph.nodes.index(v.producer) + 1
    base = v.name
    scale = Value(names(f"{base}_scale"), const=_scale_array(fmt))
    zp = Value(names(f"{base}_zero_point"), const=np.array(fmt.zero_point, dtype=cdt))
    vq = Value(names(f"{base}_quantized"), v.shape, cdt)
    qn = graph.add_node("QuantizeLinear", [v, scale, zp], [vq], name=names(f"{base}_QuantizeLinear"), index=idx)
    vq.qformat = fmt
    src = vq
    lo, hi = qrange(fmt.bits, fmt.signed)
    info = np.iinfo(cdt)
    nodes = [qn]
    if (lo, hi) != (info.min, info.max):  # narrower than its container: saturate at its own range
        vc = Value(names(f"{base}_clamped"), v.shape, cdt)
        cn = graph.add_node("Clip", [vq, Value(names(f"{base}_qmin"), const=np.array(lo, cdt)),
                                     Value(names(f"{base}_qmax"), const=np.array(hi, cdt))], [vc],
                            name=names(f"{base}_Clip"), index=idx + 1)
        vc.qformat = fmt
        src = vc
        nodes.append(cn)
        counts["clamps"] += 1
    vd = Value(names(f"{base}_dequantized"), v.shape, np.float32)
    graph.add_node("DequantizeLinear", [src, scale, zp], [vd], name=names(f"{base}_DequantizeLinear"),
                   index=idx + len(nodes))
    vd.qformat = fmt
    for n, i in readers:
        graph.set_input(n, i, vd)
    if is_out:
        graph.outputs = [vd if o is v else o for o in graph.outputs]
        # the graph output keeps its name: the float tensor before quantization is renamed
        names.taken.discard(base)
        v.name = names(f"{base}_float")
        vd.name = base
        names.taken.add(base)
    counts["activations"] += 1


# ---------------------------------------------------------------------------- report
def quantization_report(graph: Graph, ctx) -> dict:
    """Per-layer and per-tensor formats, SQNR, bytes and MACs, with totals against float and
    uniform int8 (written before the QDQ rewrite, on the annotated IR)."""
    tgt = ctx.target
    plan = ctx.analyses.get(QuantPlanAnalysis, graph)
    stats = None
    if ctx.calib is not None:
        stats = ctx.analyses.get(ActivationRanges, graph)

    def act_sqnr(v: Value):
        s = stats.get(v) if stats is not None else None
        if s is None or not s.count or v.qformat is None:
            return None
        return sqnr_db(s.sample, fake_quant(s.sample, v.qformat))

    layers = []
    tot = {"params": 0, "macs": 0, "float_bytes": 0.0, "int8_bytes": 0.0, "bytes": 0.0,
           "int8_cost": 0.0, "cost": 0.0}
    for n in plan.layers:
        q = n.qconfig
        if q is None or q.weight_format is None:
            continue
        w = n.weight.const
        nb = int(n.bias.const.size) if n.bias is not None else 0
        macs = layer_macs(n)
        wbytes = w.size * q.weight_bits / 8 + nb * 4
        out = plan.layer_out[n]
        x = n.inputs[0]
        layers.append({
            "layer": n.name, "op": n.op_type, "weight_bits": q.weight_bits, "act_bits": q.act_bits,
            "weight_format": q.weight_format.to_json(), "weight_format_text": q.weight_format.describe(),
            "bias_format": q.bias_format.to_json() if q.bias_format is not None else None,
            "input": x.name, "input_format_text": x.qformat.describe() if x.qformat is not None else None,
            "output": out.name, "act_format": out.qformat.to_json() if out.qformat is not None else None,
            "act_format_text": out.qformat.describe() if out.qformat is not None else None,
            "fused_activation": plan.fused[n].op_type if plan.fused.get(n) is not None else None,
            "weight_sqnr_db": sqnr_db(w, fake_quant(w, q.weight_format)),
            "act_sqnr_db": act_sqnr(out),
            "params": int(w.size) + nb, "weight_elements": int(w.size), "macs": int(macs),
            "weight_bytes": float(wbytes),
            "mac_cost": float(macs * tgt.mac_cost(q.weight_bits, q.act_bits)),
        })
        tot["params"] += int(w.size) + nb
        tot["macs"] += int(macs)
        tot["float_bytes"] += 4.0 * (w.size + nb)
        tot["int8_bytes"] += w.size + 4.0 * nb
        tot["bytes"] += wbytes
        tot["int8_cost"] += macs * tgt.mac_cost(8, 8)
        tot["cost"] += macs * tgt.mac_cost(q.weight_bits, q.act_bits)
    tensors = []
    for v, p in plan.points.items():
        if v.qformat is None:
            continue
        s = stats.get(v) if stats is not None else None
        tensors.append({"tensor": v.name, "kind": p.kind, "bits": v.qformat.bits, "signed": v.qformat.signed,
                        "format": v.qformat.to_json(), "format_text": v.qformat.describe(),
                        "min": s.min if s is not None and s.count else None,
                        "max": s.max if s is not None and s.count else None,
                        "sqnr_db": act_sqnr(v)})

    def ratio(a, b):
        return float(a / b) if b else None

    totals = {
        "layers": len(layers), "params": tot["params"], "macs": tot["macs"],
        "weight_bytes": {"float": tot["float_bytes"], "uniform_int8": tot["int8_bytes"], "quantized": tot["bytes"]},
        "weight_bytes_vs_float": ratio(tot["bytes"], tot["float_bytes"]),
        "weight_bytes_vs_int8": ratio(tot["bytes"], tot["int8_bytes"]),
        "mac_cost": {"uniform_int8": tot["int8_cost"], "quantized": tot["cost"]},
        "mac_cost_vs_int8": ratio(tot["cost"], tot["int8_cost"]),
        "mean_weight_bits": ratio(sum(l["weight_bits"] * l["weight_elements"] for l in layers),
                                  sum(l["weight_elements"] for l in layers)),
        "mean_act_bits": ratio(sum(t["bits"] for t in tensors), len(tensors)),
    }
    return {"target": tgt.name, "scale": tgt.scale, "rounding": tgt.rounding, "layers": layers,
            "tensors": tensors, "totals": totals}
