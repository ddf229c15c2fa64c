"""Pipelines per ``-O`` level and target, as explicit pass lists (no level checks inside passes).

* ``-O0`` canonicalize: fold constants and shapes, drop Identity/Dropout, fold
  "same" Pads into Convs, fold BatchNorm, Reshape -> Flatten, dead code, shapes.
* ``-O1`` canonicalize + fixed-point formats at the target's default widths + rounding
  optimisation (optimize-rounding: the integer weights fitted layer by layer to the float
  network's outputs) + QDQ.
* ``-O2`` canonicalize, profile (choose-formats at the top of the target's ladder), rounding
  optimisation of that starting network if it misses the goal without it, layer influence, the
  influence-driven bit-width search (assign-bit-widths), rounding optimisation at the chosen
  widths (kept if the evaluation value does not fall), bias correction (the expected
  weight-quantization error folded into the biases), QDQ.
* ``-O3`` canonicalize, serialize the residual blocks that can be (serialize-residual),
  prune channels to the MACs budget (prune-channels: ``--flops``, ``--prune``,
  ``--ratios``), then the ``-O2`` mixed-precision search under the accuracy goal, QDQ.

``finetune`` (``--finetune`` / ``--no-finetune``): ``True`` adds the finetune pass; it
is the last step before QDQ insertion (after bias correction), so it trains the network
exactly as it is exported (at ``-O3``: pruned and quantized). ``None`` (default) and
``False``: no fine-tuning. ``equalize`` (``--equalize``) puts the equalize pass before
choose-formats. ``rounding`` (``--rounding``, ``options.ROUNDINGS``): ``"obq"`` (default) keeps the
optimize-rounding passes as above, ``"adaround"`` runs them with ``solver=adaround``, ``"nearest"``
drops them.

Pass names resolve against the explicit registry of built-in passes
(``passes/registry.py``, ``get_all_passes()``), the passes installed packages declare in
the entry-point group ``mpqc.passes`` (``plugin_passes()``; docs/TESTING_PASSES.md), and
the passes a user registers with ``register_pass`` (for a pass of their own in
``--passes`` or ``parse_pipeline``).
"""
from __future__ import annotations

import re
from importlib import metadata

from ..core.errors import OptionError
from ..passes.registry import get_all_passes
from .options import check_rounding
from .passes import Pass, build_pass
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


def pipeline_spec(level: int, target: Target | None, *, finetune: bool | None = None,
                  equalize: bool | None = None, rounding: str | None = None) -> list[str]:
    """The pass specs of a level, before parsing."""
    if level not in LEVELS:
        raise OptionError(f"-O{level} is not a level; use -O0, -O1, -O2 or -O3")
    spec = list(CANONICALIZE)
    if level == 0:
        for flag, on in (("finetune", finetune), ("equalize", equalize), ("rounding", rounding)):
            if on:
                raise OptionError(f"--{flag} needs a quantizing level (-O1 and above); -O0 only canonicalizes")
        return spec
    check_rounding(rounding)
    if target is None:
        raise OptionError(f"-O{level} needs a --target (see 'mpqc targets')")
    if level >= 3:
        spec.extend(["serialize-residual", "prune-channels", "eliminate-dead-code", "infer-shapes"])
    if equalize:
        # per-channel scales moved between layers so every filter fills its power-of-two grid. Off by
        # default: on EfficientNet-Lite0 it cuts the round-to-nearest error 2.7x, but after optimize-rounding
        # it no longer helps (-O1 logit MSE 0.0058 -> 0.0064, -O2 --max-drop 0.05 test 0.931 -> 0.894;
        # docs/EQUALIZATION.md). Float-scale targets get Nagel's range rule.
        spec.append("equalize" if target.scale == "pow2" else "equalize{mode=range}")
    spec.append("choose-formats" if level == 1 else "choose-formats{start=ladder}")
    # the integer weights fitted layer by layer to the float network's outputs. At -O2 the search's starting
    # network gets them only when it misses the goal without them (EfficientNet-Lite0); otherwise the search
    # reduces the plainly rounded weights and the fit comes once the widths are fixed, undone if the
    # evaluation value fell (with the starting network fitted, digits_resnet's search stopped at 51% of
    # int8 bytes instead of 39%; fitted after the search: 39% and test 0.995 instead of 0.990)
    spec.append("optimize-rounding" if level == 1 else "optimize-rounding{when=start-misses-goal}")
    if level >= 2:
        # the search scores every network with the bias correction applied just before insert-qdq; only
        # the chained influence, the one the search ranks by, is measured (each other variant is one more
        # sweep, for the report alone: on EfficientNet-Lite0 the two cost more than the whole search)
        spec.extend(["layer-influence{variants=chained,bias_correction=true}",
                     "assign-bit-widths{bias_correction=true,report_variants=false}"])
    if level >= 2:
        spec.extend(["optimize-rounding{guard=true}", "bias-correction"])
    if rounding is not None and rounding != "obq":  # docs/ROUNDING.md
        rounds = [p for p in spec if p.split("{")[0] == "optimize-rounding"]
        spec = [p for p in spec if p not in rounds] if rounding == "nearest" else \
            [with_option(p, "solver=adaround") if p in rounds else p for p in spec]
    if finetune:
        # last before QDQ: fine-tuning trains the network exactly as it is exported; a bias correction
        # after it would move the biases it learned (digits_vgg, 3-bit per-tensor weights: test 0.9975 -> 0.9675)
        spec.append("finetune")
    spec.append("insert-qdq")
    return spec


def with_option(spec: str, option: str) -> str:
    """``"name{a=1}"`` with ``option`` added first: ``"name{option,a=1}"`` (``"name"``: ``"name{option}"``)."""
    name, brace, rest = spec.partition("{")
    return f"{name}{{{option},{rest}" if brace else f"{name}{{{option}}}"


def build_pipeline(level: int, target: Target | None = None, *, finetune: bool | None = None,
                   equalize: bool | None = None, rounding: str | None = None) -> list[Pass]:
    """The pass instances of ``-O{level}`` for ``target`` (see the module docstring); ``finetune``
    adds (True) or drops (False) the finetune pass, ``equalize`` the equalize pass."""
    spec = pipeline_spec(level, target, finetune=finetune, equalize=equalize, rounding=rounding)
    registry = pass_registry()
    missing = [s for s in spec if s.split("{")[0] not in registry]
    if missing:
        raise OptionError(f"-O{level} needs passes that this build of mpqc does not have yet: "
                          f"{', '.join(dict.fromkeys(missing))}; use a lower -O level")
    return parse_pipeline(",".join(spec))


# ---------------------------------------------------------------------------- registry and parsing
_USER_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Make a pass class of your own available by name to ``--passes`` / ``parse_pipeline``
    (usable as a decorator). Built-in passes are listed in ``passes/registry.py`` instead."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name):
        raise ValueError(f"pass name {cls.name!r} is not kebab-case")
    taken = pass_registry().get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"pass {cls.name!r} registered twice")
    _USER_PASSES[cls.name] = cls
    return cls


def pass_registry() -> dict[str, type[Pass]]:
    """Every pass by name: the built-in ones, the plugins' (entry points ``mpqc.passes``), then
    those given to ``register_pass``."""
    return {**get_all_passes(), **plugin_passes(), **_USER_PASSES}


#: the entry-point group third-party packages declare their passes in: ``name = "module:PassClass"``
ENTRY_POINT_GROUP = "mpqc.passes"
_PLUGINS: dict[str, type[Pass]] | None = None


def plugin_passes() -> dict[str, type[Pass]]:
    """Passes of installed packages, from the entry-point group ``mpqc.passes`` (loaded once).

    Each entry point is named after its pass and names a ``Pass`` subclass, e.g. in the plugin's
    pyproject.toml ``[project.entry-points."mpqc.passes"]`` ``my-pass = "my_pkg.passes:MyPass"``.
    A plugin that cannot be loaded, or is not such a class, is an ``OptionError`` naming it."""
    global _PLUGINS
    if _PLUGINS is not None:
        return _PLUGINS
    builtin = get_all_passes()
    found: dict[str, type[Pass]] = {}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed package"
        where = f"plugin pass {ep.name!r} ({ep.value}, from {dist})"
        try:
            cls = ep.load()
        except Exception as e:  # any failure inside third-party code: one clear line
            raise OptionError(f"{where} cannot be loaded: {type(e).__name__}: {e}",
                              hint=f"fix or uninstall {dist}") from None
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise OptionError(f"{where} is not a Pass subclass but {cls!r}", hint=f"fix or uninstall {dist}")
        if cls.name != ep.name:
            raise OptionError(f"{where} names class {cls.__name__} whose name is {cls.name!r}; "
                              "the entry point must be named after the pass", hint=f"fix or uninstall {dist}")
        if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name):
            raise OptionError(f"{where}: pass name {cls.name!r} is not kebab-case", hint=f"fix or uninstall {dist}")
        if ep.name in builtin or ep.name in found:
            raise OptionError(f"{where} clashes with another pass of that name", hint=f"rename it in {dist}")
        found[ep.name] = cls
    _PLUGINS = found
    return found


def reload_plugins() -> dict[str, type[Pass]]:
    """Forget the cached plugin passes and look the entry points up again (after installing one)."""
    global _PLUGINS
    _PLUGINS = None
    return plugin_passes()


def get_pass_class(name: str) -> type[Pass]:
    registry = pass_registry()
    cls = registry.get(name)
    if cls is None:
        raise OptionError(f"unknown pass {name!r}; known passes: {', '.join(sorted(registry))}")
    return cls


def make_pass(name: str, options: dict[str, str] | None = None) -> Pass:
    """Instantiate a registered pass from string options."""
    return build_pass(get_pass_class(name), options)


_PIPE_RE = re.compile(r"\s*([a-z0-9-]+)\s*(\{([^{}]*)\})?\s*(,|$)")


def parse_pipeline(text: str) -> list[Pass]:
    """Parse ``"a,b{opt=1,other=x}"`` into pass instances."""
    passes: list[Pass] = []
    pos = 0
    text = text.strip()
    if not text:
        raise OptionError("--passes is empty; give a comma-separated list such as 'fold-constants,fold-batchnorm'")
    while pos < len(text):
        m = _PIPE_RE.match(text, pos)
        if not m or m.end() == pos:
            raise OptionError(f"cannot parse pass list near {text[pos:pos + 30]!r}; "
                              "expected name or name{key=value,...}")
        opts: dict[str, str] = {}
        if m.group(3):
            for item in m.group(3).split(","):
                item = item.strip()
                if not item:
                    continue
                if "=" not in item:
                    raise OptionError(f"pass {m.group(1)!r}: option {item!r} must be key=value")
                k, v = item.split("=", 1)
                opts[k.strip()] = v.strip()
        passes.append(make_pass(m.group(1), opts))
        pos = m.end()
    return passes


