"""Model statistics: per-layer parameters, MACs per sample and weight bytes."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..core.ir import Graph, Node


@dataclass
class LayerInfo:
    name: str
    op: str
    weight_shape: tuple
    params: int
    macs: int  # per sample
    weight_bits: int
    weight_bytes: float
    act_bits: int | None

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.op, "weight_shape": list(self.weight_shape),
                "params": self.params, "macs": self.macs, "weight_bits": self.weight_bits,
                "weight_bytes": self.weight_bytes, "act_bits": self.act_bits}


def _prod(dims) -> int | None:
    out = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        out *= d
    return out


def layer_macs(node: Node) -> int:
    """Multiply-accumulates per sample of a Conv/Gemm/MatMul (0 when shapes are unknown)."""
    w = node.weight
    if w is None:
        return 0
    y = node.outputs[0]
    if node.op_type in ("Conv", "ConvTranspose"):
        if node.op_type == "Conv":
            spatial = _prod(y.shape[2:]) if y.shape is not None else None
            per_out = int(np.prod(w.shape[1:]))
            return 0 if spatial is None else int(spatial * w.shape[0] * per_out)
        x = node.inputs[0]
        spatial = _prod(x.shape[2:]) if x.shape is not None else None
        return 0 if spatial is None else int(spatial * int(np.prod(w.shape)))
    if node.op_type == "Gemm":
        return int(np.prod(w.shape))
    if node.op_type == "MatMul":
        rows = _prod(y.shape[1:-1]) if y.shape is not None and len(y.shape) > 2 else 1
        return int((rows or 1) * np.prod(w.shape))
    return 0


def weight_bits_of(node: Node) -> int:
    q = node.qconfig
    if q is not None:
        return int(q.weight_bits)
    return 8 * node.weight.const.dtype.itemsize if node.weight is not None else 0


def layer_table(graph: Graph) -> list[LayerInfo]:
    rows = []
    for n in graph.layers():
        w = n.weight.const
        bits = weight_bits_of(n)
        params = int(w.size) + (int(n.bias.const.size) if n.bias is not None else 0)
        wbytes = w.size * bits / 8 + (n.bias.const.size * 4 if n.bias is not None else 0)
        rows.append(LayerInfo(n.name, n.op_type, tuple(w.shape), params, layer_macs(n), bits, float(wbytes),
                              n.qconfig.act_bits if n.qconfig is not None else None))
    return rows


def model_info(graph: Graph) -> dict:
    rows = layer_table(graph)
    ops = Counter(n.op_type for n in graph.nodes)
    return {
        "name": graph.name,
        "opset": graph.opset,
        "inputs": [{"name": v.name, "shape": list(v.shape or []), "dtype": str(v.dtype)} for v in graph.inputs],
        "outputs": [{"name": v.name, "shape": list(v.shape or [])} for v in graph.outputs],
        "ops": dict(sorted(ops.items())),
        "nodes": len(graph.nodes),
        "params": int(sum(r.params for r in rows)),
        "macs": int(sum(r.macs for r in rows)),
        "weight_bytes": float(sum(r.weight_bytes for r in rows)),
        "layers": [r.to_json() for r in rows],
    }


def format_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))
    def fmt(r):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align))
    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def format_info(info: dict) -> str:
    rows = [[l["name"], l["op"], "x".join(map(str, l["weight_shape"])), f"{l['params']:,}", f"{l['macs']:,}",
             l["weight_bits"], f"{l['weight_bytes']:,.0f}"] for l in info["layers"]]
    head = (f"model {info['name']} (opset {info['opset']}): {info['nodes']} nodes, "
            f"{info['params']:,} parameters, {info['macs']:,} MACs/sample, {info['weight_bytes']:,.0f} weight bytes\n"
            f"ops: " + ", ".join(f"{k} x{v}" for k, v in info["ops"].items()) + "\n")
    return head + format_table(["layer", "op", "weight", "params", "MACs", "bits", "bytes"], rows, "lllrrrr")
