"""Per-layer statistics of the inputs each layer sees on the calibration data (float network): the
common machinery of the analyses behind bias correction (input means) and rounding optimisation
(input Gram matrices)."""
from __future__ import annotations

import numpy as np

from ..core.errors import DataError
from ..core.ir import Graph, Node
from ..core.progress import progress_iter
from ..runtime.executor import Executor, batches, float_node_fn
from .passes import Analysis


class LayerInputStats(Analysis):
    """``{layer: sum / count}`` over the calibration data, one float run batch by batch: subclasses say
    which layers (``accepts``), what each batch of a layer's input adds (``accumulate``: a sum and a
    count), how the mean is stored (``finish``), what the progress bar says and what a missing
    ``--calib`` is needed for. Persisted per layer name in the result cache."""
    float_only = True
    #: progress bar text and the purpose named when calibration data is missing
    desc = "layer input statistics"
    needed_by = "this analysis"

    def reads(self) -> tuple[str, ...]:
        return ("calib",)

    @staticmethod
    def accepts(node: Node) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def select(self, graph: Graph) -> list[Node]:
        return [n for n in graph.layers() if self.accepts(n)]

    def accumulate(self, node: Node, x: np.ndarray) -> tuple[np.ndarray, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, mean: np.ndarray) -> np.ndarray:
        return mean

    def encode(self, result: dict[Node, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
        return {"layers": [n.name for n in result]}, {f"a{i}": a for i, a in enumerate(result.values())}

    def decode(self, meta: dict, arrays: dict[str, np.ndarray], graph: Graph) -> dict[Node, np.ndarray]:
        by_name: dict[str, list[Node]] = {}
        for n in graph.nodes:
            by_name.setdefault(n.name, []).append(n)
        out = {}
        for i, name in enumerate(meta["layers"]):
            nodes = by_name.get(name, [])
            if len(nodes) != 1:
                raise ValueError(f"layer {name!r} is not one node of the graph")
            out[nodes[0]] = arrays[f"a{i}"]
        return out

    def compute(self, graph: Graph, ctx) -> dict[Node, np.ndarray]:
        data = ctx.calib
        if data is None:
            raise DataError(f"{self.needed_by} needs calibration data: give --calib FILE.npz[:calib]")
        layers = self.select(graph)
        ids = {id(n) for n in layers}
        sums: dict[int, np.ndarray] = {}
        counts: dict[int, int] = {}

        def rec(node, args):
            if id(node) in ids:
                s, c = self.accumulate(node, np.asarray(args[0]))
                sums[id(node)] = sums.get(id(node), 0) + s
                counts[id(node)] = counts.get(id(node), 0) + c
            return float_node_fn(node, args)

        ex = Executor(graph, rec)
        for sl in progress_iter(list(batches(len(data), ctx.batch_size)), desc=None if ctx.quiet else self.desc):
            ex.run({graph.inputs[0]: data.x[sl]})
        return {n: self.finish(sums[id(n)] / counts[id(n)]) for n in layers if id(n) in sums}


def run_side_by_side(nodes_a: list[Node], nodes_b: list[Node], input_a, input_b, x: np.ndarray, *,
                     fn_a, fn_b, visit, keep=(), batch_size: int = 64, progress: str | None = None) -> None:
    """Run two networks over the samples ``x`` node by node, in batches of ``batch_size``: ``nodes_a``
    with ``fn_a`` and ``nodes_b`` with ``fn_b`` (the same length and order: node ``i`` of one is node
    ``i`` of the other, or the very same node run in two numeric modes). Before node ``i`` runs,
    ``visit(i, args_a, args_b)`` gets its arguments on both sides (one list per batch; ``args_a`` is
    read before ``visit``, so a visit that rewrites node ``i``'s constants leaves side a on the old
    ones) and may change the node; ``args_b`` is read again after it. ``input_a``/``input_b``: the
    value each side feeds ``x`` to. Intermediates are released when their last reader has run
    (``keep``: values never released). Holds both networks' live activations for all of ``x``."""
    chunks = [x[sl] for sl in batches(len(x), batch_size)]
    sides = []
    for nodes, inp in ((nodes_a, input_a), (nodes_b, input_b)):
        remaining: dict[int, int] = {}
        for n in nodes:
            for v in n.inputs:
                if v is not None and not v.is_const:
                    remaining[id(v)] = remaining.get(id(v), 0) + 1
        sides.append(({id(inp): chunks}, remaining))
    pinned = {id(v) for v in keep}

    def args(env, n, j):
        return [None if v is None else (v.const if v.is_const else env[id(v)][j]) for v in n.inputs]

    (env_a, _), (env_b, _) = sides
    for i in progress_iter(range(len(nodes_a)), desc=progress):
        na, nb = nodes_a[i], nodes_b[i]
        args_a = [args(env_a, na, j) for j in range(len(chunks))]
        visit(i, args_a, [args(env_b, nb, j) for j in range(len(chunks))])
        outs_a = [fn_a(na, a) for a in args_a]
        outs_b = [fn_b(nb, args(env_b, nb, j)) for j in range(len(chunks))]
        for n, outs, (env, remaining) in ((na, outs_a, sides[0]), (nb, outs_b, sides[1])):
            for k, v in enumerate(n.outputs):
                env[id(v)] = [o[k] for o in outs]
            for v in n.inputs:
                if v is not None and not v.is_const and id(v) in remaining:
                    remaining[id(v)] -= 1
                    if remaining[id(v)] == 0 and id(v) not in pinned:
                        env.pop(id(v), None)
