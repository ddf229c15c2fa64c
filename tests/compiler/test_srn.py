"""SRN: residual blocks serialized into plain conv chains (identity and projection shortcuts, a real ResNet)."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.srn import find_residual_blocks, is_nonnegative, serialize_residual
from mpqc.core.errors import CompilerError

from tests.conftest import bench_path
from tests.graphs import GraphBuilder, conv, ops, randn, rel_err, run_float, run_ort, set_shapes


def block_graph(projection: bool, stride: int = 1, relu_input: bool = True, trailing_relu: bool = True):
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    s = conv(b, x, 3, 4, "stem", seed=1)
    xin = b.op("Relu", [s], name="stem_relu") if relu_input else s
    cout = 6 if projection else 4
    c1 = conv(b, xin, 4, 5, "c1", seed=2, strides=[stride, stride])
    h = b.op("Relu", [c1], name="r1")
    c2 = conv(b, h, 5, cout, "c2", seed=3)
    if projection:
        sc = conv(b, xin, 4, cout, "sc", k=1, seed=4, strides=[stride, stride], pads=[0, 0, 0, 0])
        y = b.op("Add", [c2, sc], name="add")
    else:
        y = b.op("Add", [xin, c2], name="add")  # shortcut first: either operand order is matched
    if trailing_relu:
        y = b.op("Relu", [y], name="out_relu")
    head = conv(b, y, cout, 2, "head", k=1, seed=5)
    g = b.output(head)
    set_shapes(g)
    return g


@pytest.mark.parametrize("projection,stride", [(False, 1), (True, 1), (True, 2)])
def test_block_serializes_exactly(projection, stride):
    g = block_graph(projection, stride)
    xs = randn(6, 3, 8, 8, seed=7)
    want = run_float(g, {"x": xs})[0]
    (blk,) = find_residual_blocks(g)
    assert blk.conv1.name == "c1" and blk.conv2.name == "c2" and (blk.shortcut is not None) == projection
    rep = serialize_residual(g)
    assert rep.serialized == ["add"] and rep.refused == []
    assert "Add" not in ops(g) and "sc" not in [n.name for n in g.nodes]
    c1, c2 = g.node_by_name("c1"), g.node_by_name("c2")
    assert c1.weight.shape == (5 + 4, 4, 3, 3) and c2.weight.shape[1] == 5 + 4
    assert c1.outputs[0].shape[1] == 9 and g.node_by_name("r1").outputs[0].shape[1] == 9
    assert g.node_by_name("out_relu").inputs[0] is c2.outputs[0] and c2.outputs[0].name == "add_out"
    assert rel_err(run_float(g, {"x": xs})[0], want) < 1e-5
    assert rel_err(run_ort(g, {"x": xs})[0], want) < 1e-5


def test_block_without_trailing_relu():
    g = block_graph(True, 2, trailing_relu=False)
    xs = randn(3, 3, 8, 8, seed=8)
    want = run_float(g, {"x": xs})[0]
    serialize_residual(g)
    assert "Add" not in ops(g) and rel_err(run_float(g, {"x": xs})[0], want) < 1e-5


def test_possibly_negative_input_is_refused():
    g = block_graph(False, relu_input=False)
    assert not is_nonnegative(g.node_by_name("c1").inputs[0])
    before = g.summary()
    with pytest.raises(CompilerError, match="Add node 'add'.*may be negative") as e:
        serialize_residual(g)
    assert "\n" not in str(e.value)
    assert g.summary() == before
    rep = serialize_residual(g, strict=False)
    assert rep.serialized == [] and rep.refused[0][0] == "add"


def test_real_resnet_serializes_and_becomes_prunable():
    import mpqc
    from mpqc.compiler.channel_prune import find_units, prune_unit
    g = mpqc.load(bench_path("digits_resnet.onnx"))
    d = np.load(bench_path("digits.npz"))
    xt = d["x_test"][:32]
    want = run_float(g, {"input": xt})[0]
    assert len(find_units(g)[0]) == 3  # only the blocks' first convs, before serialization
    h = g.copy()
    rep = serialize_residual(h)
    assert len(rep.serialized) == 3 and "Add" not in ops(h)
    got = run_float(h, {"input": xt})[0]
    assert rel_err(got, want) < 1e-5
    assert rel_err(run_ort(h, {"input": xt})[0], want) < 1e-5
    units, refused = find_units(h)
    assert len(units) == 7  # stem, every A and B layer
    assert [r.node.op_type for r in refused] == ["Gemm"] and "graph output" in refused[0].reason
    # prune a serialized block's A layer (its carried channels included) with REAP
    u = next(u for u in units if u.name.endswith("layers.1/c1/Conv"))
    assert u.channels == 32 + 16
    prune_unit(h, u.name, 0.25, "reap", d["x_calib"], n_samples=1500)
    h.verify()
    out = run_float(h, {"input": xt})[0]
    assert np.mean(out.argmax(1) == want.argmax(1)) >= 0.9
