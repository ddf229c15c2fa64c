"""The popcount interpreter runs a binary-decomposed program from its bundle alone."""
from __future__ import annotations

import numpy as np

from mpqc.core.bdcnn_program import is_bdcnn_bundle, load_bdcnn_bundle
from mpqc.compiler.bdcnn import compile_bdcnn
from mpqc.runtime.bdcnn import BdcnnRuntime, run_bdcnn

from tests.graphs import GraphBuilder, randn, rel_err, run_float


def small_net():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    c1 = b.op("Conv", [x, b.const("w1", randn(8, 3, 3, 3, seed=1)), b.const("b1", randn(8, seed=2))],
              name="conv1", pads=[1, 1, 1, 1], strides=[2, 2])
    r1 = b.op("Relu", [c1], name="relu1")
    c2 = b.op("Conv", [r1, b.const("w2", randn(8, 1, 3, 3, seed=3))], name="dw", pads=[1, 1, 1, 1], group=8)
    r2 = b.op("Relu", [c2], name="relu2")
    f = b.op("Flatten", [r2], name="flat")
    y = b.op("Gemm", [f, b.const("w3", randn(5, 128, seed=4, scale=0.1)), b.const("b3", randn(5, seed=5))],
             name="fc", transB=1)
    return b.output(y)


def test_bundle_runs_alone_and_matches_the_qdq_float_network(tmp_path):
    g = small_net()
    x = np.random.default_rng(0).uniform(-1, 1, (6, 3, 8, 8)).astype(np.float32)
    res = compile_bdcnn(g, x, q_fixed=4, bases=2, restarts=1, iterations=5)
    p = tmp_path / "m.npz"
    p.write_bytes(res.bundle)
    assert is_bdcnn_bundle(p)
    prog = load_bdcnn_bundle(p)
    assert [s.kind for s in prog.steps] == ["binary", "float", "binary", "float", "float", "binary"]
    assert prog.steps[0].params["Q"] == 4 and prog.steps[0].params["zero_point"] > 0  # signed input
    assert prog.steps[2].params["zero_point"] == 0  # after a ReLU
    y = run_bdcnn(p, x, batch_size=4)[0]
    want = run_float(res.graph, {"x": x})[0]
    assert rel_err(y, want) < 1e-5
    rt = BdcnnRuntime(prog)
    rt.run(x, time_steps=True)
    assert set(rt.timings) == {"conv1", "relu1", "dw", "relu2", "flat", "fc"}
    # deterministic bytes
    assert compile_bdcnn(g, x, q_fixed=4, bases=2, restarts=1, iterations=5).bundle == res.bundle
