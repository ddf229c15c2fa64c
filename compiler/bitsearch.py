"""Shared machinery of the bit-width searches (ALGORITHMS.md §3, §4, §5).

A ``SearchContext`` bundles what every strategy needs: the quantization plan and
format table, the fake-quant simulator, the evaluation data and metric, the
float reference outputs, the target and its ladder, and a trace. ``evaluate``
scores a ``BitConfig`` (cached by its key, so a strategy never pays twice for the
same network). Strategies are plain functions registered by name with
``@register_strategy("name")``; the ``assign-bit-widths`` pass looks them up.
A strategy returns the chosen ``BitConfig`` (NN*) and records every step in
``ctx.trace``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .data import Dataset
from .errors import OptionError, TargetError
from .ir import Graph, Node
from .metrics import NEEDS_REFERENCE, evaluate
from .quant import BitConfig, FormatTable, QuantPlan, weight_bytes
from .targets import Target


@dataclass
class TraceStep:
    step: int
    action: str  # e.g. "reduce", "evaluate", "raise-threshold"
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
    options: dict[str, Any] = field(default_factory=dict)
    trace: list[TraceStep] = field(default_factory=list)
    _cache: dict[tuple, float] = field(default_factory=dict)
    evaluations: int = 0

    @property
    def layers(self) -> list[Node]:
        return self.plan.layers

    def score(self, outputs: np.ndarray) -> float:
        return evaluate(self.metric, outputs, self.data.y, self.reference)

    def evaluate(self, config: BitConfig | None) -> float:
        """Evaluation value of the network quantized with ``config`` (None: float)."""
        key = ("float",) if config is None else config.key(self.layers)
        if key not in self._cache:
            out = self.sim.run(config, self.data.x, batch_size=self.batch_size)[0]
            self._cache[key] = self.score(out)
            self.evaluations += 1
        return self._cache[key]

    def meets(self, value: float) -> bool:
        return value >= self.goal

    def weight_bytes(self, config: BitConfig) -> float:
        return weight_bytes(self.plan, config)

    def record(self, action: str, layers: list[Node], config: BitConfig, value: float, accepted: bool,
               **extra) -> TraceStep:
        st = TraceStep(len(self.trace), action, [n.name for n in layers],
                       {n.name: list(config.bits[n]) for n in self.layers}, float(value), bool(accepted),
                       float(self.weight_bytes(config)), extra)
        self.trace.append(st)
        return st

    def lower(self, config: BitConfig, node: Node) -> tuple[int, int] | None:
        """The next rung below ``node``'s widths on the target ladder (None at the bottom or b_m)."""
        lad = self.target.ladder
        cur = config.bits[node]
        try:
            i = lad.index(tuple(cur))
        except ValueError:
            return None
        if i + 1 >= len(lad):
            return None
        nxt = lad[i + 1]
        if nxt[0] < self.target.min_bits:
            return None
        return nxt


Strategy = Callable[[SearchContext, BitConfig], BitConfig]
STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str):
    def deco(fn: Strategy) -> Strategy:
        if name in STRATEGIES and STRATEGIES[name] is not fn:
            raise ValueError(f"strategy {name!r} registered twice")
        STRATEGIES[name] = fn
        return fn
    return deco


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise OptionError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def resolve_goal(float_value: float, metric: str, max_drop: float | None, target_score: float | None) -> float:
    """The value a search must keep: ``float * (1 - max_drop)`` for ratio metrics, else absolute."""
    if target_score is not None:
        return float(target_score)
    drop = 0.01 if max_drop is None else float(max_drop)
    if metric in ("mse",):  # negative values: allow |mse| to grow by the relative drop
        return float_value * (1 + drop)
    if metric == "psnr":
        return float_value * (1 - drop) if np.isfinite(float_value) else 60.0
    return float_value * (1 - drop)


def check_goal_reachable(ctx: SearchContext, start: BitConfig) -> float:
    """Evaluate the starting network; a goal it already misses is impossible."""
    v = ctx.evaluate(start)
    if not ctx.meets(v):
        raise TargetError(
            f"the accuracy target {ctx.goal:.4f} ({ctx.metric}) is not met even before any layer is reduced: "
            f"the starting network scores {v:.4f} (float {ctx.float_value:.4f})",
            hint="raise --max-drop, lower --target-score, or use a target with wider bit widths")
    return v
