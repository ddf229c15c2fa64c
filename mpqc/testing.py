"""Helpers for testing mpqc passes (yours or mpqc's) from pytest.

Build a small graph in a few lines, run a pass on it, and compare the result with
onnxruntime or with expected textual IR (docs/TEXTUAL_IR.md, docs/TESTING_PASSES.md)::

    from mpqc.testing import GraphBuilder, assert_ir, run_pass

    def test_my_pass():
        b = GraphBuilder()
        x = b.input("x", ["N", 4])
        y = b.op("Relu", [b.op("Identity", [x], name="id")], name="relu")
        g = b.output(y)
        assert run_pass(g, "remove-identity").modified
        assert_ir(g, '''
            graph @g opset 17 {
              input %x: float32[N,4]
              %relu_out: float32 = Relu "relu"(%x)
              output %relu_out
            }''')

``parse_ir``/``print_ir`` read and write the textual IR; ``run_pass`` runs a pass list
(``"a,b{opt=1}"``, the syntax of ``--passes``) with the IR verified after every pass;
``assert_matches_ort`` runs the graph with mpqc's float runtime and with onnxruntime and
compares the outputs.
"""
from __future__ import annotations

import difflib
import textwrap
from typing import Any, Sequence

import numpy as np

from mpqc.compiler.channel_prune import PruneRecord
from mpqc.compiler.data import Dataset
from mpqc.compiler.export import to_onnx
from mpqc.compiler.passes import PassContext, check_requires
from mpqc.compiler.pipelines import parse_pipeline
from mpqc.compiler.targets import get_target
from mpqc.core.ir import Graph, Node, Value
from mpqc.core.textir import DEFAULT_ELIDE, parse_graph, print_graph, register_record
from mpqc.runtime.executor import Executor

__all__ = ["GraphBuilder", "randn", "parse_ir", "print_ir", "assert_ir", "assert_roundtrip", "run_pass",
           "run_float", "run_ort", "assert_matches_ort", "register_compiler_records"]


class GraphBuilder:
    """Terse construction of a Graph: ``b.input``, ``b.const``, ``b.op``, ``b.output``."""

    def __init__(self, name: str = "g", opset: int = 17):
        self.graph = Graph(name=name, opset=opset)

    def input(self, name: str, shape: Sequence, dtype=np.float32) -> Value:
        v = Value(name, shape, dtype)
        self.graph.inputs.append(v)
        return v

    def const(self, name: str, array) -> Value:
        return Value(name, const=np.asarray(array))

    def node(self, op_type: str, inputs: Sequence[Value | None], n_out: int = 1, name: str | None = None,
             **attrs) -> Node:
        return self.graph.add_node(op_type, inputs, n_out, attrs, name=name)

    def op(self, op_type: str, inputs: Sequence[Value | None], n_out: int = 1, name: str | None = None, **attrs):
        """Add a node and return its output (a tuple of outputs when ``n_out > 1``)."""
        n = self.node(op_type, inputs, n_out, name, **attrs)
        return n.outputs[0] if n_out == 1 else tuple(n.outputs)

    def output(self, *values: Value) -> Graph:
        self.graph.outputs.extend(values)
        return self.graph


def randn(*shape, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Seeded standard-normal float32 array (times ``scale``)."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def register_compiler_records() -> None:
    """Let the textual IR parse ``prune<...>`` into ``compiler.channel_prune.PruneRecord``
    (core cannot import the compiler, so the compiler side registers it)."""

    register_record("prune", lambda f: PruneRecord(tuple(int(c) for c in f["kept"]),
                                                   int(f["original_channels"]), str(f["method"])))


def parse_ir(text: str, **kwargs) -> Graph:
    """Parse textual IR (indentation common to every line is ignored) into a verified Graph."""
    register_compiler_records()
    g = parse_graph(textwrap.dedent(text).strip() + "\n", **kwargs)
    g.verify()
    return g


def print_ir(graph: Graph, *, elide_above: int | None = DEFAULT_ELIDE) -> str:
    return print_graph(graph, elide_above=elide_above)


def assert_ir(graph: Graph, expected: str, *, elide_above: int | None = DEFAULT_ELIDE) -> None:
    """Assert that ``graph`` prints as ``expected`` (common indentation and surrounding blank lines
    ignored); the assertion message is a unified diff."""
    got = print_graph(graph, elide_above=elide_above)
    want = textwrap.dedent(expected).strip() + "\n"
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "expected", "actual"))
        raise AssertionError("the graph's IR differs from the expected text:\n" + diff)


def assert_roundtrip(graph: Graph, *, elide_above: int | None = DEFAULT_ELIDE) -> str:
    """Assert print -> parse -> print is byte-identical; return the text."""
    register_compiler_records()
    text = print_graph(graph, elide_above=elide_above)
    again = print_graph(parse_graph(text), elide_above=elide_above)
    if again != text:
        diff = "".join(difflib.unified_diff(text.splitlines(True), again.splitlines(True), "printed", "reparsed"))
        raise AssertionError("the textual IR does not round-trip:\n" + diff)
    return text


def run_pass(graph: Graph, passes: str, ctx: Any = None, **ctx_fields):
    """Run a pass list (``--passes`` syntax) on ``graph`` in place, verifying the IR after each pass.

    ``ctx``: a ``compiler.passes.PassContext``; else one is built from ``ctx_fields``
    (``target="npu8"`` names a target; ``calib=``/``eval=`` take an array or ``(x, y)``).
    Returns the last pass's ``PassResult`` (a list of them with ``all_results=True``)."""
    all_results = ctx_fields.pop("all_results", False)
    if ctx is None:
        if isinstance(ctx_fields.get("target"), str):
            ctx_fields["target"] = get_target(ctx_fields["target"])
        for k in ("calib", "eval", "train"):
            d = ctx_fields.get(k)
            if d is not None and not isinstance(d, Dataset):
                x, y = d if isinstance(d, tuple) else (d, None)
                ctx_fields[k] = Dataset(np.asarray(x), None if y is None else np.asarray(y), f"<{k}>")
        ctx = PassContext(**ctx_fields)
    results = []
    for p in parse_pipeline(passes):  # what PassManager does, keeping each PassResult
        check_requires(p, graph, ctx)
        res = p.run(graph, ctx)
        if res.modified:
            ctx.analyses.invalidate(p.preserves)
        graph.verify()
        results.append(res)
    return results if all_results else results[-1]


def run_float(graph: Graph, *xs: np.ndarray) -> list[np.ndarray]:
    """Every graph output, from mpqc's float runtime, for inputs ``xs`` (in graph-input order)."""
    res = Executor(graph).run(dict(zip(graph.inputs, xs)), outputs=list(graph.outputs))
    return [np.asarray(res[v]) for v in graph.outputs]


def run_ort(graph: Graph, *xs: np.ndarray) -> list[np.ndarray]:
    """Every graph output, from onnxruntime on the exported ONNX model."""
    import onnxruntime as ort  # start-up: onnxruntime loads in about a second

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(to_onnx(graph).SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, xs)))


def assert_matches_ort(graph: Graph, *xs: np.ndarray, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Assert mpqc's float runtime and onnxruntime agree on ``graph`` for inputs ``xs``."""
    for i, (a, b) in enumerate(zip(run_float(graph, *xs), run_ort(graph, *xs))):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"output {i} ({graph.outputs[i].name})")
