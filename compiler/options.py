"""Typed options: what the CLI and the Python API build, and what passes and searches read.

* ``CompileOptions``: the compile-wide choices a user makes with flags (``--max-drop``,
  ``--strategy``, ``--finetune`` ...). The CLI and ``mpqc.compile`` build one, check it
  once (``check``), and the driver puts it on the ``PassContext`` (``ctx.options``);
  a pass option given in ``--passes "name{opt=...}"`` takes precedence over it.
* ``SearchOptions``: the knobs of a bit-width search strategy (``compiler/strategies.py``).
  The assign-bit-widths pass fills one from its own options and ``CompileOptions``;
  ``search_context`` completes the fields it decides (``split``, ``note``).

Every option check lives here, so the CLI, the API and the passes refuse the same
values with the same message.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.errors import OptionError

#: simulation engines of the search (``--sim``; the first is the default)
SIM_ENGINES = ("onnxruntime", "numpy")

STATISTICS = ("mean-square", "mean", "variance", "std")
WEIGHT_DIFF_MODES = ("binary", "halving")
VARIANTS = ("chained", "isolated", "reversed")
RANKS = ("influence", "random", "weight-range")
#: what influences are measured in (``--rank-signal``): the evaluation metric itself (the patent's
#: evaluation value), or a continuous measure against the float network's outputs (KL divergence of
#: the softmax, mean squared error of the outputs) that a single rung always moves; the goal of the
#: search stays on the metric whatever the signal
SIGNALS = ("metric", "kl", "mse")
K_STEPS = ("next", "double")
#: channel selection of prune-channels (``--prune``) and its per-layer ratios (``--ratios``)
PRUNE_METHODS = ("reap", "l1", "l1-norefit", "thinet")
PRUNE_RATIOS = ("pro", "uniform")


def _check_max_drop(max_drop: float | None, where: str) -> None:
    if max_drop is not None and not 0 <= max_drop < 1:
        raise OptionError(f"{where} must be in [0, 1), got {max_drop}")


def check_ranking(signal: str | None, subset: int | None, names: tuple[str, str]) -> None:
    """A known ranking signal, and a ranking subset of at least one sample."""
    if signal is not None and signal not in SIGNALS:
        raise OptionError(f"{names[0]} {signal!r} is unknown; choose one of {', '.join(SIGNALS)}")
    if subset is not None and not (isinstance(subset, int) and subset >= 1):
        raise OptionError(f"{names[1]} is a number of evaluation samples and must be at least 1, got {subset!r}")


def check_prune(flops: float | None, method: str | None, ratios: str | None, names: tuple[str, str, str]) -> None:
    """The pruning options' checks (``names``: how the caller calls them, flag or pass option)."""
    if flops is not None and not 0 < flops <= 1:
        raise OptionError(f"{names[0]} is the fraction of the MACs to keep: it must be in (0, 1], got {flops}")
    if method is not None and method not in PRUNE_METHODS:
        raise OptionError(f"{names[1]} {method!r} is unknown; choose one of {', '.join(PRUNE_METHODS)}")
    if ratios is not None and ratios not in PRUNE_RATIOS:
        raise OptionError(f"{names[2]} {ratios!r} is unknown; choose one of {', '.join(PRUNE_RATIOS)}")


def parse_input_shape(spec: str, where: str = "--input-shape") -> tuple[str | None, tuple[int | None, ...]]:
    """``"NAME:1x3x48x192"`` -> ("NAME", (1, 3, 48, 192)); ``"1x3x48x192"`` (no name: the model's
    first input) -> (None, ...). A dim written ``?`` or as a name (``N``) stays as the model has it
    (None). The name is what precedes the last ``:`` (ONNX names such as ``input:0`` keep theirs)."""
    text = str(spec).strip()
    name, sep, dims = text.rpartition(":")
    if sep and not name:
        raise OptionError(f"{where} {spec!r}: the input name before ':' is empty; give NAME:DIMS, e.g. x:1x3x48x192")
    tokens = [t.strip() for t in dims.lower().split("x")] if dims.strip() else []
    if not tokens or any(not t for t in tokens):
        raise OptionError(f"{where} {spec!r} is not [NAME:]DIMS with dims separated by 'x', e.g. x:1x3x48x192")
    out: list[int | None] = []
    for t in tokens:
        if t.isdigit():
            if not 1 <= int(t) <= 2 ** 31 - 1:
                raise OptionError(f"{where} {spec!r}: dimension {t} must be a positive integer")
            out.append(int(t))
        elif t == "?" or t.replace("_", "a").isalnum():
            out.append(None)  # keep the model's dim (symbolic)
        else:
            raise OptionError(f"{where} {spec!r}: dimension {t!r} is neither a positive integer nor '?'")
    return (name.strip() if sep else None), tuple(out)


def parse_input_shapes(specs, where: str = "--input-shape") -> dict[str | None, tuple[int | None, ...]]:
    """Every ``--input-shape`` spec, by input name (None: the first input); one name given twice is an error."""
    out: dict[str | None, tuple[int | None, ...]] = {}
    for spec in specs:
        name, dims = parse_input_shape(spec, where)
        if name in out:
            raise OptionError(f"{where} gives input {name or '(the first input)'!r} twice")
        out[name] = dims
    return out


#: what a binary decomposition is fitted to (``--fit``; compiler/bdcnn.py ``compile_bdcnn``)
BDCNN_FITS = ("outputs", "outputs-float", "weights")

#: how a level chooses the integer weights (--rounding): the optimize-rounding solver, or none
ROUNDINGS = ("obq", "adaround", "nearest")


def check_rounding(rounding: str | None) -> None:
    """``--rounding``: None (the level's own choice) or one of ``ROUNDINGS``."""
    if rounding is not None and rounding not in ROUNDINGS:
        raise OptionError(f"--rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")


def parse_bases(text: str | int, where: str = "--bases") -> int | dict[str, int]:
    """``"3"`` (every layer) or ``"3,LAYER=2,..."`` / ``"LAYER=2,*=3"`` (per layer, ``*`` or a bare
    number the default) into k or ``{layer: k, "*": default}``; k in 1..8."""
    if isinstance(text, int):
        items = [str(text)]
    else:
        items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise OptionError(f"{where} is empty: give the number of binary bases, e.g. 3")
    out: dict[str, int] = {}
    for it in items:
        name, _, k = it.rpartition("=")
        try:
            kk = int(k)
        except ValueError:
            raise OptionError(f"{where}: {it!r} is not K or LAYER=K (K the number of binary bases)") from None
        if not 1 <= kk <= 8:
            raise OptionError(f"{where}: k={kk} must be in 1..8")
        out[name or "*"] = kk
    return out["*"] if list(out) == ["*"] else out


@dataclass(frozen=True)
class CompileOptions:
    """Compile-wide options (the CLI flag of each is in brackets).

    max_drop [--max-drop]: largest allowed drop of the evaluation value relative to the float
    model; target_score [--target-score]: lowest allowed absolute value (give one of them);
    strategy [--strategy]: the bit-width search strategy; cycles [--cycles]: training cycles of
    the weight-difference statistic; finetune [--finetune/--no-finetune]: add or drop the
    finetune pass (None: the level's own choice); finetune_epochs [--finetune-epochs]; equalize
    [--equalize]: cross-layer equalization before the formats are chosen (-O1 and above; default off);
    rounding [--rounding]: how the levels choose the integer weights (``ROUNDINGS``: "obq", the
    closed-form rounding optimisation; "adaround", learned by gradient descent, slower; "nearest",
    no optimisation; None: the level's own choice, obq);
    flops [--flops]: fraction of the float model's MACs to keep (pruning, -O3); prune
    [--prune]: channel selection (reap, l1, l1-norefit, thinet); ratios [--ratios]: per-layer
    pruning ratios (pro, uniform). Binary decomposition (``--target bdcnn``): bases [--bases] (k,
    or per layer), restarts [--restarts], iterations [--iterations] of the decomposition;
    fit [--fit]: what each decomposition is fitted to (``BDCNN_FITS``: "outputs", the default, the
    layer's outputs on the calibration data with the decomposed network's inputs; "outputs-float",
    the same from the float network's inputs; "weights", the weights alone, as the paper does);
    planes [--planes]: one activation bit-plane count Q for every layer instead of the search.
    strict [--strict]: an accuracy goal that cannot be met is an error (nothing written); without
    it the best network found is written and the report's ``goal_missed`` says by how much.
    time_budget [--time-budget]: seconds from the start of the compile after which the bit-width
    search stops and keeps the best network accepted so far (None: no limit).
    sim [--sim]: the engine that simulates candidate networks in the search: "onnxruntime"
    (default: the fake-quantized network as an ONNX model, ``compiler/ortsim.py``) or "numpy"
    (mpqc's own runtime); both compute the same integer network up to float32 summation order.
    rank_signal [--rank-signal]: what layer influences are measured in (``SIGNALS``: metric, kl,
    mse); ranking_subset [--ranking-subset]: measure influences on this many evaluation samples
    (evenly spaced over the split) while every candidate network is still judged on all of it
    (None: all). input_shape [--input-shape, repeatable]: ``"NAME:1x3x48x192"`` specs that fix
    the symbolic dims of model inputs at import (docs/DYNAMIC_SHAPES.md; the API also takes
    ``{"NAME": (1, 3, 48, 192)}``); without one, symbolic non-batch dims of the first input are
    taken from the calibration data's shape."""

    max_drop: float | None = None
    target_score: float | None = None
    strategy: str | None = None
    cycles: int | None = None
    finetune: bool | None = None
    equalize: bool | None = None
    rounding: str | None = None
    finetune_epochs: float | None = None
    flops: float | None = None
    prune: str | None = None
    ratios: str | None = None
    bases: str | None = None
    restarts: int | None = None
    iterations: int | None = None
    fit: str = "outputs"
    planes: int | None = None
    strict: bool = False
    time_budget: float | None = None
    sim: str = "onnxruntime"
    rank_signal: str = "metric"
    ranking_subset: int | None = None
    input_shape: tuple[str, ...] = ()

    def check(self) -> "CompileOptions":
        """Refuse impossible values (one ``OptionError`` naming the flag); returns self."""
        _check_max_drop(self.max_drop, "--max-drop")
        if self.max_drop is not None and self.target_score is not None:
            raise OptionError("give either --max-drop or --target-score, not both")
        if self.cycles is not None and self.cycles < 1:
            raise OptionError(f"--cycles must be at least 1, got {self.cycles}")
        if self.finetune_epochs is not None and not self.finetune_epochs >= 0:
            raise OptionError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")
        check_prune(self.flops, self.prune, self.ratios, ("--flops", "--prune", "--ratios"))
        if self.bases is not None:
            parse_bases(self.bases)
        if self.restarts is not None and self.restarts < 1:
            raise OptionError(f"--restarts must be at least 1, got {self.restarts}")
        if self.iterations is not None and self.iterations < 0:
            raise OptionError(f"--iterations must be >= 0, got {self.iterations}")
        if self.planes is not None and not 2 <= self.planes <= 8:
            raise OptionError(f"--planes (activation bit-planes Q) must be in 2..8, got {self.planes}")
        check_rounding(self.rounding)
        if self.fit not in BDCNN_FITS:
            raise OptionError(f"--fit must be one of {', '.join(BDCNN_FITS)}, got {self.fit!r}")
        if self.time_budget is not None and not (self.time_budget > 0 and self.time_budget < float("inf")):
            raise OptionError(f"--time-budget is in seconds and must be a positive number, got {self.time_budget}")
        if self.sim not in SIM_ENGINES:
            raise OptionError(f"--sim must be one of {', '.join(SIM_ENGINES)}, got {self.sim!r}")
        check_ranking(self.rank_signal, self.ranking_subset, ("--rank-signal", "--ranking-subset"))
        if isinstance(self.input_shape, str) or not all(isinstance(s, str) for s in self.input_shape):
            raise OptionError(f"input_shape is a list of 'NAME:DIMS' strings, got {self.input_shape!r}")
        parse_input_shapes(self.input_shape)
        return self

    @property
    def input_shapes(self) -> dict[str | None, tuple[int | None, ...]]:
        """``input_shape`` parsed: input name (None: the first input) -> dims (None: keep the model's)."""
        return parse_input_shapes(self.input_shape)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "CompileOptions":
        """From ``{"max_drop": 0.01, ...}`` (the API's ``options=``); an unknown key is an error."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise OptionError(f"unknown compile option {bad[0]!r}; the options are: {', '.join(sorted(known))}")
        shp = d.get("input_shape")
        if isinstance(shp, dict):  # {"x": (1, 3, 48, 192)} -> ("x:1x3x48x192",)
            d["input_shape"] = tuple(f"{k}:{'x'.join('?' if v is None else str(v) for v in dims)}"
                                     if not isinstance(dims, str) else f"{k}:{dims}" for k, dims in shp.items())
        elif isinstance(shp, str):
            d["input_shape"] = (shp,)
        elif isinstance(shp, list):
            d["input_shape"] = tuple(shp)
        return cls(**d).check()

    @classmethod
    def coerce(cls, o: "CompileOptions | dict | None") -> "CompileOptions":
        return o.check() if isinstance(o, CompileOptions) else cls.from_dict(o)


@dataclass
class SearchOptions:
    """Options of the bit-width search strategies.

    Influence strategies: variant (how influences are measured), rank (influence, or random /
    weight-range orderings for ablations), k_step and k_init (threshold), repeat (go on with the
    next rung once every layer is reduced). Weight-difference strategies: train (labelled data),
    weight_diff (a precomputed ``WeightDiffResult``), cycles, statistic, train_lr,
    train_batch_size, train_momentum, quantized (train with fake quantization), max_loss,
    floor, mode (binary | halving), count, keep_smallest. Set by ``search_context``: split (the
    data the search scores: eval | calib), bias_correction, note. Ranking: signal (what influences
    are measured in: ``SIGNALS``) and ranking_subset (how many evaluation samples they are measured
    on; None: all); early_stop (stop a candidate's evaluation once it can only fall below the goal:
    ``SearchContext.judge``)."""

    strategy: str = "auto"
    variant: str = "chained"
    rank: str = "influence"
    signal: str = "metric"
    ranking_subset: int | None = None
    early_stop: bool = True
    k_step: str = "next"
    k_init: float | None = None
    repeat: bool = False
    split: str | None = None
    bias_correction: bool = False
    note: str | None = None
    # weight-difference strategies
    train: Any = None  # compiler.data.Dataset with labels
    weight_diff: Any = None  # compiler.weight_diff.WeightDiffResult, precomputed
    cycles: int | None = None
    statistic: str = "mean-square"
    train_lr: float = 0.01
    train_batch_size: int = 32
    train_momentum: float = 0.9
    quantized: bool = False
    max_loss: float | None = None
    floor: int = 0
    mode: str = "binary"
    count: int | None = None
    keep_smallest: bool = False

    def check(self) -> "SearchOptions":
        for name, value, choices in (("variant", self.variant, VARIANTS), ("rank", self.rank, RANKS),
                                     ("k_step", self.k_step, K_STEPS), ("statistic", self.statistic, STATISTICS),
                                     ("mode", self.mode, WEIGHT_DIFF_MODES)):
            if value not in choices:
                raise OptionError(f"{name}={value!r} is unknown; choose one of {', '.join(choices)}")
        if self.cycles is not None and self.cycles < 1:
            raise OptionError(f"cycles={self.cycles} must be at least 1")
        if self.floor < 0:
            raise OptionError(f"floor={self.floor} must be >= 0")
        if self.count is not None and self.count < 0:
            raise OptionError(f"count={self.count} must be >= 0")
        if self.train_lr <= 0 or self.train_batch_size < 1:
            raise OptionError("train_lr must be > 0 and train_batch_size at least 1")
        check_ranking(self.signal, self.ranking_subset, ("signal", "ranking_subset"))
        return self

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("train", "weight_diff")}
