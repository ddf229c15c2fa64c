"""ActivationRanges analysis ("profile activations", mission step 2).

Runs the calibration data through the float runtime in batches and records, for
every non-constant tensor: min, max, max |x|, mean, and a deterministic strided
subsample (at most ``sample_cap`` values per tensor) from which percentiles,
histograms and the MSE choice of fractional lengths are computed. Memory is
bounded by ``batch_size`` activations plus the subsamples, whatever the data size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.errors import DataError
from ..core.ir import Graph, Value
from ..core.progress import progress_iter
from ..runtime.executor import Executor, batches, float_node_fn
from .passes import Analysis, PassContext


@dataclass
class TensorStats:
    min: float = float("inf")
    max: float = float("-inf")
    absmax: float = 0.0
    sum: float = 0.0
    count: int = 0
    chunks: list = field(default_factory=list, repr=False)
    _sample: np.ndarray | None = field(default=None, repr=False)

    def update(self, a: np.ndarray, per_batch: int) -> None:
        a = np.asarray(a)
        if a.size == 0 or a.dtype.kind != "f":
            return
        self.min = min(self.min, float(a.min()))
        self.max = max(self.max, float(a.max()))
        self.absmax = max(self.absmax, float(np.max(np.abs(a))))
        self.sum += float(a.sum(dtype=np.float64))
        self.count += int(a.size)
        flat = a.reshape(-1)
        step = max(1, flat.size // per_batch)
        self.chunks.append(np.array(flat[::step][:per_batch], dtype=np.float32))

    @property
    def sample(self) -> np.ndarray:
        if self._sample is None:
            self._sample = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
            self.chunks = []
        return self._sample

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @property
    def nonnegative(self) -> bool:
        return self.count > 0 and self.min >= 0.0

    def percentile(self, q: float) -> float:
        s = self.sample
        return float(np.percentile(np.abs(s), q)) if s.size else 0.0

    def histogram(self, bins: int = 64) -> dict:
        s = self.sample
        if s.size == 0:
            return {"edges": [], "counts": []}
        lo, hi = float(s.min()), float(s.max())
        if lo == hi:
            hi = lo + 1e-12
        counts, edges = np.histogram(s, bins=bins, range=(lo, hi))
        return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}

    def to_json(self) -> dict:
        return {"min": self.min, "max": self.max, "absmax": self.absmax, "mean": self.mean,
                "p99.9": self.percentile(99.9), "p99.99": self.percentile(99.99), "count": self.count}


class ActivationRanges(Analysis):
    """``{Value: TensorStats}`` for every non-constant tensor on the calibration data."""

    name = "activation-ranges"
    persist = "activation-ranges"
    float_only = True

    def __init__(self, sample_cap: int = 1 << 17, **params):
        super().__init__(sample_cap=sample_cap, **params)
        self.sample_cap = sample_cap

    def reads(self) -> tuple[str, ...]:
        return ("calib",)

    def encode(self, result: dict[Value, TensorStats]) -> tuple[dict, dict[str, np.ndarray]]:
        vals = list(result)
        meta = {"names": [v.name for v in vals],
                "stats": [[s.min, s.max, s.absmax, s.sum, s.count] for s in result.values()]}
        return meta, {f"s{i}": s.sample for i, s in enumerate(result.values())}

    def decode(self, meta: dict, arrays: dict[str, np.ndarray], graph: Graph) -> dict[Value, TensorStats]:
        values = profiled_values(graph)
        if [v.name for v in values] != meta["names"]:
            raise ValueError("the entry's tensors are not the graph's")
        out = {}
        for i, (v, (mn, mx, am, sm, c)) in enumerate(zip(values, meta["stats"])):
            out[v] = TensorStats(float(mn), float(mx), float(am), float(sm), int(c), _sample=arrays[f"s{i}"])
        return out

    def compute(self, graph: Graph, ctx: PassContext) -> dict[Value, TensorStats]:
        data = ctx.calib
        if data is None:
            raise DataError("profiling activations needs calibration data: give --calib FILE.npz[:calib]")
        return profile(graph, data.x, batch_size=ctx.batch_size, sample_cap=self.sample_cap,
                       quiet=ctx.quiet)


def profiled_values(graph: Graph) -> list[Value]:
    """The tensors ``profile`` records, in order: the graph inputs, then every node output."""
    return list(graph.inputs) + [o for n in graph.nodes for o in n.outputs]


def profile(graph: Graph, x: np.ndarray, *, batch_size: int = 64, sample_cap: int = 1 << 17,
            node_fn=None, quiet: bool = True) -> dict[Value, TensorStats]:
    stats = {v: TensorStats() for v in profiled_values(graph)}
    n_batches = max(1, -(-len(x) // batch_size))
    per_batch = max(1, sample_cap // n_batches)
    inner = node_fn or float_node_fn

    def recording(node, args):  # statistics as tensors are produced: nothing is kept
        outs = inner(node, args)
        for v, a in zip(node.outputs, outs):
            stats[v].update(a, per_batch)
        return outs

    ex = Executor(graph, recording)
    # every node runs, even those no graph output needs
    every = [o for n in graph.nodes for o in n.outputs if not o.uses and o not in graph.outputs]
    for sl in progress_iter(list(batches(len(x), batch_size)), desc=None if quiet else "profile activations"):
        xb = x[sl]
        stats[graph.inputs[0]].update(xb, per_batch)
        ex.run({graph.inputs[0]: xb}, outputs=list(graph.outputs) + every)
    for v, s in stats.items():
        if s.count and not np.isfinite(s.absmax):
            raise DataError(f"tensor {v.name!r} overflows to inf/NaN on the calibration data; "
                            "check the input scaling of the data")
    return stats
