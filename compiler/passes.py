"""Pass manager: passes, analyses, registry, pipeline parsing.

Style follows onnx_ir / xDSL / LLVM's new pass manager:

* A pass is a frozen dataclass subclassing ``Pass`` with a kebab-case ``name``,
  its options as fields, ``run(graph, ctx) -> PassResult`` and a ``preserves`` set
  of analysis classes (default: none). Register it with ``@register_pass``.
* An analysis subclasses ``Analysis`` and implements ``compute(graph, ctx)``;
  ``ctx.analyses.get(ActivationRanges, graph)`` computes it lazily and caches it.
  After a pass that reports ``modified=True`` the manager drops every cached
  analysis the pass does not list in ``preserves``.
* ``parse_pipeline("fold-batchnorm,assign-bit-widths{strategy=min-influence,target=0.99}")``
  builds pass instances, converting option strings to the fields' types.
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

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


class Analysis:
    """Base class of analyses: recomputable facts about a graph, keyed by identity."""

    name: ClassVar[str] = "analysis"

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
            self._cache[key] = cls(**params).compute(graph, self.ctx)
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
    """Everything passes share: target, data, metric, analyses, report, options."""

    target: Any = None  # compiler.targets.Target
    calib: Any = None  # compiler.data.Dataset
    eval: Any = None  # compiler.data.Dataset
    train: Any = None  # compiler.data.Dataset
    metric: str | None = None
    seed: int = 0
    quiet: bool = True
    batch_size: int = 64
    report: dict[str, Any] = field(default_factory=dict)
    float_graph: Graph | None = None  # the canonical float network NN_T, set by the driver
    analyses: AnalysisManager = field(init=False)

    def __post_init__(self):
        self.analyses = AnalysisManager(self)

    def section(self, name: str) -> dict:
        """The report section of one pass (created on first use)."""
        return self.report.setdefault("passes", {}).setdefault(name, {})


# ---------------------------------------------------------------------------- passes
@dataclass(frozen=True)
class Pass:
    """Base class: subclasses are frozen dataclasses whose fields are the options."""

    name: ClassVar[str] = "pass"
    preserves: ClassVar[frozenset] = frozenset()

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


PASS_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name):
        raise ValueError(f"pass name {cls.name!r} is not kebab-case")
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} registered twice")
    PASS_REGISTRY[cls.name] = cls
    return cls


def _ensure_passes_loaded() -> None:
    from .. import passes  # noqa: F401  (imports every pass module)


def get_pass_class(name: str) -> type[Pass]:
    _ensure_passes_loaded()
    cls = PASS_REGISTRY.get(name)
    if cls is None:
        known = ", ".join(sorted(PASS_REGISTRY))
        raise OptionError(f"unknown pass {name!r}; known passes: {known}")
    return cls


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


def make_pass(name: str, options: dict[str, str] | None = None) -> Pass:
    """Instantiate a registered pass from string options."""
    cls = get_pass_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in (options or {}).items():
        if k not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise OptionError(f"pass {name!r} has no option {k!r}; its options: {known}")
        kwargs[k] = _convert(v, hints.get(k, str), name, k) if isinstance(v, str) else v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise OptionError(f"pass {name!r}: {e}") from None


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


# ---------------------------------------------------------------------------- manager
@dataclass
class PassTiming:
    name: str
    seconds: float
    modified: bool


class PassManager:
    """Runs passes in order, invalidating analyses, with optional instrumentation."""

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
