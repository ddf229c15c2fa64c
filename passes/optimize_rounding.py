"""optimize-rounding: integer weights fitted to each layer's float outputs (AdaRound objective, OBQ solver).

Each layer's integer weights are chosen to minimise its output error on the calibration data instead
of rounding every weight to the nearest grid point.

For every layer with decided widths, ``H = E[x x^T]`` over its calibration inputs (im2col patches for
a Conv, one matrix per group) measures the output error ``(w_q - w)^T H (w_q - w)`` of each output
channel; the weights are quantized one input column at a time, in the order of decreasing ``H[i, i]``,
each column's rounding error spread over the columns not yet quantized (Optimal Brain Quantization:
Frantar and Alistarh, "Optimal Brain Compression", NeurIPS 2022; GPTQ, ICLR 2023; the layer-wise
reconstruction objective of Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020). With power-of-two per-channel formats, a channel moves to the next finer
fractional length when that lowers its output error and its bias still fits the accumulator. The new
weights lie exactly on their format's grid, so the emulator and the QDQ model run them as they run any
other integer weights. docs/ROUNDING.md.

Options:
* when: "always" (default), or "start-misses-goal": only when the network as it stands, evaluated as
  the search does, misses the accuracy goal (-O2 uses it on the search's starting network);
* guard: after the optimisation, evaluate as the search does and undo it if the network no longer
  meets the goal (-O2 uses it once the search has fixed the widths);
* inputs: "quantized" (fit each layer from the quantized network's inputs, layer after layer, holding
  both networks' activations for ``samples`` calibration samples) or "float" (from the float
  network's inputs, one batched pass);
* samples (64); damp (ridge added to H, relative to its mean diagonal; 0.01); act_order (columns by
  decreasing H[i, i]; true); finer (how many finer power-of-two steps a channel may take where that
  lowers its error; 1, 0 = never); bias (refit the bias in the same solve; true); min_samples (input
  vectors per input a layer needs for the correction of its inputs' quantization error; 32);
* solver: "obq" (default, the closed-form sweep above) or "adaround": each layer's rounding learned by
  gradient descent through the autograd engine on the error of its output after its activation, from
  the quantized network's inputs to the float network's outputs (Nagel et al., ICML 2020; the bias
  trained with it when ``bias``; ``finer``, ``damp``, ``act_order`` and ``min_samples`` are the OBQ
  solver's); iters (Adam steps per layer; 400), lr (0.01), reg (the weight of the rounding
  regulariser; 0.01), seed (the order of the random crops; 0). compiler/adaround.py.

Requires: calibration data, widths on the IR (after choose-formats or
assign-bit-widths). Preserves: activation ranges, quant plan, format table (the formats stay those
chosen on the float network; a finer channel is written into the table). Marks the graph (metadata
``mpqc.optimized_rounding``) and does nothing on a graph already optimised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.compiler.quant import FormatTableAnalysis, QuantPlanAnalysis, config_from_ir
from mpqc.compiler.ranges import ActivationRanges
from mpqc.compiler.bitsearch import search_context, search_goal
from mpqc.compiler.cache import graph_digest
from mpqc.compiler.adaround import AdaRoundOptions, adaround_solver
from mpqc.compiler.rounding import (META_KEY, LayerInputGrams, apply_rounding_state, check_rounding_state,
                                    optimise_rounding, optimise_rounding_sequential, restore_layers,
                                    rounding_state, snapshot_layers)
from mpqc.core.errors import OptionError
from mpqc.core.ir import Graph


@dataclass(frozen=True)
class OptimizeRoundingPass(Pass):
    name = "optimize-rounding"
    preserves = frozenset({ActivationRanges, QuantPlanAnalysis, FormatTableAnalysis})
    requires = ("calib", "formats")

    inputs: Literal["quantized", "float"] = "quantized"
    when: Literal["always", "start-misses-goal"] = "always"
    guard: bool = False
    samples: int = 64
    damp: float = 0.01
    act_order: bool = True
    finer: int = 1
    bias: bool = True
    min_samples: float = 32.0
    solver: Literal["obq", "adaround"] = "obq"
    iters: int = 400
    lr: float = 0.01
    reg: float = 0.01
    seed: int = 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not self.damp > 0:
            raise OptionError(f"optimize-rounding: damp={self.damp} must be positive (e.g. 0.01)")
        if self.samples < 1:
            raise OptionError(f"optimize-rounding: samples={self.samples} must be at least 1")
        solve = None
        if self.solver == "adaround":
            if self.inputs == "float":
                raise OptionError("optimize-rounding: solver=adaround fits each layer from the quantized "
                                  "network's inputs; drop inputs=float")
            solve = adaround_solver(AdaRoundOptions(iters=self.iters, lr=self.lr, reg=self.reg, bias=self.bias,
                                                    seed=self.seed))
        sec = ctx.section(self.name)
        if self.when == "start-misses-goal":  # -O2 runs the pass twice: this one reports on its own
            sec = sec.setdefault("start_network", {})
        if graph.metadata.get(META_KEY):
            sec["skipped"] = "the weights are already optimised"
            return PassResult(False)
        plan = ctx.analyses.get(QuantPlanAnalysis, graph)
        config = config_from_ir(plan)  # raises when no widths are decided yet
        table = ctx.analyses.get(FormatTableAnalysis, graph, search=2)
        before = None
        if self.when == "start-misses-goal" or self.guard:
            sctx = self._search(graph, ctx)
            before = sctx.evaluate(config)
            sec["value_before"] = before
            if self.when == "start-misses-goal" and sctx.meets(before):
                sec["skipped"] = (f"the network meets the goal without it ({before:.4f} >= {sctx.goal:.4f}); "
                                  f"the weights are left for the search to reduce")
                return PassResult(False)
            kept = snapshot_layers(plan.layers)
        opts = dict(damp=self.damp, act_order=self.act_order, finer=self.finer, bias=self.bias, quiet=ctx.quiet)
        if self.inputs == "float":
            grams = ctx.analyses.get(LayerInputGrams, graph)
            rows = optimise_rounding(graph, plan.layers, table, grams, **opts)
            used = len(ctx.calib)
        else:
            n = len(ctx.calib)
            idx = np.unique(np.linspace(0, n - 1, min(self.samples, n)).round().astype(np.int64))
            x = ctx.calib.x[idx]
            computed = []

            def compute():
                computed.append(True)
                rows = optimise_rounding_sequential(graph, plan.layers, table, x, batch_size=ctx.batch_size,
                                                    rounding=getattr(ctx.target, "rounding", "half-up"),
                                                    min_samples=self.min_samples, solve=solve, **opts)
                meta, arrays = rounding_state(plan.layers)
                return {"rows": rows, **meta}, arrays

            if ctx.store is None:
                meta, arrays = compute()
            else:
                key = {"graph": graph_digest(graph), "data": ctx.store.data_digest(x), "batch": ctx.batch_size,
                       "options": self.options()}
                meta, arrays = ctx.store.memo("optimize-rounding", key, compute, lambda r: r,
                                             lambda m, a: (check_rounding_state(plan.layers, m, a), m, a)[1:])
            if not computed:  # a cache hit: the same weights, biases and formats written back
                apply_rounding_state(graph, plan.layers, table, meta, arrays)
            rows = meta["rows"]
            used = len(idx)
        if self.guard:
            sctx = self._search(graph, ctx)
            after = sctx.evaluate(config)
            sec["value_after"] = after
            if not sctx.meets(after):  # the layer-wise fit would break the user's goal on the eval split: undone
                restore_layers(graph, kept, table)
                sec["reverted"] = (f"the evaluation value fell from {before:.4f} to {after:.4f}, below the goal "
                                   f"{sctx.goal:.4f}")
                sec["layers"] = rows
                return PassResult(False)
        graph.metadata[META_KEY] = "1"
        sec["layers"] = rows
        sec["options"] = self.options()
        sec["samples"] = used
        return PassResult(any(r.get("applied") for r in rows))

    def _search(self, graph: Graph, ctx: PassContext):
        """The search's view of the network (its goal, eval split and metric, with bias correction)."""
        max_drop, target_score = search_goal(None, None, ctx.options, self.name)
        return search_context(graph, ctx, max_drop=max_drop, target_score=target_score, bias_correction=True)
