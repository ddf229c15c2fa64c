"""Helpers to build small IR graphs in tests and run them with onnxruntime or the float runtime."""
from __future__ import annotations

import numpy as np

from mpqc.core.ir import Graph, Value
from mpqc.runtime.executor import Executor
from mpqc.testing import GraphBuilder, randn  # noqa: F401  (the tests' builders are the public ones)


def conv(b: "GraphBuilder", x: Value, cin: int, cout: int, name: str, k: int = 3, seed: int = 0, bias: bool = True,
         **attrs) -> Value:
    """A kxk Conv ('same' padding unless ``pads`` is given) with random weights and bias."""
    ins = [x, b.const(name + "_w", randn(cout, cin, k, k, seed=seed, scale=0.4))]
    if bias:
        ins.append(b.const(name + "_b", randn(cout, seed=seed + 100, scale=0.1)))
    attrs.setdefault("pads", [k // 2] * 4)
    return b.op("Conv", ins, name=name, **attrs)


def conv_pool_fc(names=("conv1", "relu1", "pool", "flat", "fc"), fc_seed: int = 7, **gemm_attrs) -> Graph:
    """x [N, 3, 4, 4] -> 3x3 Conv (4 channels) -> Relu -> 2x2 MaxPool -> Flatten -> Gemm (16 -> 5), with
    static shapes: a layer whose channels reach a Gemm as H*W columns each."""
    c, r, p, f, fc = names
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4, 4])
    y = b.op("Relu", [conv(b, x, 3, 4, c, seed=1)], name=r)
    y = b.op("MaxPool", [y], name=p, kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Flatten", [y], name=f, axis=1)
    y = b.op("Gemm", [y, b.const(f"{fc}_w", randn(5, 16, seed=fc_seed)), b.const(f"{fc}_b", randn(5, seed=fc_seed + 1))],
             name=fc, transB=1, **gemm_attrs)
    g = b.output(y)
    set_shapes(g)
    return g


def set_shapes(g: Graph) -> None:
    """Static shapes of every activation (the tests' graphs are built without shape inference)."""
    feeds = {v: np.zeros([2] + list(v.shape[1:]), np.float32) for v in g.inputs}
    vals = [o for n in g.nodes for o in n.outputs]
    res = Executor(g).run(feeds, outputs=vals)
    for v in vals:
        v.shape = ("N",) + tuple(res[v].shape[1:])


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def ort_session(model):
    """onnxruntime session for a Graph, a ModelProto, bytes or a path."""
    import onnx
    import onnxruntime as ort

    from mpqc.compiler.export import to_onnx
    if isinstance(model, Graph):
        model = to_onnx(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


def run_ort(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort_session(model).run(None, feeds)


def run_float(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    res = Executor(graph).run(feeds)
    return [res[v] for v in graph.outputs]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    den = float(np.max(np.abs(b))) if b.size else 0.0
    num = float(np.max(np.abs(a - b))) if a.size else 0.0
    return num / den if den else num


def ops(graph: Graph) -> list[str]:
    return [n.op_type for n in graph.nodes]


def run_pass(graph: Graph, name: str, **options):
    """Run one registered pass (verifying the graph after it) and return its PassResult."""
    from mpqc.compiler.passes import PassContext
    from mpqc.compiler.pipelines import make_pass
    p = make_pass(name, {k: str(v) for k, v in options.items()})
    res = p.run(graph, PassContext())
    graph.verify()
    return res
