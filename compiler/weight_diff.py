"""Weight-difference statistic and the strategies built on it (US 12,393,828 B2; docs/WEIGHT_DIFFERENCE.md).

**WeightDifference** (analysis): train the network for K *cycles* from its current
weights W_l[0] (one cycle = one feedforward + backpropagation step of mini-batch
SGD on the labelled training data, **(choice)**), and record per layer l, over the
cycles k = 1..K and the elements of the weight tensor, a statistic of
``d = W_l[k] - W_l[0]`` (FIG. 8A-8C):

* ``mean-square`` (default, claim 2): ``mean(d^2)``;
* ``mean``: ``mean(|d|)`` (the absolute value, since the signed mean cancels, **(choice)**);
* ``variance``: ``mean(d^2) - mean(d)^2``; ``std``: its square root.

Layers are ranked by the statistic ascending (ties: graph order, FIG. 9). With
``quantized`` the training runs with fake quantization at the starting widths
(FIG. 14: the statistic of the B-bit network) instead of in float (FIG. 13).
Training never touches the graph: the engine works on copies of the weights.

**Strategies** for ``assign-bit-widths`` (registered by name):

* ``weight-diff-bsearch`` (FIG. 11): moves the ``c`` lowest-statistic layers one
  rung down the target's ladder (A bits; the rest stay at B, the start) and
  binary-searches the largest ``c`` whose accuracy loss against the all-B network
  is within the threshold. ``mode=halving`` follows FIG. 11 literally instead:
  half of the candidates, then half of those, ... until one passes. ``floor``: a
  candidate count at or below which the search stops and accepts (FIG. 11's
  optional "<= 5 candidates" exit): the result never has fewer than
  ``min(floor, candidates)`` reduced layers.
* ``weight-diff-topk`` (FIG. 12): moves a fixed ``count`` of lowest-statistic layers.
* Both: ``keep_smallest`` never reduces the single smallest-statistic layer (claim 6).

The ranking is computed once per call (or taken from ``options["weight_diff"]``,
a precomputed ``WeightDiffResult``); only evaluations repeat, and those are cached
by the search context.

Strategy options, the weight-difference fields of ``SearchContext.options``
(``compiler.options.SearchOptions``; the pass fills them from its own options and
the CLI): ``train`` (a labelled ``Dataset``; required unless ``weight_diff`` is
given), ``cycles`` (50), ``statistic`` ("mean-square"), ``train_lr`` (0.01),
``train_batch_size`` (32), ``train_momentum`` (0.9), ``quantized`` (False),
``max_loss`` (the threshold: largest allowed loss against the all-B network,
absolute; default: keep the search's goal, i.e. ``--max-drop`` against the float
network), ``floor`` (0), ``mode`` ("binary" | "halving"), ``count``
(weight-diff-topk; default half of the candidates), ``keep_smallest`` (False).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..core.errors import DataError, OptionError
from ..core.ir import Graph, Node
from ..runtime.autograd import GradEngine, QuantSpec
from ..runtime.train import TrainOptions, check_labels, fit
from .bitsearch import SearchContext, check_goal_reachable
from .options import STATISTICS
from .passes import Analysis
from .quant import BitConfig


@dataclass
class WeightDiffResult:
    statistic: str
    cycles: int
    values: dict[Node, float]  # S_l per layer
    ranking: list[Node]  # ascending S, ties by graph order
    all_statistics: dict[str, dict[Node, float]]  # every statistic, for reports
    seconds: float
    train: Any = None  # runtime.train.TrainResult
    quantized: bool = False

    def to_json(self, timing: bool = False) -> dict:
        """JSON form; wall time only with ``timing`` (reports stay byte-identical run to run)."""
        d = {"statistic": self.statistic, "cycles": self.cycles, "quantized": self.quantized,
             "values": {n.name: self.values[n] for n in self.ranking},
             "ranking": [n.name for n in self.ranking],
             "all": {k: {n.name: v[n] for n in self.ranking} for k, v in self.all_statistics.items()},
             "train": self.train.to_json(timing) if self.train is not None else None}
        if timing:
            d["seconds"] = round(self.seconds, 3)
        return d


def check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise OptionError(f"weight-difference statistic {statistic!r} is unknown; choose one of "
                          f"{', '.join(STATISTICS)}")


def rank_layers(values: dict[Node, float], layers: Sequence[Node]) -> list[Node]:
    """Layers by ascending statistic; equal values keep graph order (a stable sort)."""
    return sorted(layers, key=lambda n: (values[n], layers.index(n)))


def weight_difference(graph: Graph, x: np.ndarray, y: np.ndarray | None, *, cycles: int = 50,
                      statistic: str = "mean-square", batch_size: int = 32, lr: float = 0.01,
                      momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0, quant=None,
                      progress: str | None = None) -> WeightDiffResult:
    """Train ``cycles`` SGD steps from the graph's weights and compute the statistic per layer."""
    check_statistic(statistic)
    if cycles < 1:
        raise OptionError(f"cycles must be at least 1, got {cycles}")
    y = check_labels(x, y, "--train data")
    t0 = time.perf_counter()
    engine = GradEngine(graph, quant=quant)
    layers = [n for n, _, _ in engine.layer_params()]
    if not layers:
        raise OptionError(f"graph {graph.name!r} has no layers with weights to train")
    w0 = {n: engine.params[n.weight].astype(np.float64) for n in layers}
    s1 = {n: 0.0 for n in layers}
    s2 = {n: 0.0 for n in layers}
    sa = {n: 0.0 for n in layers}

    def on_step(step: int, eng) -> None:
        for n in layers:
            d = eng.params[n.weight].astype(np.float64) - w0[n]
            s1[n] += float(d.sum())
            s2[n] += float(np.dot(d.reshape(-1), d.reshape(-1)))
            sa[n] += float(np.abs(d).sum())

    opts = TrainOptions(steps=cycles, batch_size=batch_size, lr=lr, momentum=momentum,
                        weight_decay=weight_decay, seed=seed)
    res = fit(engine, x, y, opts, on_step=on_step, progress=progress)
    stats: dict[str, dict[Node, float]] = {k: {} for k in STATISTICS}
    for n in layers:
        cnt = cycles * n.weight.const.size
        ms = s2[n] / cnt
        mean = s1[n] / cnt
        var = max(0.0, ms - mean * mean)
        stats["mean-square"][n] = ms
        stats["mean"][n] = sa[n] / cnt
        stats["variance"][n] = var
        stats["std"][n] = math.sqrt(var)
    values = stats[statistic]
    return WeightDiffResult(statistic, cycles, values, rank_layers(values, layers), stats,
                            time.perf_counter() - t0, res, quant is not None)


class WeightDifference(Analysis):
    """The weight-difference statistic of every layer, trained on ``ctx.train``."""
    name = "weight-difference"

    def __init__(self, cycles: int = 50, statistic: str = "mean-square", batch_size: int = 32,
                 lr: float = 0.01, momentum: float = 0.9, quantized: bool = False, **params):
        super().__init__(cycles=cycles, statistic=statistic, batch_size=batch_size, lr=lr, momentum=momentum,
                         quantized=quantized, **params)

    def compute(self, graph: Graph, ctx) -> WeightDiffResult:
        p = self.params
        data = getattr(ctx, "train", None)
        if data is None:
            raise DataError("the weight-difference statistic trains the network: give labelled training data "
                            "with --train FILE.npz:train")
        quant = None
        if p["quantized"]:
            quant = QuantSpec.from_ir(graph)
        return weight_difference(graph, data.x, data.y, cycles=p["cycles"], statistic=p["statistic"],
                                 batch_size=p["batch_size"], lr=p["lr"], momentum=p["momentum"],
                                 seed=getattr(ctx, "seed", 0), quant=quant,
                                 progress=None if getattr(ctx, "quiet", True) else "weight-diff")


# ---------------------------------------------------------------------------- strategies
def ranking_for(ctx: SearchContext, start: BitConfig) -> WeightDiffResult:
    """The weight-difference result for the search (precomputed in ``options['weight_diff']`` or trained now)."""
    o = ctx.options.check()
    pre = o.weight_diff
    if pre is not None:
        missing = [n.name for n in ctx.layers if n not in pre.values]
        if missing:
            raise OptionError(f"the precomputed weight-difference ranking lacks layers {missing[:3]}")
        return pre
    data = o.train
    if data is None:
        raise DataError("weight-difference strategies train the network: give labelled training data "
                        "with --train FILE.npz:train")
    quant = None
    if o.quantized:
        quant = QuantSpec.from_config(ctx.plan, ctx.table, start)
    return weight_difference(ctx.graph, data.x, data.y, cycles=50 if o.cycles is None else o.cycles,
                             statistic=o.statistic, batch_size=o.train_batch_size, lr=o.train_lr,
                             momentum=o.train_momentum, seed=ctx.seed, quant=quant,
                             progress=None if ctx.quiet else "weight-diff")


@dataclass
class _Setup:
    wd: WeightDiffResult
    candidates: list[Node]  # reducible layers in ranking order (the smallest excluded with keep_smallest)
    lowered: dict[Node, tuple[int, int]]
    high_value: float
    accept: Any = None
    criterion: dict = field(default_factory=dict)

    def config(self, start: BitConfig, count: int) -> BitConfig:
        c = start.copy()
        for n in self.candidates[:count]:
            c.bits[n] = self.lowered[n]
        return c


def _setup(ctx: SearchContext, start: BitConfig, *, needs_goal: bool) -> _Setup:
    wd = ranking_for(ctx, start)
    keep_smallest = ctx.options.keep_smallest
    ranked = [n for n in wd.ranking if n in start.bits]
    skipped = ranked[:1] if keep_smallest else []
    lowered = {}
    for n in ranked:
        lo = ctx.lower(start, n)
        if lo is not None and n not in skipped:
            lowered[n] = tuple(lo)
    cands = [n for n in ranked if n in lowered]
    max_loss = ctx.options.max_loss
    if max_loss is None and needs_goal:
        high = check_goal_reachable(ctx, start)
    else:
        high = ctx.evaluate(start)
    if max_loss is not None:
        thr = float(max_loss)
        if not thr >= 0:
            raise OptionError(f"max_loss must be a non-negative accuracy loss, got {max_loss}")
        accept = lambda v: high - v <= thr + 1e-12  # noqa: E731
        criterion = {"max_loss": thr, "against": "all-high network"}
    else:
        accept = ctx.meets
        criterion = {"goal": ctx.goal, "against": "float network"}
    st = _Setup(wd, cands, lowered, high, accept, criterion)
    ctx.record("rank", [], start, high, True, statistic=wd.statistic, cycles=wd.cycles,
               values={n.name: wd.values[n] for n in wd.ranking}, ranking=[n.name for n in wd.ranking],
               candidates=[n.name for n in cands], kept=[n.name for n in skipped], **criterion)
    return st


def weight_diff_bsearch(ctx: SearchContext, start: BitConfig) -> BitConfig:
    """FIG. 11: the most lowest-statistic layers whose reduction stays within the threshold."""
    st = _setup(ctx, start, needs_goal=True)
    n = len(st.candidates)
    floor, mode = ctx.options.floor, ctx.options.mode

    def try_count(c: int, action: str) -> bool:
        cfg = st.config(start, c)
        v = ctx.evaluate(cfg)
        ok = bool(st.accept(v))
        ctx.record(action, st.candidates[:c], cfg, v, ok, count=c, loss=st.high_value - v)
        return ok

    if mode == "halving":
        c = n // 2 if n > 1 else n
        while c > 0:
            if try_count(c, "halving"):
                return st.config(start, c)
            if c <= floor:
                ctx.record("floor", st.candidates[:c], st.config(start, c), ctx.evaluate(st.config(start, c)),
                           True, count=c, forced=True)
                return st.config(start, c)
            c //= 2
        return start.copy()
    lo, hi = min(floor, n), n
    if lo > 0:
        cfg = st.config(start, lo)
        v = ctx.evaluate(cfg)
        ctx.record("floor", st.candidates[:lo], cfg, v, True, count=lo, forced=not st.accept(v),
                   loss=st.high_value - v)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if try_count(mid, "bsearch"):
            lo = mid
        else:
            hi = mid - 1
    return st.config(start, lo)


def weight_diff_topk(ctx: SearchContext, start: BitConfig) -> BitConfig:
    """FIG. 12: a fixed number of lowest-statistic layers go one rung down, without an accuracy check."""
    st = _setup(ctx, start, needs_goal=False)
    n = len(st.candidates)
    count = n // 2 if ctx.options.count is None else ctx.options.count
    c = min(count, n)
    cfg = st.config(start, c)
    v = ctx.evaluate(cfg)
    ctx.record("topk", st.candidates[:c], cfg, v, True, count=c, requested=count, loss=st.high_value - v,
               meets_goal=bool(st.accept(v)))
    return cfg
