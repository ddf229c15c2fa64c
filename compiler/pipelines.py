"""Pipelines per ``-O`` level and target, as explicit pass lists (no level checks inside passes).

* ``-O0`` canonicalize: fold constants and shapes, drop Identity/Dropout, fold
  "same" Pads into Convs, fold BatchNorm, Reshape -> Flatten, dead code, shapes.
* ``-O1`` canonicalize + fixed-point formats at the target's default widths + QDQ.
* ``-O2`` canonicalize, profile (choose-formats at the top of the target's ladder),
  layer influence, the influence-driven bit-width search (assign-bit-widths), bias
  correction (the expected weight-quantization error folded into the biases), QDQ.
* ``-O3`` ``-O2`` with pruning and fine-tuning (when those passes are present).

``finetune`` (``--finetune`` / ``--no-finetune``): ``True`` adds the finetune pass
at ``-O1``/``-O2``; ``False`` drops it from ``-O3``; ``None`` (default) keeps each
level's own choice. Fine-tuning is the last step before QDQ insertion (after pruning
and bias correction), so it trains the network exactly as it is exported.
"""
from __future__ import annotations

from ..core.errors import OptionError
from .passes import PASS_REGISTRY, Pass, _ensure_passes_loaded, parse_pipeline
from .targets import Target

CANONICALIZE = [
    "fold-constants",
    "remove-identity",
    "infer-shapes",
    "fold-constants",
    "fold-pad-into-conv",
    "fold-batchnorm",
    "reshape-to-flatten",
    "eliminate-dead-code",
    "infer-shapes",
]

LEVELS = (0, 1, 2, 3)


def pipeline_spec(level: int, target: Target | None, *, finetune: bool | None = None) -> list[str]:
    """The pass specs of a level, before parsing."""
    if level not in LEVELS:
        raise OptionError(f"-O{level} is not a level; use -O0, -O1, -O2 or -O3")
    spec = list(CANONICALIZE)
    if level == 0:
        if finetune:
            raise OptionError("--finetune needs a quantizing level (-O1 and above); -O0 only canonicalizes")
        return spec
    if target is None:
        raise OptionError(f"-O{level} needs a --target (see 'mpqc targets')")
    spec.append("choose-formats" if level == 1 else "choose-formats{start=ladder}")
    if level >= 2:
        # the search scores every network with the bias correction applied just before insert-qdq
        spec.extend(["layer-influence{bias_correction=true}", "assign-bit-widths{bias_correction=true}"])
    if level >= 3:
        spec.append("prune-channels")
    if level >= 2:
        spec.append("bias-correction")
    if (level >= 3 and finetune is not False) or (level < 3 and finetune):
        # last before QDQ: fine-tuning trains the network exactly as it is exported; a bias correction
        # after it would move the biases it learned (digits_vgg, 3-bit per-tensor weights: test 0.9975 -> 0.9675)
        spec.append("finetune")
    spec.append("insert-qdq")
    return spec


def build_pipeline(level: int, target: Target | None = None, *, finetune: bool | None = None) -> list[Pass]:
    _ensure_passes_loaded()
    spec = pipeline_spec(level, target, finetune=finetune)
    missing = [s for s in spec if s.split("{")[0] not in PASS_REGISTRY]
    if missing:
        raise OptionError(f"-O{level} needs passes that this build of mpqc does not have yet: "
                          f"{', '.join(dict.fromkeys(missing))}; use a lower -O level")
    return parse_pipeline(",".join(spec))
