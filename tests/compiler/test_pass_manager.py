"""Pass manager: registry, option parsing, analysis caching, pipelines, instrumentation, error wrapping.

The toy passes and analyses below are registered under ``test-pm-*`` names, which no
real pass uses.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import pytest

from mpqc.core.errors import CompilerError, DataError, OptionError, PassError
from mpqc.core.ir import Graph
from mpqc.compiler.passes import Analysis, Pass, PassContext, PassManager, PassResult
from mpqc.compiler.pipelines import get_pass_class, make_pass, parse_pipeline, pass_registry, register_pass
from mpqc.compiler.pipelines import CANONICALIZE, build_pipeline, pipeline_spec
from mpqc.compiler.targets import get_target

from tests.graphs import GraphBuilder, ops, run_float


# ----------------------------------------------------------------------------- toy analyses and passes
class NodeCount(Analysis):
    name = "test-node-count"
    calls = 0

    def compute(self, graph, ctx):
        type(self).calls += 1
        return len(graph.nodes) + self.params.get("plus", 0)


class OpHistogram(Analysis):
    name = "test-op-histogram"
    calls = 0

    def compute(self, graph, ctx):
        type(self).calls += 1
        return sorted(ops(graph))


@register_pass
@dataclass(frozen=True)
class OptionsPass(Pass):
    name = "test-pm-options"
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    label: str = "x"
    widths: tuple[int, ...] = (8,)
    pair: tuple[int, float] = (1, 2.0)
    mode: Literal["fast", "exact"] = "fast"
    bits: Literal[2, 4, 8] = 8
    limit: Optional[int] = None
    scale: float | None = None

    def run(self, graph, ctx):
        ctx.section(self.name)["seen"] = self.options()
        return PassResult(False)


@register_pass
@dataclass(frozen=True)
class AppendReluPass(Pass):
    """Appends a Relu after the first output: modifies the graph, preserves NodeCount only (wrongly, on purpose)."""
    name = "test-pm-append-relu"
    preserves = frozenset({NodeCount})

    def run(self, graph, ctx):
        out = graph.outputs[0]
        node = graph.add_node("Relu", [out])
        graph.outputs[0] = node.outputs[0]
        return PassResult(True)


@register_pass
@dataclass(frozen=True)
class TouchPass(Pass):
    """Reports a modification and preserves nothing."""
    name = "test-pm-touch"

    def run(self, graph, ctx):
        return PassResult(True)


@register_pass
@dataclass(frozen=True)
class LookPass(Pass):
    """Reads analyses, changes nothing."""
    name = "test-pm-look"

    def run(self, graph, ctx):
        ctx.analyses.get(NodeCount, graph)
        ctx.analyses.get(OpHistogram, graph)
        return PassResult(False)


@register_pass
@dataclass(frozen=True)
class BreakPass(Pass):
    """Drops the first node although its output is still read: an invalid graph."""
    name = "test-pm-break"

    def run(self, graph, ctx):
        graph.remove_node(graph.nodes[0], force=True)
        return PassResult(True)


@register_pass
@dataclass(frozen=True)
class CrashPass(Pass):
    name = "test-pm-crash"

    def run(self, graph, ctx):
        return {}["missing-key"]


@register_pass
@dataclass(frozen=True)
class DataErrorPass(Pass):
    name = "test-pm-data-error"

    def run(self, graph, ctx):
        raise DataError("calibration set has 0 samples", hint="give --calib")


@register_pass
@dataclass(frozen=True)
class BadReturnPass(Pass):
    name = "test-pm-bad-return"

    def run(self, graph, ctx):
        return True


def small_graph() -> Graph:
    b = GraphBuilder()
    x = b.input("x", ["N", 3])
    y = b.op("Neg", [x], name="neg")
    return b.output(b.op("Abs", [y], name="abs"))


# ----------------------------------------------------------------------------- registry
def test_registry_has_the_canonicalize_passes():
    for name in set(CANONICALIZE):
        cls = get_pass_class(name)
        assert cls.name == name and pass_registry()[name] is cls
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_unknown_pass_lists_known_ones():
    with pytest.raises(OptionError) as e:
        get_pass_class("fold-everything")
    msg = str(e.value)
    assert "unknown pass 'fold-everything'" in msg
    for name in ("fold-batchnorm", "fold-constants", "eliminate-dead-code", "test-pm-options"):
        assert name in msg
    with pytest.raises(OptionError, match="unknown pass 'nope'"):
        parse_pipeline("fold-constants,nope")


@pytest.mark.parametrize("bad", ["FoldThings", "fold_things", "fold--things", "-fold", "fold-", "1fold", ""])
def test_register_pass_enforces_kebab_case(bad):
    cls = dataclass(frozen=True)(type("Bad", (Pass,), {"name": bad, "run": lambda self, g, c: PassResult(False)}))
    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(cls)
    assert bad not in pass_registry()


def test_register_pass_refuses_a_second_class_under_a_taken_name():
    cls = dataclass(frozen=True)(type("Dup", (Pass,), {"name": "test-pm-touch",
                                                         "run": lambda self, g, c: PassResult(False)}))
    with pytest.raises(ValueError, match="registered twice"):
        register_pass(cls)
    assert pass_registry()["test-pm-touch"] is TouchPass
    assert register_pass(TouchPass) is TouchPass  # re-registering the same class is harmless


# ----------------------------------------------------------------------------- option parsing
def test_parse_pipeline_names_and_defaults():
    ps = parse_pipeline(" fold-constants , test-pm-options ,eliminate-dead-code")
    assert [p.name for p in ps] == ["fold-constants", "test-pm-options", "eliminate-dead-code"]
    assert ps[1] == OptionsPass()
    assert ps[1].spec() == "test-pm-options"


def test_parse_pipeline_converts_option_types():
    (p,) = parse_pipeline("test-pm-options{count=3, ratio=0.25,flag=yes,label=foo,widths=8:4:2,pair=3:1.5,"
                          "mode=exact,bits=4,limit=7,scale=none}")
    assert p == OptionsPass(count=3, ratio=0.25, flag=True, label="foo", widths=(8, 4, 2), pair=(3, 1.5),
                            mode="exact", bits=4, limit=7, scale=None)
    assert type(p.count) is int and type(p.ratio) is float and type(p.bits) is int
    assert all(type(w) is int for w in p.widths) and type(p.pair[1]) is float
    # the textual form round-trips
    assert parse_pipeline(p.spec()) == [p]
    (q,) = parse_pipeline("test-pm-options{flag=0,limit=None,scale=2}")
    assert q.flag is False and q.limit is None and q.scale == 2.0 and type(q.scale) is float
    (r,) = parse_pipeline("test-pm-options{}")
    assert r == OptionsPass()


@pytest.mark.parametrize("text, match", [
    ("test-pm-options{count=abc}", r"option count='abc' is not a valid int"),
    ("test-pm-options{count=1.5}", r"count='1.5' is not a valid int"),
    ("test-pm-options{ratio=fast}", r"ratio='fast' is not a valid float"),
    ("test-pm-options{flag=maybe}", r"flag='maybe' is not a valid bool"),
    ("test-pm-options{mode=slow}", r"mode='slow' must be one of fast, exact"),
    ("test-pm-options{bits=3}", r"bits='3' must be one of 2, 4, 8"),
    ("test-pm-options{widths=8:x}", r"widths='x' is not a valid int"),
    ("test-pm-options{pair=1:2:3}", r"pair='1:2:3' needs 2 values"),
    ("test-pm-options{limit=lots}", r"limit='lots' is not a valid int"),
    ("test-pm-options{colour=red}", r"pass 'test-pm-options' has no option 'colour'; its options: bits, count"),
    ("test-pm-options{count}", r"option 'count' must be key=value"),
    ("fold-constants{x=1}", r"pass 'fold-constants' has no option 'x'; its options: none"),
    ("test-pm-options{count=1", r"cannot parse pass list near"),
    ("Fold-Constants", r"cannot parse pass list near 'Fold-Constants'"),
    ("fold-constants,,fold-batchnorm", r"cannot parse pass list"),
    ("   ", r"--passes is empty"),
])
def test_parse_pipeline_errors(text, match):
    with pytest.raises(OptionError, match=match):
        parse_pipeline(text)


def test_make_pass_accepts_typed_values():
    p = make_pass("test-pm-options", {"count": 5, "widths": (4, 2)})
    assert p.count == 5 and p.widths == (4, 2)
    with pytest.raises(OptionError, match="has no option 'nope'"):
        make_pass("test-pm-options", {"nope": 1})


# ----------------------------------------------------------------------------- analyses
def test_analysis_is_computed_once_and_keyed_by_graph_and_params():
    ctx = PassContext()
    g, h = small_graph(), small_graph()
    NodeCount.calls = 0
    assert ctx.analyses.get(NodeCount, g) == 2
    assert ctx.analyses.get(NodeCount, g) == 2
    assert NodeCount.calls == 1
    assert ctx.analyses.get(NodeCount, g, plus=10) == 12  # other parameters: another entry
    assert ctx.analyses.get(NodeCount, g, plus=10) == 12
    assert NodeCount.calls == 2
    h.add_node("Relu", [h.outputs[0]])
    assert ctx.analyses.get(NodeCount, h) == 3  # another graph (same names): another entry
    assert NodeCount.calls == 3
    assert ctx.analyses.computed == ["test-node-count"] * 3
    assert ctx.analyses.cached(NodeCount, g) and not ctx.analyses.cached(OpHistogram, g)
    ctx.analyses.put(OpHistogram, g, ["Abs"])
    assert ctx.analyses.get(OpHistogram, g) == ["Abs"] and OpHistogram.calls == 0
    ctx.analyses.clear()
    assert not ctx.analyses.cached(NodeCount, g)


def _warm(ctx, g):
    NodeCount.calls = OpHistogram.calls = 0
    PassManager([LookPass()]).run(g, ctx)
    assert (NodeCount.calls, OpHistogram.calls) == (1, 1)


def test_modifying_pass_drops_what_it_does_not_preserve():
    ctx, g = PassContext(), small_graph()
    _warm(ctx, g)
    assert PassManager([AppendReluPass()]).run(g, ctx) is True
    assert ctx.analyses.cached(NodeCount, g)  # preserved: kept (even though it is now stale)
    assert not ctx.analyses.cached(OpHistogram, g)  # not preserved: dropped
    assert ctx.analyses.get(NodeCount, g) == 2 and ctx.analyses.get(OpHistogram, g) == ["Abs", "Neg", "Relu"]
    assert (NodeCount.calls, OpHistogram.calls) == (1, 2)
    PassManager([TouchPass()]).run(g, ctx)  # preserves nothing: drops all
    assert not ctx.analyses.cached(NodeCount, g) and not ctx.analyses.cached(OpHistogram, g)
    assert ctx.analyses.get(NodeCount, g) == 3


def test_non_modifying_pass_keeps_all_analyses():
    ctx, g = PassContext(), small_graph()
    _warm(ctx, g)
    assert PassManager([OptionsPass(), LookPass(), get_pass_class("eliminate-dead-code")()]).run(g, ctx) is False
    assert ctx.analyses.cached(NodeCount, g) and ctx.analyses.cached(OpHistogram, g)
    assert (NodeCount.calls, OpHistogram.calls) == (1, 1)
    assert ctx.report["passes"]["test-pm-options"]["seen"]["count"] == 1


# ----------------------------------------------------------------------------- pipelines per level
def test_pipeline_spec_per_level():
    t = get_target("npu8")
    assert pipeline_spec(0, None) == CANONICALIZE == [
        "fold-constants", "remove-identity", "infer-shapes", "fold-constants", "fold-pad-into-conv",
        "fold-batchnorm", "reshape-to-flatten", "eliminate-dead-code", "infer-shapes"]
    assert pipeline_spec(0, t) == CANONICALIZE

    def names(level):  # pass names, without the options a level may set
        spec = pipeline_spec(level, t)
        assert spec[:len(CANONICALIZE)] == CANONICALIZE
        return [s.split("{")[0] for s in spec[len(CANONICALIZE):]]

    assert names(1) == ["choose-formats", "optimize-rounding", "insert-qdq"]
    assert names(2) == ["choose-formats", "optimize-rounding", "layer-influence", "assign-bit-widths",
                        "optimize-rounding", "bias-correction", "insert-qdq"]
    assert names(3) == ["serialize-residual", "prune-channels", "eliminate-dead-code", "infer-shapes",
                        "choose-formats", "optimize-rounding", "layer-influence", "assign-bit-widths",
                        "optimize-rounding", "bias-correction", "insert-qdq"]
    for level in (1, 2, 3):  # every spec parses as far as the registered passes go
        for s in pipeline_spec(level, t):
            if s.split("{")[0] in pass_registry():
                assert parse_pipeline(s)[0].name == s.split("{")[0]
    pipeline_spec(0, None).append("x")  # callers get a copy
    assert CANONICALIZE[-1] == "infer-shapes"
    with pytest.raises(OptionError, match="-O1 needs a --target"):
        pipeline_spec(1, None)
    with pytest.raises(OptionError, match="-O4 is not a level"):
        pipeline_spec(4, t)


def test_build_pipeline_level0():
    ps = build_pipeline(0)
    assert [p.spec() for p in ps] == CANONICALIZE
    assert all(isinstance(p, Pass) for p in ps)


def test_build_pipeline_reports_missing_passes():
    t = get_target("npu8")
    missing = [s for s in pipeline_spec(3, t) if s.split("{")[0] not in pass_registry()]
    if not missing:
        pytest.skip("every -O3 pass is registered in this build")
    with pytest.raises(OptionError, match="-O3 needs passes that this build of mpqc does not have yet: "
                                          + missing[0]):
        build_pipeline(3, t)


# ----------------------------------------------------------------------------- instrumentation
def test_print_after_named_pass_and_all():
    printed: list[str] = []
    g = small_graph()
    PassManager([OptionsPass(count=2), AppendReluPass()], print_after={"test-pm-append-relu"},
                printer=printed.append).run(g, PassContext())
    assert len(printed) == 1
    assert printed[0].startswith("// ----- IR after test-pm-append-relu -----\ngraph g")
    assert "= Relu(abs_out)" in printed[0]
    printed.clear()
    PassManager([OptionsPass(count=2), LookPass()], print_after={"all"}, printer=printed.append).run(
        small_graph(), PassContext())
    assert [p.splitlines()[0] for p in printed] == ["// ----- IR after test-pm-options{count=2} -----",
                                                     "// ----- IR after test-pm-look -----"]
    with pytest.raises(OptionError, match="--print-after 'fold-batchnorm' names no pass in this pipeline "
                                          r"\(test-pm-look\)"):
        PassManager([LookPass()], print_after={"fold-batchnorm"}).run(small_graph(), PassContext())


def test_time_passes_prints_a_table():
    printed: list[str] = []
    pm = PassManager([LookPass(), TouchPass()], time_passes=True, printer=printed.append)
    pm.run(small_graph(), PassContext())
    assert [(t.name, t.modified) for t in pm.timings] == [("test-pm-look", False), ("test-pm-touch", True)]
    assert all(t.seconds >= 0 for t in pm.timings)
    (table,) = printed
    lines = table.splitlines()
    assert lines[0].split() == ["pass", "seconds", "%", "modified"]
    assert lines[1].split()[0] == "test-pm-look" and lines[1].split()[-1] == "False"
    assert lines[2].split()[0] == "test-pm-touch" and lines[2].split()[-1] == "True"
    assert lines[3].split()[0] == "total"
    printed.clear()
    PassManager([LookPass()], printer=printed.append).run(small_graph(), PassContext())
    assert printed == []  # nothing unless asked


def test_verify_each_catches_a_pass_that_breaks_the_graph():
    g = small_graph()
    with pytest.raises(PassError) as e:
        PassManager([LookPass(), BreakPass(), TouchPass()], verify_each=True).run(g, PassContext())
    assert str(e.value).startswith("[test-pm-break] left an invalid graph: node 'abs' (Abs) reads 'neg_out'")
    # without --verify-each the broken graph goes unnoticed by the manager
    assert PassManager([BreakPass()]).run(small_graph(), PassContext()) is True


def test_verify_each_passes_on_a_valid_pipeline():
    g = small_graph()
    x = np.array([[-1.0, 2.0, -3.0]], np.float32)
    PassManager(build_pipeline(0), verify_each=True).run(g, PassContext())
    np.testing.assert_array_equal(run_float(g, {"x": x})[0], np.abs(x))


# ----------------------------------------------------------------------------- error wrapping
def test_plain_exception_becomes_pass_error_naming_the_pass():
    with pytest.raises(PassError) as e:
        PassManager([LookPass(), CrashPass()]).run(small_graph(), PassContext())
    msg = str(e.value)
    assert msg.startswith("[test-pm-crash] internal error: KeyError: 'missing-key'")
    assert "--verify-each" in msg
    assert isinstance(e.value.__cause__, KeyError)


def test_compiler_error_keeps_its_type_and_gets_the_pass_name():
    with pytest.raises(DataError) as e:
        PassManager([DataErrorPass()]).run(small_graph(), PassContext())
    assert str(e.value) == "[test-pm-data-error] calibration set has 0 samples (give --calib)"
    assert e.value.hint == "give --calib"


def test_wrong_return_type_is_a_pass_error():
    with pytest.raises(PassError, match=r"^\[test-pm-bad-return\] returned bool, expected PassResult"):
        PassManager([BadReturnPass()]).run(small_graph(), PassContext())


def test_errors_are_compiler_errors():
    for cls in (PassError, DataError, OptionError):
        assert issubclass(cls, CompilerError) and cls.exit_code == 2
