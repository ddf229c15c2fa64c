"""The explicit registry of mpqc's built-in passes: name -> pass class.

``compiler/pipelines.py`` resolves ``--passes`` and the ``-O`` levels against it; a
user's own pass joins through ``compiler.pipelines.register_pass``."""
from __future__ import annotations

from mpqc.compiler.passes import Pass

from .assign_bit_widths import AssignBitWidthsPass
from .bias_correction import BiasCorrectionPass
from .binary_decompose import BinaryDecomposePass
from .choose_formats import ChooseFormatsPass
from .eliminate_dead_code import EliminateDeadCodePass
from .equalize import EqualizePass
from .finetune import FinetunePass
from .fold_batchnorm import FoldBatchNormPass
from .fold_constants import FoldConstantsPass
from .fold_pad_into_conv import FoldPadIntoConvPass
from .infer_shapes import InferShapesPass
from .insert_qdq import InsertQDQPass
from .layer_influence import LayerInfluencePass
from .optimize_rounding import OptimizeRoundingPass
from .prune_channels import PruneChannelsPass
from .remove_identity import RemoveIdentityPass
from .reshape_to_flatten import ReshapeToFlattenPass
from .serialize_residual import SerializeResidualPass

_PASSES: tuple[type[Pass], ...] = (
    FoldConstantsPass, RemoveIdentityPass, InferShapesPass, FoldPadIntoConvPass, FoldBatchNormPass,
    ReshapeToFlattenPass, EliminateDeadCodePass, SerializeResidualPass, PruneChannelsPass, ChooseFormatsPass,
    LayerInfluencePass, AssignBitWidthsPass, BiasCorrectionPass, FinetunePass, InsertQDQPass, BinaryDecomposePass,
    OptimizeRoundingPass, EqualizePass,
)


def get_all_passes() -> dict[str, type[Pass]]:
    """Every built-in pass by its ``--passes`` name."""
    return {cls.name: cls for cls in _PASSES}
