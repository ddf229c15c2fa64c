"""Shared machinery of the bit-width searches, and the layer-influence strategies.

A ``SearchContext`` bundles what every strategy needs: the quantization plan and
format table, the fake-quant simulator, the evaluation data and metric, the float
reference outputs, the target and its ladder, the goal and a trace. ``evaluate``
scores a ``BitConfig`` (cached by its key, so a strategy never pays twice for the
same network); ``influence`` runs the LayerInfluence analysis for a network;
``record`` appends a step to the trace. Strategies are plain functions
``strategy(sctx, start) -> BitConfig``, listed by name in ``compiler/strategies.py``;
the ``assign-bit-widths`` pass looks them up and passes its strategy options
(``compiler.options.SearchOptions``) in ``sctx.options``.

The three strategies of US 2021/0201141 A1 (FIG. 14-19, claims 4-9; docs/LAYER_INFLUENCE.md). "Reducing" a layer
moves it one rung down the target's ladder (npu8: w8a16 -> w4a8; npu4: w8a8 ->
w4a8 -> w4a4 -> w2a4), never below the minimum width b_m. Each step's evaluation
value (the "third evaluation value") is compared with the goal exactly as the
patent does: greater -> go on with the reduced network as the new NN_T; equal ->
stop and return the reduced network; less -> stop and return NN*, the network
before the last reduction.

* ``threshold``: reduce every not-yet-reduced layer whose influence is <= K, then
  raise K (``k_step=next``: the next distinct influence value; ``double``: K*2).
* ``min-influence``: reduce the one not-yet-reduced layer with the lowest influence.
* ``influence-update``: like min-influence, but after each accepted step the
  reduced network is the new NN_T and every influence is recomputed (S22/S100);
  a layer can be reduced again until every layer is at b_m.

With ``repeat=true`` (the [0168] variation) threshold and min-influence go on once
every layer has been reduced: influences are recomputed for the next rung and the
walk starts again. Ties in influence go to the layer that saves more weight bytes,
then to the earlier layer **(choice)**. ``rank=random|weight-range`` replaces the
influence ranking (for the ablation that measures what the ranking is worth).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..core.errors import DataError, OptionError, TargetError
from ..core.ir import Graph, Node
from ..core.progress import progress_iter
from ..runtime.executor import run_batched
from .bias_correction import bias_correction_for
from .cache import ResultCache, graph_digest, hash_json
from .data import Dataset
from .influence import InfluenceResult, compute_influence, layer_range as pick_range, lower_rung
from .metrics import check_metric, evaluate, signal_value
from .options import SearchOptions, check_ranking
from .passes import Analysis
from .quant import BitConfig, FormatTable, FormatTableAnalysis, QuantPlan, QuantPlanAnalysis, config_from_ir, weight_bytes
from .quantsim import QuantSim
from .rounding import META_KEY as ROUNDING_META
from .targets import Target

#: the strategies that rank layers by their degree of influence (the others do not need it measured)
INFLUENCE_STRATEGIES = ("threshold", "min-influence", "influence-update")
GOAL_EPS = 1e-12  # evaluation values this close to the goal count as equal to it


#: metrics that are a mean of per-sample hits (0 or 1): a partial run bounds the final value
COUNT_METRICS = ("top1", "top5", "agreement")


class CertainlyBelow(Exception):
    """``SearchContext.evaluate(stop_below=True)``: after ``samples`` of ``of`` the value can be at most
    ``bound``, which is below the goal."""

    def __init__(self, bound: float, samples: int, of: int):
        super().__init__(bound, samples, of)
        self.bound, self.samples, self.of = float(bound), int(samples), int(of)


class TimeBudgetExceeded(Exception):
    """``--time-budget`` ran out: raised by ``SearchContext`` before it computes anything more; the
    search pass catches it and keeps the best network accepted so far."""


@dataclass
class TraceStep:
    step: int
    action: str  # e.g. "start", "reduce", "raise-threshold"
    layers: list[str]
    bits: dict[str, list[int]]  # layer -> [w, a] after the step
    value: float  # evaluation value of the candidate network
    accepted: bool
    weight_bytes: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"step": self.step, "action": self.action, "layers": self.layers, "bits": self.bits,
             "value": self.value, "accepted": self.accepted, "weight_bytes": self.weight_bytes}
        d.update(self.extra)
        return d


@dataclass(eq=False)
class SearchContext:
    graph: Graph
    plan: QuantPlan
    table: FormatTable
    sim: Any  # runtime.fakequant.QuantSim
    target: Target
    data: Dataset
    metric: str
    reference: np.ndarray | None  # float network outputs on data.x (for agreement/mse/psnr)
    float_value: float  # evaluation value of the float network
    goal: float  # the target value: the searches keep eval >= goal
    batch_size: int = 64
    quiet: bool = True
    seed: int = 0
    options: SearchOptions = field(default_factory=SearchOptions)
    trace: list[TraceStep] = field(default_factory=list)
    _cache: dict[tuple, float] = field(default_factory=dict)
    evaluations: int = 0
    min_bits: int | None = None  # b_m (default: the target's)
    candidates: list[Node] | None = None  # layers of the range [S, G] (default: all)
    influence_sweeps: int = 0
    suffix_runs: int = 0
    influences: list = field(default_factory=list)  # every InfluenceResult computed, in order
    _icache: dict[tuple, Any] = field(default_factory=dict)
    #: the result cache and this search's key in it (digest of everything an evaluation depends on
    #: besides the bit widths); None: nothing is cached across compiles
    store: ResultCache | None = None
    fingerprint: str | None = None
    #: ``time.monotonic()`` after which nothing more is computed (``TimeBudgetExceeded``)
    deadline: float | None = None
    #: worker processes for the batches of evaluations and sweeps (``--jobs``; identical results)
    jobs: int = 1
    _accepted: list[BitConfig] = field(default_factory=list)
    _ranking: tuple | None = None  # ranking_data()
    early_stops: list[tuple[int, int]] = field(default_factory=list)  # (samples run, of) per early stop

    @property
    def layers(self) -> list[Node]:
        return self.plan.layers

    @property
    def range_layers(self) -> list[Node]:
        return list(self.layers if self.candidates is None else self.candidates)

    def score(self, outputs: np.ndarray) -> float:
        return evaluate(self.metric, outputs, self.data.y, self.reference)

    def evaluate(self, config: BitConfig | None, *, stop_below: bool = False) -> float:
        """Evaluation value of the network quantized with ``config`` (None: float). ``stop_below``:
        raise ``CertainlyBelow`` once the samples left cannot bring the value up to the goal
        (``judge``); that outcome is cached in the result cache (keyed by the goal), not in memory."""
        key = ("float",) if config is None else config.key(self.layers)
        if key not in self._cache:
            def compute():
                if self._accepted:  # the starting network is always measured; then the budget counts
                    self.check_budget()
                if stop_below:  # the early stop's outcome is cached too: a warm compile computes nothing
                    try:
                        return {"value": self._value_unless_below(config)}
                    except CertainlyBelow as e:
                        return {"below": [e.bound, e.samples, e.of]}
                out = self.sim.run(config, self.data.x, batch_size=self.batch_size,
                                   progress=None if self.quiet else "evaluate", jobs=self.jobs)[0]
                return float(self.score(out))
            if self.store is not None and self.fingerprint is not None:
                ckey = {"search": self.fingerprint, "config": key}
                if stop_below:  # where it stops depends on the goal
                    ckey["stop_below"] = self.goal
                value = self.store.memo_json("evaluation", ckey, compute)
            else:
                value = compute()
            if isinstance(value, dict):
                if "below" in value:
                    raise CertainlyBelow(*value["below"])
                value = value["value"]
            self._cache[key] = value
            self.evaluations += 1
        return self._cache[key]

    def _value_unless_below(self, config: BitConfig) -> float:
        """The value of ``evaluate``, batch by batch (the same batches, so the same outputs), for a
        metric that is a mean of per-sample hits; ``CertainlyBelow`` after the first batch at which
        even all the samples left counted as hits would leave the value below the goal."""
        x, n, bs = self.data.x, len(self.data), self.batch_size
        chunk = bs * max(1, self.jobs)  # --jobs runs a chunk's batches at once; checked one by one
        y = self.data.y
        ref = self.reference
        hits, outs = 0, []
        for a in range(0, n, chunk):
            out = self.sim.run(config, x[a:a + chunk], batch_size=bs, jobs=self.jobs)[0]
            outs.append(out)
            for j in range(0, len(out), bs):
                lo, hi = a + j, min(n, a + j + bs)
                hits += round(evaluate(self.metric, out[j:j + bs], None if y is None else y[lo:hi],
                                       None if ref is None else ref[lo:hi]) * (hi - lo))
                bound = (hits + n - hi) / n
                if hi < n and bound < self.goal - GOAL_EPS:
                    raise CertainlyBelow(bound, hi, n)
        return float(self.score(np.concatenate(outs, axis=0)))

    def judge(self, config: BitConfig) -> tuple[float, str, dict]:
        """(value, verdict, extra) of a candidate network: ``compare(evaluate(config))``, except that the
        run stops early once the verdict can only be "below" (``options.early_stop``, for the metrics
        that count hits: top1, top5, agreement). Then the value is an upper bound and ``extra``'s
        ``early_stop`` says after how many samples; the patent's decision is the same."""
        if not (self.options.early_stop and self.metric in COUNT_METRICS):
            v = self.evaluate(config)
            return v, self.compare(v), {}
        try:
            v = self.evaluate(config, stop_below=True)
        except CertainlyBelow as e:
            self.early_stops.append((e.samples, e.of))
            return e.bound, "below", {"early_stop": {"samples": e.samples, "of": e.of, "value_at_most": e.bound}}
        return v, self.compare(v), {}

    def check_budget(self) -> None:
        """Raise ``TimeBudgetExceeded`` once the deadline has passed."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeBudgetExceeded()

    def best_accepted(self) -> BitConfig | None:
        """The smallest network (weight bytes; the latest of equals) a step accepted, None before any."""
        best = None
        for c in self._accepted:
            if best is None or self.weight_bytes(c) <= self.weight_bytes(best):
                best = c
        return best

    def known(self, config: BitConfig, value: float) -> None:
        """Remember an evaluation value obtained elsewhere (e.g. P_S of an influence sweep)."""
        self._cache.setdefault(config.key(self.layers), float(value))

    def meets(self, value: float) -> bool:
        return value >= self.goal - GOAL_EPS

    def compare(self, value: float) -> str:
        """The patent's three-way test of a step: "above", "equal" or "below" the goal."""
        if value > self.goal + GOAL_EPS:
            return "above"
        if value >= self.goal - GOAL_EPS:
            return "equal"
        return "below"

    def weight_bytes(self, config: BitConfig) -> float:
        return weight_bytes(self.plan, config)

    def record(self, action: str, layers: list[Node], config: BitConfig, value: float, accepted: bool,
               **extra) -> TraceStep:
        st = TraceStep(len(self.trace), action, [n.name for n in layers],
                       {n.name: list(config.bits[n]) for n in self.layers}, float(value), bool(accepted),
                       float(self.weight_bytes(config)), extra)
        self.trace.append(st)
        if accepted:
            self._accepted.append(config.copy())
        return st

    def lower(self, config: BitConfig, node: Node) -> tuple[int, int] | None:
        """The next rung below ``node``'s widths on the target ladder (None at the bottom or b_m)."""
        return lower_rung(self.target, config.bits[node], self.min_bits)

    def ranking_data(self) -> tuple[np.ndarray, Callable[[np.ndarray], float], Callable | None]:
        """(inputs, score, value_score) of the influence sweeps: ``options.ranking_subset`` samples evenly
        spaced over the split (all of it when None or not smaller), scored in ``options.signal``;
        ``value_score`` gives the evaluation value of the same outputs where they are the whole split
        under another signal (None otherwise)."""
        if self._ranking is None:
            signal, k, n = self.options.signal, self.options.ranking_subset, len(self.data)
            idx = None if k is None or k >= n else np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))
            x = self.data.x if idx is None else self.data.x[idx]
            y = self.data.y if idx is None or self.data.y is None else self.data.y[idx]
            ref = self.reference if idx is None or self.reference is None else self.reference[idx]
            if signal != "metric" and ref is None:
                raise OptionError(f"ranking signal {signal!r} needs the float network's outputs")
            if signal == "metric":
                score = self.score if idx is None else (lambda out: evaluate(self.metric, out, y, ref))
            else:
                score = lambda out: signal_value(signal, out, ref)  # noqa: E731
            self._ranking = (x, score, self.score if signal != "metric" and idx is None else None)
        return self._ranking

    def _ikey(self, config: BitConfig, variant: str, cands: list[Node], signal: str, samples: int) -> tuple:
        return (config.key(self.layers), variant, tuple(id(n) for n in cands), signal, samples)

    def influence(self, config: BitConfig, variant: str = "chained", candidates: list[Node] | None = None):
        """LayerInfluence of ``config`` as NN_T (``compiler.influence.compute_influence``), in the ranking
        signal on the ranking subset (``ranking_data``)."""
        cands = self.range_layers if candidates is None else list(candidates)
        x, score, value_score = self.ranking_data()
        signal = self.options.signal
        res = self._icache.get(self._ikey(config, variant, cands, signal, len(x)))
        if res is None:
            def compute() -> InfluenceResult:
                self.check_budget()
                return compute_influence(self.sim, self.target, config, x, score,
                                         variant=variant, candidates=cands, min_bits=self.min_bits,
                                         batch_size=self.batch_size, progress=not self.quiet,
                                         check=self.check_budget, jobs=self.jobs, signal=signal,
                                         value_score=value_score)
            if self.store is not None and self.fingerprint is not None:
                layers = self.layers
                key = {"search": self.fingerprint, "config": config.key(layers), "variant": variant,
                       "candidates": [n.name for n in cands], "min_bits": self.min_bits}
                if signal != "metric" or len(x) != len(self.data):  # (keys of earlier entries unchanged)
                    key.update(signal=signal, samples=len(x))
                res = self.store.memo("influence", key, compute, lambda r: (r.to_cache(), {}),
                                      lambda m, a: InfluenceResult.from_cache(m, layers, config))
            else:
                res = compute()
            self.add_influence(res, cands)
        return res

    def add_influence(self, res, candidates: list[Node] | None = None) -> None:
        """Count and cache an InfluenceResult (computed here or by the LayerInfluence analysis)."""
        cands = self.range_layers if candidates is None else list(candidates)
        key = self._ikey(res.config, res.variant, cands, res.signal, res.samples)
        if key in self._icache:
            return
        self._icache[key] = res
        if res.candidates:
            self.influence_sweeps += 1
            self.suffix_runs += res.stats.suffix_runs
            if res.metric_value is not None and res.samples == len(self.data):
                self.known(res.config, res.metric_value)
        self.influences.append(res)

    def bytes_saved(self, config: BitConfig, node: Node) -> float:
        lo = self.lower(config, node)
        if lo is None:
            return 0.0
        return node.weight.const.size * (config.bits[node][0] - lo[0]) / 8


def resolve_goal(float_value: float, metric: str, max_drop: float | None, target_score: float | None) -> float:
    """The value a search must keep: ``float * (1 - max_drop)`` for ratio metrics, else absolute."""
    if target_score is not None:
        return float(target_score)
    if metric in ("mse", "psnr") and max_drop is None:
        return float("nan")  # no goal yet: enough to measure influences, an error for a search
    drop = 0.01 if max_drop is None else float(max_drop)
    if metric in ("mse", "psnr"):
        # against the float model itself the value is 0 (mse) or infinite (psnr): no drop is relative to it
        what = "the largest mean squared error allowed, negated (e.g. -1e-3)" if metric == "mse" else \
            "the lowest PSNR in dB (e.g. 40)"
        raise OptionError(f"--metric {metric} compares with the float model, so --max-drop has nothing to be "
                          f"relative to: give --target-score, {what}")
    return float_value * (1 - drop)


def search_goal(max_drop: float | None, target_score: float | None, options, where: str
                ) -> tuple[float | None, float | None]:
    """(max_drop, target_score) of a pass: its own options, else the compile options' (``--max-drop``,
    ``--target-score``); a pass option replaces both compile options."""
    if max_drop is not None and target_score is not None:
        raise OptionError(f"{where}: give either max_drop or target_score, not both")
    if target_score is not None:
        return None, target_score
    if max_drop is not None:
        if not 0 <= max_drop < 1:
            raise OptionError(f"{where}: max_drop={max_drop} must be in [0, 1)")
        return max_drop, None
    return options.max_drop, options.target_score


def ranking_options(signal: str | None, subset: int | None, options, where: str) -> tuple[str, int | None]:
    """(signal, ranking_subset) of a pass: its own options, else the compile options'
    (``--rank-signal``, ``--ranking-subset``)."""
    check_ranking(signal, subset, (f"{where}: signal", f"{where}: ranking_subset"))
    return (options.rank_signal if signal is None else signal,
            options.ranking_subset if subset is None else subset)


def check_goal_reachable(ctx: SearchContext, start: BitConfig) -> float:
    """Evaluate the starting network; a goal it already misses is impossible."""
    if not np.isfinite(ctx.goal):
        resolve_goal(ctx.float_value, ctx.metric, 0.0, None)  # raises the message that says what to give
    v = ctx.evaluate(start)
    if not ctx.meets(v):
        raise TargetError(
            f"the accuracy target {ctx.goal:.4f} ({ctx.metric}) is not met even before any layer is reduced: "
            f"the starting network scores {v:.4f} (float {ctx.float_value:.4f})",
            hint="raise --max-drop, lower --target-score, or use a target with wider bit widths")
    return v


def missed_goal(ctx: SearchContext, start: BitConfig, strict: bool) -> dict | None:
    """None when the starting network meets the goal. Otherwise ``strict`` raises the
    ``TargetError`` of ``check_goal_reachable``; without it, what was missed (the starting network
    is then the best one the search can offer: the top of the target's ladder)."""
    try:
        check_goal_reachable(ctx, start)
        return None
    except TargetError as e:
        if strict:
            raise
        v = ctx.evaluate(start)
        return {"metric": ctx.metric, "goal": float(ctx.goal), "value": float(v), "float": float(ctx.float_value),
                "missed_by": float(ctx.goal - v), "message": e.message}


# ---------------------------------------------------------------------------- building a context
class FloatReference(Analysis):
    """The float network's first output on a data split ("eval" or "calib")."""
    name = "float-reference"
    persist = "float-reference"
    float_only = True

    def __init__(self, split: str = "eval", **params):
        super().__init__(split=split, **params)
        self.split = split

    def reads(self) -> tuple[str, ...]:
        return (self.split,)

    def encode(self, result: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {"out": result}

    def decode(self, meta: dict, arrays: dict[str, np.ndarray], graph: Graph) -> np.ndarray:
        return arrays["out"]

    def compute(self, graph: Graph, ctx) -> np.ndarray:
        data = getattr(ctx, self.split)
        return run_batched(graph, data.x, batch_size=ctx.batch_size,
                           progress=None if ctx.quiet else f"float reference ({self.split})", jobs=ctx.jobs)[0]


def search_data(ctx, split: str | None, metric: str | None) -> tuple[str, Dataset, str, str | None]:
    """(split, dataset, metric, note): the eval split when given, else the calibration split with
    agreement as the default metric."""
    note = None
    if split is None:
        split = "eval" if ctx.eval is not None else "calib"
        if split == "calib":
            note = "no --eval data: the search scores agreement with the float model on the calibration data"
    data = getattr(ctx, split, None)
    if data is None:
        opt = "--eval" if split == "eval" else "--calib"
        raise DataError(f"the bit-width search needs {split} data: give {opt} FILE.npz[:{split}]")
    if metric is None:
        metric = "agreement" if split == "calib" or data.y is None else "top1"
    check_metric(metric, data.y is not None)
    return split, data, metric, note


def search_context(graph: Graph, ctx, *, split: str | None = None, metric: str | None = None,
                   max_drop: float | None = None, target_score: float | None = None,
                   layer_range: tuple[int, int] | None = None, min_bits: int | None = None,
                   format_search: int = 2, options: SearchOptions | None = None,
                   bias_correction: bool = False) -> SearchContext:
    """A SearchContext for ``graph`` (after choose-formats) from a PassContext. With ``bias_correction``
    the simulated networks carry the bias correction of ``passes.bias_correction`` at every width."""
    split, data, metric, note = search_data(ctx, split, metric if metric is not None else ctx.metric)
    plan = ctx.analyses.get(QuantPlanAnalysis, graph)
    table = ctx.analyses.get(FormatTableAnalysis, graph, search=format_search)
    base = graph
    if ctx.float_graph is not None and (any(n.prune is not None for n in graph.layers())
                                        or graph.metadata.get(ROUNDING_META)):
        # a pruned network, or one whose weights optimize-rounding replaced by their integers: the goal is
        # relative to the model the user gave (the graph's own weights in float are no longer that model)
        base = ctx.float_graph
    ref = ctx.analyses.get(FloatReference, base, split=split)  # the float value needs it anyway
    float_value = evaluate(metric, ref, data.y, ref)
    bc = None
    if bias_correction:
        bc = bias_correction_for(graph, ctx).corrected_bias
    store = ctx.store
    sim_engine = ctx.options.sim
    fingerprint = None
    if store is not None:  # everything an evaluation or a sweep depends on besides the bit widths
        fingerprint = graph_digest(graph) + "/" + store.data_digest(data) + "/" + str(hash_json({
            "base": None if base is graph else graph_digest(base), "target": ctx.target.to_json(),
            "calib": None if ctx.calib is None else store.data_digest(ctx.calib), "split": split,
            "metric": metric, "format_search": format_search, "bias_correction": bool(bias_correction),
            "batch": ctx.batch_size, "sim": sim_engine}))
    sctx = SearchContext(graph=graph, plan=plan, table=table, sim=QuantSim(plan, table, bc, engine=sim_engine),
                         target=ctx.target,
                         data=data, metric=metric, reference=ref, float_value=float_value,
                         goal=resolve_goal(float_value, metric, max_drop, target_score),
                         batch_size=ctx.batch_size, quiet=ctx.quiet, seed=ctx.seed,
                         options=(options if options is not None else SearchOptions()).check(),
                         min_bits=min_bits, candidates=pick_range(plan.layers, layer_range),
                         store=store, fingerprint=fingerprint, deadline=ctx.deadline, jobs=ctx.jobs)
    sctx.options.split = split
    sctx.options.bias_correction = bool(bias_correction)
    if note and sctx.options.note is None:
        sctx.options.note = note
    return sctx


# ---------------------------------------------------------------------------- ranking
def _ranking(sctx: SearchContext, config: BitConfig, cands: list[Node]) -> dict[Node, float]:
    """Score per candidate (lower = reduce first): influence, or an ablation ordering."""
    rank = sctx.options.rank
    if rank == "influence":
        res = sctx.influence(config, sctx.options.variant)
        return {n: float(res.influence[n]) for n in cands}
    idx = {id(n): i for i, n in enumerate(sctx.layers)}
    if rank == "random":  # one fixed random permutation of the layers (seeded)
        perm = np.random.default_rng(sctx.seed).permutation(len(sctx.layers))
        return {n: float(perm[idx[id(n)]]) for n in cands}
    if rank == "weight-range":  # smaller weight range first: a finer step at any width (choice)
        return {n: float(np.ptp(n.weight.const)) for n in cands}
    raise OptionError(f"rank={rank!r} is unknown; choose influence, random or weight-range")


def _order(sctx: SearchContext, config: BitConfig, scores: dict[Node, float]) -> list[Node]:
    idx = {id(n): i for i, n in enumerate(sctx.layers)}
    return sorted(scores, key=lambda n: (scores[n], -sctx.bytes_saved(config, n), idx[id(n)]))


def _lowerable(sctx: SearchContext, config: BitConfig, exclude=()) -> list[Node]:
    ex = {id(n) for n in exclude}
    return [n for n in sctx.range_layers if id(n) not in ex and sctx.lower(config, n) is not None]


def _reduce(sctx: SearchContext, config: BitConfig, nodes: list[Node]) -> BitConfig:
    new = config.copy()
    for n in nodes:
        new.bits[n] = sctx.lower(config, n)
    return new


def _start(sctx: SearchContext, start: BitConfig) -> float:
    v = check_goal_reachable(sctx, start)
    sctx.record("start", [], start, v, True, goal=sctx.goal)
    return v


def _steps(sctx: SearchContext, start: BitConfig, desc: str):
    """Counts the steps of a search loop (forever), with a progress bar sized to the layer-rungs left."""
    total = 0
    for n in sctx.range_layers:
        b = start.bits[n]
        while (lo := _lower_bits(sctx, b)) is not None:
            total += 1
            b = lo
    return progress_iter(itertools.count(), desc=None if sctx.quiet else desc, total=total)


def _lower_bits(sctx: SearchContext, bits) -> tuple[int, int] | None:
    return lower_rung(sctx.target, bits, sctx.min_bits)


def _scores_json(scores: dict[Node, float]) -> dict[str, float]:
    return {n.name: float(s) for n, s in scores.items()}


# ---------------------------------------------------------------------------- strategies
def min_influence(sctx: SearchContext, start: BitConfig) -> BitConfig:
    """FIG. 16-17: reduce the not-yet-reduced layer of lowest influence while eval > goal."""
    _start(sctx, start)
    steps = iter(_steps(sctx, start, "search (min-influence)"))
    cur = start  # NN_T, also NN* (the last network that met the goal)
    repeat = sctx.options.repeat
    while True:
        cands = _lowerable(sctx, cur)
        if not cands:
            return cur
        scores = _ranking(sctx, cur, cands)
        reduced: list[Node] = []
        for n, _ in zip(_order(sctx, cur, scores), steps):
            new = _reduce(sctx, cur, [n])
            v, verdict, extra = sctx.judge(new)
            sctx.record("reduce", [n], new, v, verdict != "below", score=scores[n], verdict=verdict, **extra)
            if verdict == "below":
                return cur  # NN*
            if verdict == "equal":
                return new
            cur = new
            reduced.append(n)
        if not repeat:
            return cur


def threshold(sctx: SearchContext, start: BitConfig) -> BitConfig:
    """FIG. 14-15: reduce every not-yet-reduced layer with influence <= K, raise K, repeat."""
    _start(sctx, start)
    steps = iter(_steps(sctx, start, "search (threshold)"))
    cur = start
    repeat = sctx.options.repeat
    step = sctx.options.k_step
    if step not in ("next", "double"):
        raise OptionError(f"k_step={step!r} is unknown; choose next or double")
    k_init = sctx.options.k_init
    while True:
        cands = _lowerable(sctx, cur)
        if not cands:
            return cur
        scores = _ranking(sctx, cur, cands)
        remaining = list(cands)
        k = float(min(scores.values())) if k_init is None else float(k_init)
        while remaining:
            next(steps)
            sel = [n for n in _order(sctx, cur, {n: scores[n] for n in remaining}) if scores[n] <= k]
            if sel:
                new = _reduce(sctx, cur, sel)
                v, verdict, extra = sctx.judge(new)
                sctx.record("reduce", sel, new, v, verdict != "below", threshold=k, verdict=verdict,
                            score={n.name: float(scores[n]) for n in sel}, **extra)
                if verdict == "below":
                    return cur
                if verdict == "equal":
                    return new
                cur = new
                remaining = [n for n in remaining if all(n is not m for m in sel)]
                if not remaining:
                    break
            higher = sorted({scores[n] for n in remaining if scores[n] > k})
            if step == "double" and k > 0:
                k = k * 2
            else:  # next distinct influence value (also how "double" leaves K <= 0)
                k = float(higher[0]) if higher else k
            sctx.record("raise-threshold", [], cur, sctx.evaluate(cur), True, threshold=k)
        if not repeat:
            return cur


def influence_update(sctx: SearchContext, start: BitConfig) -> BitConfig:
    """FIG. 18-19: min-influence with influences recomputed on the reduced network after each step."""
    _start(sctx, start)
    cur = start
    for _ in _steps(sctx, start, "search (influence-update)"):
        cands = _lowerable(sctx, cur)
        if not cands:  # S216: every layer at b_m: the last reduced network is the result
            return cur
        scores = _ranking(sctx, cur, cands)
        n = _order(sctx, cur, scores)[0]
        new = _reduce(sctx, cur, [n])
        v, verdict, extra = sctx.judge(new)
        sctx.record("reduce", [n], new, v, verdict != "below", score=scores[n], verdict=verdict,
                    scores=_scores_json(scores), **extra)
        if verdict == "below":
            return cur
        if verdict == "equal":
            return new
        cur = new


class LayerInfluence(Analysis):
    """``InfluenceResult`` of the network the IR describes (its ``node.qconfig`` bits as NN_T).

    Parameters: ``variant``, ``split`` ("eval"/"calib"/None: eval when present),
    ``metric`` (None: the context's, else top1 with labels / agreement),
    ``layer_range`` (S, G), ``min_bits`` (b_m; None: the target's), ``bias_correction`` (simulate
    the bias-correction pass in both networks), ``signal`` and ``ranking_subset`` (what the
    influences are measured in, on how many samples: ``SearchContext.ranking_data``).
    """
    name = "layer-influence"

    def __init__(self, variant: str = "chained", split: str | None = None, metric: str | None = None,
                 layer_range: tuple[int, int] | None = None, min_bits: int | None = None,
                 bias_correction: bool = False, signal: str = "metric", ranking_subset: int | None = None,
                 **params):
        super().__init__(variant=variant, split=split, metric=metric, layer_range=layer_range,
                         min_bits=min_bits, bias_correction=bias_correction, signal=signal,
                         ranking_subset=ranking_subset, **params)

    def compute(self, graph: Graph, ctx) -> InfluenceResult:
        p = self.params
        sctx = search_context(graph, ctx, split=p["split"], metric=p["metric"], layer_range=p["layer_range"],
                              min_bits=p["min_bits"], bias_correction=p["bias_correction"],
                              options=SearchOptions(signal=p["signal"], ranking_subset=p["ranking_subset"]))
        return sctx.influence(config_from_ir(sctx.plan), p["variant"])
