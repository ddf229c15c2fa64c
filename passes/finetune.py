"""finetune: a few epochs of training with fake quantization to recover accuracy.

Runs after the bit widths are assigned (and after pruning): the network is trained
on the labelled ``--train`` data with mpqc's own training engine
(``runtime.autograd``, ``runtime.train``): mini-batch SGD with momentum, a cosine
learning-rate schedule, seeded shuffling. With ``quantized`` (default) the forward
pass fake-quantizes weights, biases and activations at the formats on the IR and
the backward pass is the clipped straight-through estimator, so the float shadow
weights learn to compensate the rounding of the chosen widths. Weights that a
pruning pass zeroed (``node.prune`` set) stay exactly zero.

Afterwards the new weights are written to the IR and, with ``reformat`` (default),
each layer's weight format is re-chosen for them (minimum MSE, as choose-formats
does; the bias format follows); the re-chosen formats are kept only if they do not
evaluate worse than the formats the training used. Activation formats are kept:
the network was trained with them. With ``revert_if_worse`` (default) a fine-tuned
network that evaluates below the one it started from is discarded.

Evaluation ("before" / "after" in the report): top-1 accuracy of the fake-quantized
network on ``--eval`` (or, without it, the calibration data) when labelled.

Options: epochs (default ``--finetune-epochs``, else 3), lr (0.002), momentum (0.9),
weight_decay (0), batch_size (32), schedule (cosine | constant), quantized (true),
reformat (true), revert_if_worse (true), format_search (2, as choose-formats).
Requires: labelled training data (``--train FILE.npz:train``); the formats of
choose-formats / assign-bit-widths when quantized. Preserves: quant plan (the
structure does not change; activation ranges and format tables are recomputed).
Report: epochs, steps, loss and training accuracy per epoch, evaluation before and
after, which formats were kept, whether the result was reverted (no wall time:
reports are byte-identical run to run).
Method: retraining the quantized network (US 12,393,828 B2, FIG. 3-4, [0065]; docs/WEIGHT_DIFFERENCE.md),
also the recovery step of -O3; the engine is the one the weight-difference analysis uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpqc.core.errors import DataError, OptionError
from mpqc.core.ir import Graph
from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.compiler.quant import FormatTable, QuantPlanAnalysis, check_bias_fits
from mpqc.compiler.ranges import ActivationRanges
from mpqc.runtime.autograd import GradEngine, QuantSpec
from mpqc.runtime.train import TrainOptions, accuracy, check_labels, fit


@dataclass(frozen=True)
class FinetunePass(Pass):
    name = "finetune"
    preserves = frozenset({QuantPlanAnalysis})

    epochs: float | None = None
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    schedule: Literal["cosine", "constant"] = "cosine"
    quantized: bool = True
    reformat: bool = True
    revert_if_worse: bool = True
    format_search: int = 2

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        epochs = self.epochs if self.epochs is not None else ctx.options.finetune_epochs
        epochs = 3.0 if epochs is None else float(epochs)
        if epochs < 0:
            raise OptionError(f"finetune: epochs={epochs} must be >= 0")
        sec = ctx.section(self.name)
        layers = graph.layers()
        if epochs == 0 or not layers:
            sec.update({"skipped": "epochs=0" if epochs == 0 else "no layers with weights"})
            return PassResult(False)
        data = ctx.train
        if data is None:
            raise DataError("finetune trains the network: give labelled training data with --train FILE.npz:train "
                            "(or leave fine-tuning off: --no-finetune)")
        y = check_labels(data.x, data.y, f"--train {data.source}")
        topts = TrainOptions(epochs=epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                             weight_decay=self.weight_decay, schedule=self.schedule, seed=ctx.seed)
        topts.check()
        quantized = self.quantized and any(n.qconfig is not None for n in layers)
        if quantized and self.reformat and ctx.target is None:
            raise OptionError("finetune: re-choosing weight formats needs a --target (or reformat=false)")
        spec = QuantSpec.from_ir(graph) if quantized else None
        ev = ctx.eval if ctx.eval is not None and ctx.eval.y is not None else (
            ctx.calib if ctx.calib is not None and ctx.calib.y is not None else None)

        engine = GradEngine(graph, quant=spec)
        frozen = {}
        for n in layers:
            if n.prune is not None and n.weight in engine.params:
                frozen[n.weight] = engine.params[n.weight] == 0
        old_consts = {v: v.const for v in engine.params}
        old_formats = {n: (n.qconfig.weight_format, n.qconfig.bias_format) for n in layers if n.qconfig is not None}
        before = accuracy(engine, ev.x, ev.y, ctx.batch_size) if ev is not None else None
        res = fit(engine, data.x, y, topts, frozen=frozen or None,
                  progress=None if ctx.quiet else "finetune")
        after_trained = accuracy(engine, ev.x, ev.y, ctx.batch_size) if ev is not None else None
        engine.write_back()
        after = after_trained
        formats = "trained" if quantized else "float"
        if quantized and self.reformat:
            self._reformat(graph, ctx, layers)
            after_re = None
            if ev is not None:
                after_re = accuracy(GradEngine(graph, quant=QuantSpec.from_ir(graph)), ev.x, ev.y, ctx.batch_size)
            if after_re is not None and after_re < after_trained:
                for n, (wf, bf) in old_formats.items():  # the formats the training used evaluate better
                    n.qconfig.weight_format, n.qconfig.bias_format = wf, bf
            else:
                formats = "re-chosen"
                after = after_re
            sec["after_rechosen_formats"] = after_re
        reverted = bool(self.revert_if_worse and before is not None and after < before)
        if reverted:
            for v, c in old_consts.items():
                v.const = c
            for n, (wf, bf) in old_formats.items():
                n.qconfig.weight_format, n.qconfig.bias_format = wf, bf
        for n in layers:
            q = n.qconfig
            if q is not None and q.bias_format is not None and n.bias is not None:
                check_bias_fits(n, n.bias.const, q.bias_format)
        sec.update({
            "data": {"source": data.source, "samples": len(data)},
            "eval": None if ev is None else {"source": ev.source, "samples": len(ev), "metric": "top1"},
            "quantized": quantized, "options": {"epochs": epochs, "lr": self.lr, "momentum": self.momentum,
                                                "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                                                "schedule": self.schedule, "seed": ctx.seed},
            "train": res.to_json(), "before": before, "after_trained_formats": after_trained, "after": after,
            "formats": formats, "frozen_weights": int(sum(int(m.sum()) for m in frozen.values())),
            "reverted": reverted,
        })
        return PassResult(not reverted)

    def _reformat(self, graph: Graph, ctx: PassContext, layers) -> None:
        """Re-choose each layer's weight format (and the bias format that follows it) for the new weights."""
        plan = ctx.analyses.get(QuantPlanAnalysis, graph)
        # a fresh table: its weight formats are computed from the new constants; the activation statistics
        # (from before training) only bound the bias headroom, and activation formats are not touched
        table = FormatTable(plan, ctx.analyses.get(ActivationRanges, graph), ctx.target,
                            search=self.format_search)
        for n in layers:
            q = n.qconfig
            if q is None or q.weight_format is None:
                continue
            q.weight_format = table.weight_format(n, q.weight_bits)
            if n.bias is not None and q.bias_format is not None:
                in_fmt = n.inputs[0].qformat
                if in_fmt is None:
                    raise OptionError(f"finetune: layer {n.name!r} has a weight format but its input "
                                      f"{n.inputs[0].name!r} has none; run choose-formats first")
                q.bias_format = table.bias_format(n, in_fmt, q.weight_format)
