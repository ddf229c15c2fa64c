"""The degree of influence of each layer's bit reduction (US 2021/0201141 A1; docs/LAYER_INFLUENCE.md).

Notation: NN_T is the current network (a ``BitConfig``: at first every layer at the
top of the target's ladder), NN_S the same network with every layer of the target
range ``[S, G]`` one rung lower on the ladder (layers already at the bottom, or at
the minimum width b_m, stay as they are and get no influence).

Layers are cut in topological order. The *stream order* is the graph's node order
with each fused activation (the Relu/Clip whose output carries a layer's
activation format) moved right after its layer, so that a layer and its output
rounding are never split by a cut. Cut ``k`` lies just before layer ``k`` in that
order; cut ``len(layers)`` lies after the last node. Every tensor produced before
a cut and read after it (several in a graph with branches) crosses the cut.

Variants (``VARIANTS``), all giving "drop of the evaluation value caused by
reducing the layer", higher = more sensitive:

* ``chained`` (the patent's default, FIG. 8/10/13): ``P_k`` = eval of (NN_S from the
  input up to cut k, then NN_T from cut k to the output), fed with NN_S's
  dequantized tensors at the cut; ``I_k = P_k - P_(k+1)``. ``P_S`` is eval(NN_T).
* ``isolated`` ([0167]): ``I_k = eval(NN_T) - eval(NN_T with only layer k reduced)``.
* ``reversed`` ([0167]): ``Q_k`` = eval of (NN_T up to cut k, NN_S after it);
  ``I_k = Q_(k+1) - Q_k``.

Cost: one *sweep* per variant. A sweep runs the data batch by batch: the prefix
network once over the whole graph, node by node, keeping only live tensors; at each
cut the tensors crossing it are fed to a suffix run of the other network (partial
execution, ``runtime.executor``) of the mixed network: layers before the cut with
the prefix network's widths, the others with the suffix network's, so that ops
without weights after the cut (Add, Concat) take the widths of the network they
belong to. Each cut's value is thus exactly the evaluation of that mixed network,
computed without re-running its prefix. The prefix is never re-run, and memory is bounded
by one batch's live activations plus one suffix run, whatever the number of cuts.
The network outputs of each cut are accumulated over batches and scored at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..core.errors import OptionError
from ..core.ir import Graph, Node, Value
from ..runtime.executor import Executor, batches
from ..runtime.parallel import map_batches
from .options import VARIANTS
from .ortsim import crossing_inputs, make_session, run_session
from .quant import BitConfig, QuantPlan
from .targets import Target


# ---------------------------------------------------------------------------- ladder helpers
def lower_rung(target: Target, bits: tuple[int, int], min_bits: int | None = None) -> tuple[int, int] | None:
    """The ladder rung below ``bits`` (None at the bottom, off the ladder, or below b_m)."""
    lad = [tuple(x) for x in target.ladder]
    try:
        i = lad.index(tuple(bits))
    except ValueError:
        return None
    if i + 1 >= len(lad):
        return None
    nxt = lad[i + 1]
    bm = target.min_bits if min_bits is None else min_bits
    if min(nxt) < bm:
        return None
    return nxt


def reduced_config(target: Target, config: BitConfig, layers: Sequence[Node],
                   min_bits: int | None = None) -> tuple[BitConfig, list[Node]]:
    """NN_S: ``config`` with each of ``layers`` one rung lower; also the layers that moved."""
    out = config.copy()
    moved = []
    for n in layers:
        lo = lower_rung(target, config.bits[n], min_bits)
        if lo is not None:
            out.bits[n] = lo
            moved.append(n)
    return out, moved


# ---------------------------------------------------------------------------- cuts
def stream_order(plan: QuantPlan) -> list[Node]:
    """Graph order with every fused activation placed right after its layer."""
    graph = plan.graph
    fused = {id(a): n for n, a in plan.fused.items() if a is not None}
    after = {id(n): a for n, a in plan.fused.items() if a is not None}
    order: list[Node] = []
    for n in graph.nodes:
        if id(n) in fused:
            continue
        order.append(n)
        a = after.get(id(n))
        if a is not None:
            order.append(a)
    return order


def cut_positions(plan: QuantPlan, order: list[Node]) -> list[int]:
    """Index in ``order`` of each cut: before layer k for k < L, and len(order) for k = L."""
    pos = {id(n): i for i, n in enumerate(order)}
    return [pos[id(n)] for n in plan.layers] + [len(order)]


def crossing_values(order: list[Node], graph: Graph, cut: int) -> list[Value]:
    """Tensors produced before ``cut`` (or graph inputs) that are read at or after it, or are outputs."""
    before: dict[int, Value] = {id(v): v for v in graph.inputs}
    for n in order[:cut]:
        for v in n.outputs:
            before[id(v)] = v
    needed: dict[int, Value] = {}
    for n in order[cut:]:
        for v in n.inputs:
            if v is not None and id(v) in before:
                needed.setdefault(id(v), v)
    for v in graph.outputs:
        if id(v) in before:
            needed.setdefault(id(v), v)
    return list(needed.values())


# ---------------------------------------------------------------------------- the sweep
@dataclass
class SweepStats:
    batches: int = 0
    prefix_runs: int = 0  # one per batch
    suffix_runs: int = 0  # one per cut per batch


def sweep(sim, x: np.ndarray, prefix: BitConfig | None, cuts: Sequence[tuple[int, BitConfig | None]], *,
          batch_size: int = 64, output: Value | None = None, progress: str | None = None,
          stats: SweepStats | None = None, check: Callable[[], None] | None = None,
          jobs: int = 1) -> list[np.ndarray]:
    """Outputs of the networks "``prefix`` up to cut c, then ``suffix`` from c" for each ``(c, suffix)``.

    ``c`` indexes ``stream_order(sim.plan)`` (``cut_positions`` gives the layer cuts).
    Returns, per entry of ``cuts``, the network's ``output`` (default: first graph
    output) over all of ``x``. The prefix runs once per batch; each suffix is a
    partial run fed with the prefix's tensors crossing the cut. ``check`` is called before each
    batch (``--time-budget``: it raises to stop the sweep). ``jobs > 1``: the batches run in
    worker processes (``runtime/parallel.py``), with identical results.
    """
    plan = sim.plan
    graph = plan.graph
    order = stream_order(plan)
    out_v = output or graph.outputs[0]
    pre_fn = sim.node_fn(prefix)
    suffix_ex: dict[int, Executor] = {}
    for i, (_, cfg) in enumerate(cuts):
        suffix_ex[i] = Executor(graph, sim.node_fn(cfg))
    # the onnxruntime engine (``QuantSim.engine``): each suffix as its own ONNX model from the tensors
    # crossing its cut, built on the first batch (in each worker) and kept for the sweep
    # (None: this suffix runs on the numpy engine)
    ort_suffix: dict[int, tuple | None] = {}

    def run_suffix(i: int, feeds: dict) -> np.ndarray:
        if sim.engine == "onnxruntime" and i not in ort_suffix:
            ort_suffix[i] = None
            needed = suffix_ex[i].plan([out_v], list(feeds))
            if needed:  # (nothing to run when the cut is at the output)
                crossing = crossing_inputs(needed)
                make = sim.ort_model(cuts[i][1], inputs=crossing, outputs=[out_v])
                if make is not None:
                    ort_suffix[i] = (make_session(make(), 1, arena=False), crossing)
        hit = ort_suffix.get(i)
        if hit is not None:
            sess, crossing = hit
            return run_session(sess, {v: feeds[v] for v in crossing}, [out_v])[0]
        return suffix_ex[i].run(feeds, [out_v])[out_v]
    by_pos: dict[int, list[int]] = {}
    for i, (c, _) in enumerate(cuts):
        if not 0 <= c <= len(order):
            raise OptionError(f"cut {c} is outside the graph (0..{len(order)})")
        by_pos.setdefault(c, []).append(i)
    last_cut = max((c for c, _ in cuts), default=0)
    # reads of every value by nodes of the stream, to drop dead tensors as the prefix advances
    # (keyed by the Values themselves, not id(): the closure may be pickled to another process)
    reads: dict[Value, int] = {}
    for n in order:
        for v in n.inputs:
            if v is not None and not v.is_const:
                reads[v] = reads.get(v, 0) + 1
    pinned = set(graph.outputs)

    def one_batch(sl: slice) -> list[np.ndarray | None]:
        if check is not None:
            check()
        outs: list[np.ndarray | None] = [None] * len(cuts)
        env: dict[Value, np.ndarray] = {graph.inputs[0]: x[sl]}
        remaining = dict(reads)
        for pos in range(last_cut + 1):
            for i in by_pos.get(pos, ()):
                outs[i] = run_suffix(i, dict(env))
            if pos == len(order) or pos == last_cut:
                continue
            node = order[pos]
            args = [None if v is None else (v.const if v.is_const else env[v]) for v in node.inputs]
            for v, a in zip(node.outputs, pre_fn(node, args)):
                env[v] = a
            for v in node.inputs:
                if v is not None and not v.is_const:
                    remaining[v] -= 1
                    if remaining[v] == 0 and v not in pinned:
                        env.pop(v, None)
            for v in node.outputs:  # produced but never read (and not an output): drop now
                if reads.get(v, 0) == 0 and v not in pinned:
                    env.pop(v, None)
        return outs

    per = map_batches(one_batch, list(batches(len(x), batch_size)), jobs=jobs, progress=progress)
    st = stats if stats is not None else SweepStats()
    st.batches += len(per)
    st.prefix_runs += len(per)  # one per batch
    st.suffix_runs += len(per) * len(cuts)
    return [np.concatenate([b[i] for b in per], axis=0) for i in range(len(cuts))]


# ---------------------------------------------------------------------------- the analysis
@dataclass
class InfluenceResult:
    """Influences of one variant for one NN_T."""
    variant: str
    layers: list[Node]  # every layer of the plan, in order
    candidates: list[Node]  # layers of [S, G] that can be reduced (have an influence)
    influence: dict[Node, float]  # I per candidate
    values: list[float]  # P_k (chained), eval(T with k reduced) (isolated), Q_k (reversed)
    value_layers: list[str]  # what each entry of ``values`` is (cut or layer name)
    base_value: float  # eval(NN_T)
    reduced_value: float | None  # eval(NN_S) where the sweep gives it (chained: P_(G+1) ~, reversed: Q_S)
    config: BitConfig  # NN_T
    reduced: BitConfig  # NN_S
    stats: SweepStats = field(default_factory=SweepStats)
    #: what ``values`` and ``influence`` are measured in: "metric" (the evaluation value) or a
    #: ranking signal against the float outputs (``compiler.options.SIGNALS``)
    signal: str = "metric"
    samples: int = 0  # evaluation samples the sweep ran on
    #: NN_T's evaluation value on the metric, where the sweep gives it besides the signal (None: not)
    metric_value: float | None = None

    def to_json(self) -> dict:
        return {"variant": self.variant,
                "influence": {n.name: float(self.influence[n]) for n in self.candidates},
                "values": [float(v) for v in self.values], "value_points": self.value_layers,
                "base_value": float(self.base_value),
                "from_bits": {n.name: list(self.config.bits[n]) for n in self.candidates},
                "to_bits": {n.name: list(self.reduced.bits[n]) for n in self.candidates},
                "suffix_runs": self.stats.suffix_runs, "signal": self.signal, "samples": self.samples}

    def to_cache(self) -> dict:
        """Everything but ``layers`` and ``config`` (the caller's), by layer name (the result cache)."""
        return {"variant": self.variant, "candidates": [n.name for n in self.candidates],
                "influence": [float(self.influence[n]) for n in self.candidates],
                "values": [float(v) for v in self.values], "value_layers": list(self.value_layers),
                "base_value": float(self.base_value),
                "reduced_value": None if self.reduced_value is None else float(self.reduced_value),
                "reduced": {"bits": [list(self.reduced.bits[n]) for n in self.layers],
                            "input_bits": self.reduced.input_bits},
                "stats": [self.stats.batches, self.stats.prefix_runs, self.stats.suffix_runs],
                "signal": self.signal, "samples": self.samples,
                "metric_value": None if self.metric_value is None else float(self.metric_value)}

    @classmethod
    def from_cache(cls, d: dict, layers: Sequence[Node], config: BitConfig) -> "InfluenceResult":
        """The inverse of ``to_cache`` for the plan's ``layers`` and NN_T ``config``."""
        by_name: dict[str, Node] = {}
        for n in layers:
            if n.name in by_name:
                raise ValueError(f"two layers are named {n.name!r}")
            by_name[n.name] = n
        cands = [by_name[name] for name in d["candidates"]]
        if len(d["reduced"]["bits"]) != len(layers):
            raise ValueError("the entry's layers are not the plan's")
        reduced = BitConfig({n: tuple(b) for n, b in zip(layers, d["reduced"]["bits"])},
                            int(d["reduced"]["input_bits"]))
        return cls(d["variant"], list(layers), cands, dict(zip(cands, (float(v) for v in d["influence"]))),
                   [float(v) for v in d["values"]], list(d["value_layers"]), float(d["base_value"]),
                   None if d["reduced_value"] is None else float(d["reduced_value"]), config, reduced,
                   SweepStats(*(int(v) for v in d["stats"])), str(d["signal"]), int(d["samples"]),
                   None if d["metric_value"] is None else float(d["metric_value"]))


def mixed_config(layers: Sequence[Node], prefix: BitConfig, suffix: BitConfig, k: int) -> BitConfig:
    """Layers ``< k`` with ``prefix``'s widths, the others with ``suffix``'s."""
    return BitConfig({n: (prefix.bits[n] if i < k else suffix.bits[n]) for i, n in enumerate(layers)},
                     prefix.input_bits if k > 0 else suffix.input_bits)


def layer_range(layers: Sequence[Node], rng: tuple[int, int] | None) -> list[Node]:
    """Layers with index in [S, G] (inclusive; G may be negative, counted from the end)."""
    if rng is None:
        return list(layers)
    n = len(layers)
    s, g = int(rng[0]), int(rng[1])
    if g < 0:
        g += n
    if s < 0:
        s += n
    if not (0 <= s <= g < n):
        raise OptionError(f"layer range [{rng[0]}, {rng[1]}] is empty or outside the {n} layers "
                          f"(indices 0..{n - 1}); give layers=S:G with 0 <= S <= G")
    return list(layers[s:g + 1])


def compute_influence(sim, target: Target, config: BitConfig, x: np.ndarray,
                      score: Callable[[np.ndarray], float], *, variant: str = "chained",
                      candidates: Sequence[Node] | None = None, min_bits: int | None = None,
                      batch_size: int = 64, progress: bool = False,
                      check: Callable[[], None] | None = None, jobs: int = 1, signal: str = "metric",
                      value_score: Callable[[np.ndarray], float] | None = None) -> InfluenceResult:
    """Influence of each layer of ``candidates`` (default: all) under ``variant`` for NN_T = ``config``.

    ``score`` maps the network output over ``x`` to the value influences are measured in: the
    evaluation value, or the ranking ``signal`` it computes. ``value_score``, when ``score`` is a
    signal: the evaluation value, for NN_T's ``metric_value`` (the sweep runs NN_T anyway).
    """
    if variant not in VARIANTS:
        raise OptionError(f"influence variant {variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
    plan = sim.plan
    layers = plan.layers
    rng_layers = list(layers if candidates is None else candidates)
    s_cfg, movable = reduced_config(target, config, rng_layers, min_bits)
    idx = {id(n): i for i, n in enumerate(layers)}
    order = stream_order(plan)
    cuts = cut_positions(plan, order)
    stats = SweepStats()
    desc = f"influence ({variant})" if progress else None
    mov = sorted(movable, key=lambda n: idx[id(n)])
    influence: dict[Node, float] = {}
    if not mov:  # nothing left to reduce: no sweep
        return InfluenceResult(variant, list(layers), [], {}, [], [], float("nan"), None, config, s_cfg, stats,
                               signal, len(x))

    def result(values, names, base: float, base_out: np.ndarray, reduced_value) -> InfluenceResult:
        mv = base if signal == "metric" else (None if value_score is None else float(value_score(base_out)))
        return InfluenceResult(variant, list(layers), mov, influence, values, names, base, reduced_value,
                               config, s_cfg, stats, signal, len(x), mv)
    if variant == "isolated":
        entries = [(cuts[0], config)] + [(cuts[idx[id(n)]], config.with_layer(n, s_cfg.bits[n])) for n in mov]
        outs = sweep(sim, x, config, entries, batch_size=batch_size, progress=desc, stats=stats, check=check,
                     jobs=jobs)
        vals = [score(o) for o in outs]
        for n, v in zip(mov, vals[1:]):
            influence[n] = vals[0] - v
        return result(vals[1:], [n.name for n in mov], vals[0], outs[0], None)
    # chained / reversed: cuts before each range layer and after the last one. Layers of the range
    # that cannot move are identical in both networks; their cut difference is ~0 and not reported.
    ks = list(range(min(idx[id(n)] for n in rng_layers), max(idx[id(n)] for n in rng_layers) + 2))
    # the suffix of cut k runs the mixed network (layers before k from the prefix network, the others
    # from the suffix network), so that ops without weights after the cut (Add, Concat) take the widths
    # of the network they belong to
    pre, suf = (s_cfg, config) if variant == "chained" else (config, s_cfg)
    entries = [(cuts[k], mixed_config(layers, pre, suf, k)) for k in ks]
    outs = sweep(sim, x, pre, entries, batch_size=batch_size, progress=desc, stats=stats, check=check,
                 jobs=jobs)
    vals = [score(o) for o in outs]
    for j, k in enumerate(ks[:-1]):
        n = layers[k]
        if any(n is m for m in mov):
            influence[n] = (vals[j] - vals[j + 1]) if variant == "chained" else (vals[j + 1] - vals[j])
    names = [layers[k].name if k < len(layers) else "<output>" for k in ks]
    if variant == "chained":
        return result(vals, names, vals[0], outs[0], vals[-1])
    return result(vals, names, vals[-1], outs[-1], vals[0])
