"""prune-channels: remove output channels without retraining, to a MACs budget (REAP, PRO).

Each prunable layer (a Conv or Gemm whose channels reach exactly one next layer through
channel-wise operators: activations, pooling, depthwise Convs, Concat, Flatten) loses
the channels the selection picks, with every coupled node, and the next layer is refit by
least squares to reproduce its original outputs (calibration data). Selection:

* ``reap``: reconstruction-error-aware pruning: the error increase of removing each
  channel after the optimal refit, for all channels at once from the inverse Gram
  matrix, downdated after each removal (no least-squares solve per candidate);
* ``l1`` (largest filter L1 norms kept, then the refit), ``l1-norefit`` (no refit, no
  data needed), ``thinet`` (greedy by the next layer's reconstruction, then a
  per-channel least-squares rescale).

Ratios: ``pro`` measures, per layer, the error at the network output against the MACs
saved on a grid of ratios and advances the layer with the smallest slope until the
budget is met; ``uniform`` uses one ratio everywhere. Layers joined by a residual Add stay
unpruned (serialize-residual first) and the report says which. ``targets``: the refit's
targets come from the unpruned network (``original``, the CP-style variant: errors do
not accumulate) or from the network as pruned so far (``pruned``).

Options: flops (fraction of the float model's MACs to keep; default ``--flops``),
method (``--prune``, default reap), ratios (``--ratios``, default pro), samples (patch
rows per layer, 4000), grid (comma-free ratio list as ``0.1:0.9:0.1``, default that),
targets (original), ridge (the refit's ridge relative to the patches' mean squared column
norm, 1e-9: nearly plain least squares; raise it, e.g. to 1e-2, when a layer has few patch rows
for its width and the refit overfits). Requires: calibration data, BatchNorm folded, a float network (before
choose-formats). Preserves: nothing.
Report: MACs before/after and the target, per-layer kept channels, PRO's curves, the
layers left unpruned and why, MACs/weight bytes/float accuracy after pruning.
Errors: with an accuracy goal (``--max-drop``/``--target-score``) and --eval data, a
pruned network that already misses the goal stops here, naming ``--flops``.
Method: REAP (K. Kamma and T. Wada, "REAP: A method for pruning convolutional neural
networks with performance preservation", IEICE Trans. Inf. & Syst. E104-D(1), 2021) and
PRO (K. Kamma, S. Inoue and T. Wada, IEICE Trans. Inf. & Syst. E105-D(1), 2022); docs/PRUNING.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpqc.compiler.bitsearch import FloatReference, resolve_goal
from mpqc.compiler.channel_prune import prune_graph, total_macs
from mpqc.compiler.metrics import evaluate
from mpqc.compiler.options import check_prune
from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.compiler.reap import EPS
from mpqc.compiler.stages import stage_summary
from mpqc.core.errors import OptionError, TargetError
from mpqc.core.ir import Graph


def parse_grid(text: str) -> tuple[float, ...]:
    """``"0.1:0.9:0.1"`` (start:stop:step, stop included) into ratios."""
    try:
        a, b, c = (float(t) for t in text.split(":"))
    except ValueError:
        raise OptionError(f"prune-channels: grid={text!r} must be start:stop:step, e.g. 0.1:0.9:0.1") from None
    if not (0 < a <= b < 1 and c > 0):
        raise OptionError(f"prune-channels: grid={text!r} needs 0 < start <= stop < 1 and step > 0")
    n = int(np.floor((b - a) / c + 1e-9)) + 1
    return tuple(round(a + i * c, 10) for i in range(n))


@dataclass(frozen=True)
class PruneChannelsPass(Pass):
    name = "prune-channels"
    requires = ("calib", "folded-batchnorm", "float")

    flops: float | None = None
    method: str | None = None
    ratios: str | None = None
    samples: int = 4000
    grid: str = "0.1:0.9:0.1"
    targets: str = "original"
    ridge: float = EPS

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts = ctx.options
        flops = self.flops if self.flops is not None else opts.flops
        method = self.method or opts.prune or "reap"
        ratios = self.ratios or opts.ratios or "pro"
        check_prune(flops, method, ratios, ("prune-channels: flops", "prune-channels: method",
                                            "prune-channels: ratios"))
        if flops is None:
            raise OptionError("prune-channels needs a MACs budget: give --flops F (the fraction of the float "
                              "model's MACs to keep, e.g. 0.5)")
        if not 0 <= self.ridge < 1:
            raise OptionError(f"prune-channels: ridge={self.ridge} must be in [0, 1)")
        if self.samples < 16:
            raise OptionError(f"prune-channels: samples={self.samples} must be at least 16")
        # the budget is a fraction of the model the user gave (serialization adds MACs)
        base = ctx.float_graph if ctx.float_graph is not None else graph
        base_macs, now = total_macs(base), total_macs(graph)
        sec = ctx.section(self.name)
        sec.update({"flops": flops, "method": method, "ratios": ratios, "targets": self.targets, "ridge": self.ridge,
                    "float_macs": base_macs})
        if base_macs == 0 or now <= flops * base_macs:
            sec["skipped"] = "already within the MACs budget" if base_macs else "no layer with known MACs"
            return PassResult(False)
        _, rep = prune_graph(graph, ctx.calib.x, flops * base_macs / now, ratios=ratios, method=method,
                             grid=parse_grid(self.grid), n_samples=self.samples, seed=ctx.seed,
                             batch_size=ctx.batch_size, targets=self.targets, in_place=True, eps=self.ridge)
        sec.update(rep.to_json())
        sec["macs_fraction_of_float"] = rep.macs_after / base_macs
        after = stage_summary(self.name, graph, ctx)
        sec["after"] = after
        if rep.macs_after > flops * base_macs * (1 + 1e-9):
            raise TargetError(f"prune-channels: the MACs budget --flops {flops} cannot be met: pruning every "
                              f"prunable layer as far as the grid allows keeps {rep.macs_after / base_macs:.3f} of "
                              f"the float model's MACs ({len(rep.refused)} layers cannot be pruned, see the report)",
                              hint="raise --flops, or serialize residual blocks first (-O3 does)")
        self._check_goal(ctx, after, flops)
        return PassResult(True, {"macs_before": rep.macs_before, "macs_after": rep.macs_after})

    @staticmethod
    def _check_goal(ctx: PassContext, after: dict, flops: float) -> None:
        opts = ctx.options
        if "accuracy" not in after or (opts.max_drop is None and opts.target_score is None):
            return
        base = ctx.float_graph
        if base is None:
            return
        ref = ctx.analyses.get(FloatReference, base, split="eval")
        float_value = evaluate(after["metric"], ref, ctx.eval.y, ref)
        goal = resolve_goal(float_value, after["metric"], opts.max_drop, opts.target_score)
        if after["accuracy"] < goal:
            if not opts.strict:  # keep the pruned network; the search after it reports the missed goal
                ctx.section("prune-channels")["goal_missed"] = {
                    "metric": after["metric"], "goal": float(goal), "value": float(after["accuracy"]),
                    "float": float(float_value), "missed_by": float(goal - after["accuracy"]),
                    "message": f"at --flops {flops} the pruned float network scores {after['accuracy']:.4f}, "
                               f"below the accuracy goal {goal:.4f}"}
                return
            raise TargetError(f"prune-channels: at --flops {flops} the pruned float network already scores "
                              f"{after['accuracy']:.4f} ({after['metric']} on eval), below the accuracy goal "
                              f"{goal:.4f} (float {float_value:.4f}), before any quantization",
                              hint="raise --flops (keep more MACs), or raise --max-drop")
