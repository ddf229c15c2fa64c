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
