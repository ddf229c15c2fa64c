"""Pass manager: passes, analyses, registry, pipeline parsing.

Style follows onnx_ir / xDSL / LLVM's new pass manager:

* A pass is a frozen dataclass subclassing ``Pass`` with a kebab-case ``name``,
  its options as fields, ``run(graph, ctx) -> PassResult`` and a ``preserves`` set
  of analysis classes (default: none), and a ``requires`` tuple of prerequisites
  (``REQUIREMENTS``) that the manager checks before it runs the pass. The
  built-in passes are listed in ``passes/registry.py``; ``compiler/pipelines.py``
  parses pass lists against that registry.
* An analysis subclasses ``Analysis`` and implements ``compute(graph, ctx)``;
  ``ctx.analyses.get(ActivationRanges, graph)`` computes it lazily and caches it.
  After a pass that reports ``modified=True`` the manager drops every cached
  analysis the pass does not list in ``preserves``.
* ``build_pass(cls, {"opt": "1"})`` builds a pass instance, converting option strings
  to the fields' types (``compiler.pipelines.parse_pipeline`` uses it).
* ``PassManager`` runs a list with ``print_after``, ``time_passes`` and
  ``verify_each``; any failure inside a pass surfaces as a ``CompilerError`` whose
  message starts with the pass name.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from ..core.errors import CompilerError, OptionError, PassError
from ..core.ir import Graph
from .cache import ResultCache, graph_digest
from .data import Dataset
from .options import CompileOptions
from .targets import Target

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass returns: ``modified`` (the graph changed: the manager drops the cached analyses
    the pass does not preserve) and ``info`` (free-form counts for tests and logs)."""
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


class Analysis:
    """Base class of analyses: recomputable facts about a graph, keyed by identity.

    An analysis worth keeping across compiles sets ``persist`` (its kind in the result cache,
    ``compiler/cache.py``), lists the data splits it reads in ``reads`` and implements
    ``encode(result) -> (meta, arrays)`` and ``decode(meta, arrays, graph) -> result``; the
    manager then looks it up in ``ctx.store`` by the graph's digest, the splits' data, the batch
    size and its parameters before computing it."""

    name: ClassVar[str] = "analysis"
    persist: ClassVar[str | None] = None
    #: a persistent result of the float network: its key leaves the quantization decisions out
    float_only: ClassVar[bool] = False

    def reads(self) -> tuple[str, ...]:
        """The data splits the result depends on (persistent analyses)."""
        return ()

    def encode(self, result: Any) -> tuple[dict, dict[str, np.ndarray]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, meta: dict, arrays: dict[str, np.ndarray], graph: Graph) -> Any:  # pragma: no cover
        raise NotImplementedError

    def __init__(self, **params):
        self.params = params

    def compute(self, graph: Graph, ctx: "PassContext") -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class AnalysisManager:
    """Caches analysis results per (graph, analysis class, parameters)."""

    def __init__(self, ctx: "PassContext"):
        self.ctx = ctx
        self._cache: dict[tuple, Any] = {}
        self.computed: list[str] = []  # names, in order, for tests and --time-passes

    @staticmethod
    def _key(cls, graph, params) -> tuple:
        # the graph itself (hashed by identity), not id(graph): a freed graph's id can be reused
        return (cls, graph, tuple(sorted((k, _freeze(v)) for k, v in params.items())))

    def get(self, cls: type[Analysis], graph: Graph, **params) -> Any:
        key = self._key(cls, graph, params)
        if key not in self._cache:
            t0 = time.perf_counter()
            ana = cls(**params)
            store = self.ctx.store
            if cls.persist is not None and store is not None:
                splits = [s for s in ana.reads() if getattr(self.ctx, s, None) is not None]
                pkey = {"graph": graph_digest(graph, decisions=not cls.float_only), "params": ana.params,
                        "batch": self.ctx.batch_size,
                        "data": {s: store.data_digest(getattr(self.ctx, s)) for s in splits}}
                self._cache[key] = store.memo(cls.persist, pkey, lambda: ana.compute(graph, self.ctx),
                                              ana.encode, lambda m, a: ana.decode(m, a, graph))
            else:
                self._cache[key] = ana.compute(graph, self.ctx)
            self.computed.append(cls.name)
            log.debug("analysis %s computed in %.3fs", cls.name, time.perf_counter() - t0)
        return self._cache[key]

    def cached(self, cls: type[Analysis], graph: Graph, **params) -> bool:
        return self._key(cls, graph, params) in self._cache

    def put(self, cls: type[Analysis], graph: Graph, result: Any, **params) -> None:
        self._cache[self._key(cls, graph, params)] = result

    def invalidate(self, preserved: frozenset | set = frozenset()) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k[0] in preserved}

    def clear(self) -> None:
        self._cache.clear()


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, np.ndarray):
        return (v.shape, v.tobytes())
    return v


@dataclass
class PassContext:
    """Everything passes share: the target, the data splits, the metric, the typed compile
    options (``options``, built by the CLI or the API), the analysis cache and the report."""

    target: Target | None = None
    calib: Dataset | None = None
    eval: Dataset | None = None
    train: Dataset | None = None
    metric: str | None = None
    options: CompileOptions = field(default_factory=CompileOptions)
    seed: int = 0
    quiet: bool = True
    batch_size: int = 64
    report: dict[str, Any] = field(default_factory=dict)
    float_graph: Graph | None = None  # the canonical float network NN_T, set by the driver
    #: the result cache (``compiler.cache.ResultCache``; None: every result is computed)
    store: ResultCache | None = None
    #: ``time.monotonic()`` after which the bit-width search stops and keeps its best network
    #: (``--time-budget``); None: no limit
    deadline: float | None = None
    #: worker processes for batched runs that give identical results in parallel (``--jobs``)
    jobs: int = 1
    analyses: AnalysisManager = field(init=False)

    def __post_init__(self):
        self.analyses = AnalysisManager(self)

    def section(self, name: str) -> dict:
        """The report section of one pass (created on first use)."""
        return self.report.setdefault("passes", {}).setdefault(name, {})


# ---------------------------------------------------------------------------- prerequisites
def _has_formats(graph: Graph, ctx: "PassContext") -> bool:
    return any(n.qconfig is not None for n in graph.layers()) or \
        any(v.qformat is not None for v in graph.values() if not v.is_const)


def _canonical(graph: Graph, ctx: "PassContext") -> bool:
    return not any(n.op_type == "BatchNormalization" for n in graph.nodes)


#: named prerequisites a pass can list in ``requires``: (check, what the user must provide)
REQUIREMENTS: dict[str, tuple[Callable[[Graph, "PassContext"], bool], str]] = {
    "target": (lambda g, ctx: ctx.target is not None, "a --target (see 'mpqc targets')"),
    "calib": (lambda g, ctx: ctx.calib is not None, "calibration data: give --calib FILE.npz[:calib]"),
    "train": (lambda g, ctx: ctx.train is not None,
              "labelled training data: give --train FILE.npz[:train]"),
    "data": (lambda g, ctx: ctx.eval is not None or ctx.calib is not None,
             "evaluation or calibration data: give --eval FILE.npz[:eval] or --calib FILE.npz[:calib]"),
    "formats": (_has_formats, "quantization formats on the IR: run choose-formats first"),
    "folded-batchnorm": (_canonical, "BatchNormalization folded into the layers: run fold-batchnorm first"),
    "float": (lambda g, ctx: not _has_formats(g, ctx),
              "a float network: run it before choose-formats (it changes the weights the formats are chosen for)"),
}


def check_requires(p: "Pass", graph: Graph, ctx: "PassContext") -> None:
    """Raise a ``PassError`` naming the first prerequisite of ``p`` that ``graph``/``ctx`` lack."""
    for req in p.requires:
        check, what = REQUIREMENTS[req]
        if not check(graph, ctx):
            raise PassError(f"[{p.name}] needs {what}")


# ---------------------------------------------------------------------------- passes
@dataclass(frozen=True)
class Pass:
    """Base class of passes: subclasses are frozen dataclasses whose fields are the options.

    ``name``: the kebab-case name of ``--passes``; ``preserves``: the analysis classes still valid
    after the pass modified the graph; ``requires``: names of ``REQUIREMENTS`` the manager checks
    before running it. ``run(graph, ctx)`` returns a ``PassResult``."""

    name: ClassVar[str] = "pass"
    preserves: ClassVar[frozenset] = frozenset()
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """Textual form accepted by ``parse_pipeline`` (non-default options only)."""
        opts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if v != default:
                if isinstance(v, (list, tuple)):
                    v = ":".join(str(x) for x in v)
                opts.append(f"{f.name}={v}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def _convert(value: str, tp, pass_name: str, opt: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value.lower() in ("none", "") and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, pass_name, opt)
            except OptionError as e:
                errs.append(e)
        raise errs[0]
    if origin in (tuple, list):
        parts = [p for p in re.split(r"[:;]", value) if p != ""]
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(parts) != len(args):  # fixed-length tuple such as tuple[int, float]
                raise OptionError(f"pass {pass_name!r}: option {opt}={value!r} needs {len(args)} values "
                                  "separated by ':'")
            return tuple(_convert(p, a, pass_name, opt) for p, a in zip(parts, args))
        inner = args[0] if args else str
        return tuple(_convert(p, inner, pass_name, opt) for p in parts)
    if origin is typing.Literal:
        for a in args:  # Literal["a", "b"] or Literal[2, 4, 8]: match the text of each choice
            if str(a) == value:
                return a
        raise OptionError(f"pass {pass_name!r}: option {opt}={value!r} must be one of {', '.join(map(str, args))}")
    try:
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float, str):
            return tp(value)
    except ValueError:
        raise OptionError(f"pass {pass_name!r}: option {opt}={value!r} is not a valid {tp.__name__}") from None
    return value


def build_pass(cls: type[Pass], options: dict | None = None) -> Pass:
    """Instantiate pass class ``cls`` with ``options`` (strings are converted to the fields' types)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in (options or {}).items():
        if k not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise OptionError(f"pass {cls.name!r} has no option {k!r}; its options: {known}")
        kwargs[k] = _convert(v, hints.get(k, str), cls.name, k) if isinstance(v, str) else v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise OptionError(f"pass {cls.name!r}: {e}") from None


# ---------------------------------------------------------------------------- manager
@dataclass
class PassTiming:
    name: str
    seconds: float
    modified: bool


class PassManager:
    """Runs passes in order: checks each pass's ``requires``, runs it, invalidates the analyses a
    modifying pass does not preserve; optional instrumentation (``verify_each``, ``print_after``,
    ``time_passes``). Any failure inside a pass surfaces as a ``CompilerError`` that starts with
    ``[pass-name]``."""

    def __init__(self, passes: list[Pass], *, verify_each: bool = False,
                 print_after: set[str] | None = None, time_passes: bool = False,
                 printer: Callable[[str], None] | None = None):
        self.passes = list(passes)
        self.verify_each = verify_each
        self.print_after = set(print_after or ())
        self.time_passes = time_passes
        self.printer = printer or (lambda s: print(s))
        self.timings: list[PassTiming] = []

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        any_mod = False
        known = {p.name for p in self.passes}
        for name in self.print_after:
            if name not in known and name != "all":
                raise OptionError(f"--print-after {name!r} names no pass in this pipeline "
                                  f"({', '.join(p.name for p in self.passes)})")
        for p in self.passes:
            t0 = time.perf_counter()
            check_requires(p, graph, ctx)
            try:
                res = p.run(graph, ctx)
            except CompilerError as e:
                if e.message.startswith(f"[{p.name}]"):
                    raise
                err = type(e)(f"[{p.name}] {e.message}", hint=e.hint)
                raise err from e
            except Exception as e:
                raise PassError(f"[{p.name}] internal error: {type(e).__name__}: {e}",
                                hint="this is an mpqc bug; rerun with --verify-each and report it") from e
            dt = time.perf_counter() - t0
            if not isinstance(res, PassResult):
                raise PassError(f"[{p.name}] returned {type(res).__name__}, expected PassResult")
            self.timings.append(PassTiming(p.name, dt, res.modified))
            log.info("pass %s: modified=%s (%.3fs)", p.name, res.modified, dt)
            if res.modified:
                ctx.analyses.invalidate(p.preserves)
                any_mod = True
            if self.verify_each:
                try:
                    graph.verify()
                except CompilerError as e:
                    raise PassError(f"[{p.name}] left an invalid graph: {e.message}") from e
            if p.name in self.print_after or "all" in self.print_after:
                self.printer(f"// ----- IR after {p.spec()} -----\n{graph.summary()}")
        if self.time_passes:
            total = sum(t.seconds for t in self.timings) or 1e-12
            lines = ["pass                          seconds      %   modified"]
            for t in self.timings:
                lines.append(f"{t.name:<28} {t.seconds:9.3f} {100 * t.seconds / total:6.1f}   {t.modified}")
            lines.append(f"{'total':<28} {total:9.3f}")
            self.printer("\n".join(lines))
        return any_mod
