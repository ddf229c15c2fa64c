"""binary-decompose: every Conv/Gemm filter becomes k binary bases times k coefficients.

Each output filter ``w`` (length ``D = C/group * kh * kw``) of a 2-D Conv, a Gemm or a
2-D MatMul with a constant weight is approximated by ``M c`` with ``M`` in
{-1,+1}^(D x k) and ``c`` in R^k: greedy residual initialisation, then alternating
optimisation (``c`` by least squares, each row of ``M`` by exhaustive search over the
2^k sign vectors), ``restarts`` seeded restarts with the best kept per filter; ``c`` is
rounded to the target's fixed-point weight format (signed, power-of-two scale per
filter; 8 bits on ``bdcnn``). The layer's weight becomes the reconstruction ``M c``
(a Gemm is normalised to transB=1, alpha=beta=1); the decomposition itself is stored as
JSON in ``graph.metadata["mpqc.bdcnn.<layer name>"]`` (k, relative Frobenius error,
coefficient integers and fractions, ``M+`` bit-packed in base64; read it back with
``mpqc.compiler.bdecomp.Decomposition.from_metadata``). A layer that cannot be
decomposed (ConvTranspose, a 1-D/3-D Conv, Gemm with transA...) keeps its weight at
8-bit fixed point and is listed in the report section with the reason.

Options: ``bases`` (k in 1..8 for every layer, or per layer as in ``--bases``:
``"3,LAYER=2"``; default 3), ``restarts`` (>= 1), ``iterations`` (alternating rounds);
``fit``: "weights" (default here: the paper's fit, which depends on the weights alone),
"outputs" (each decomposition then re-fitted to its layer's outputs on the first
``samples`` calibration samples, from the decomposed network's inputs, bias refitted;
``rounds`` alternations; what ``--target bdcnn`` does by default, docs/BDCNN.md) or
"outputs-float" (from the float network's inputs).
Requires: folded BatchNorm, a float network; calibration data with fit=outputs*.
Preserves: nothing (weights change).
Method: "Binary-decomposed DCNN for accelerating computation and compressing model
without retraining" (Kamiya et al., ICCV Workshops 2017); see docs/BDCNN.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpqc.compiler.bdcnn import decompose_and_fit, fit_columns
from mpqc.compiler.options import parse_bases
from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.core.errors import OptionError
from mpqc.core.ir import Graph


@dataclass(frozen=True)
class BinaryDecomposePass(Pass):
    name = "binary-decompose"
    requires = ("folded-batchnorm", "float")

    bases: str = "3"
    restarts: int = 3
    iterations: int = 20
    fit: Literal["weights", "outputs", "outputs-float"] = "weights"
    samples: int = 32
    rounds: int = 4

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        tgt = ctx.target
        coef_bits = int(tgt.weight_bits[0]) if tgt is not None and tgt.binary_decomposed else 8
        if self.restarts < 1 or self.iterations < 0:
            raise OptionError(f"binary-decompose: restarts={self.restarts} must be >= 1 and "
                              f"iterations={self.iterations} >= 0")
        if self.samples < 1 or self.rounds < 1:
            raise OptionError(f"binary-decompose: samples={self.samples} and rounds={self.rounds} must be >= 1")
        decs, skipped, fit_rows = decompose_and_fit(
            graph, None if ctx.calib is None else ctx.calib.x, fit=self.fit, fit_samples=self.samples,
            fit_rounds=self.rounds, bases=parse_bases(self.bases, "binary-decompose: bases"), restarts=self.restarts,
            iterations=self.iterations, coef_bits=coef_bits, seed=ctx.seed, batch_size=ctx.batch_size,
            quiet=ctx.quiet, record=True)
        sec = ctx.section(self.name)
        fitted = fit_columns(fit_rows)
        sec["fit"] = self.fit
        sec["layers"] = [{"layer": n, "k": d.k, "rel_error": d.rel_error, **fitted.get(n, {}), **d.sizes()}
                         for n, d in decs.items()]
        sec["not_decomposed"] = [{"layer": n, "reason": r} for n, r in skipped.items()]
        return PassResult(bool(decs) or bool(skipped), {"decomposed": len(decs), "skipped": len(skipped)})
