"""Per-stage summaries of a compilation (-O3): MACs, weight bytes and accuracy after each
structural step (serialization, pruning) and after quantization.

A structural pass records ``stage_summary(...)`` in its report section; the driver lists
them in ``report["stages"]`` between the float model and the compiled one, so a user sees
where each budget (``--flops``, ``--max-drop``) was spent.
"""
from __future__ import annotations

from typing import Any

from ..core.ir import Graph
from ..runtime.executor import run_batched
from .bitsearch import FloatReference
from .info import model_info
from .metrics import NEEDS_REFERENCE, check_metric, evaluate


def eval_value(graph: Graph, ctx) -> tuple[str, float] | None:
    """(metric, value) of the float ``graph`` on the eval split (None without eval data). The
    reference of agreement-like metrics is the float model the user gave (``ctx.float_graph``)."""
    ds = ctx.eval
    if ds is None:
        return None
    metric = ctx.metric or ("top1" if ds.y is not None else "agreement")
    check_metric(metric, ds.y is not None)
    out = run_batched(graph, ds.x, batch_size=ctx.batch_size)[0]
    ref = None
    if metric in NEEDS_REFERENCE:
        base = ctx.float_graph if ctx.float_graph is not None else graph
        ref = ctx.analyses.get(FloatReference, base, split="eval")
    return metric, float(evaluate(metric, out, ds.y, ref))


def stage_summary(stage: str, graph: Graph, ctx, *, accuracy: bool = True) -> dict[str, Any]:
    """``{"stage", "nodes", "params", "macs", "weight_bytes"[, "metric", "accuracy"]}`` of ``graph``."""
    info = model_info(graph)
    row: dict[str, Any] = {"stage": stage, "nodes": info["nodes"], "params": info["params"],
                           "macs": info["macs"], "weight_bytes": info["weight_bytes"]}
    if accuracy:
        v = eval_value(graph, ctx)
        if v is not None:
            row["metric"], row["accuracy"] = v
    return row
