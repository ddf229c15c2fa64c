"""IR invariants: use-def links, mutation helpers, toposort, verify, clone, identity hashing."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.core.errors import VerifyError
from mpqc.core.ir import Graph, Node, Value

from tests.graphs import GraphBuilder, ops, rel_err, run_float, run_ort


def chain():
    """x -> Relu(a) -> Neg(b) -> Abs(c) -> y, plus a constant weight used by nothing."""
    b = GraphBuilder()
    x = b.input("x", ["N", 4])
    r = b.op("Relu", [x], name="a")
    n = b.op("Neg", [r], name="b")
    y = b.op("Abs", [n], name="c")
    return b.output(y), x, r, n, y


def uses(v: Value):
    return [(n.name, i) for n, i in v.uses]


# ----------------------------------------------------------------------------- construction
def test_add_node_wires_uses_and_producer():
    g, x, r, n, y = chain()
    a, bn, c = g.nodes
    assert ops(g) == ["Relu", "Neg", "Abs"]
    assert r.producer is a and n.producer is bn and y.producer is c
    assert x.producer is None
    assert uses(x) == [("a", 0)] and uses(r) == [("b", 0)] and uses(n) == [("c", 0)] and y.uses == []
    assert a.inputs == [x] and a.outputs == [r]
    g.verify()


def test_add_node_same_value_twice_and_optional_inputs():
    b = GraphBuilder()
    x = b.input("x", [2, 3])
    node = b.node("Add", [x, x], name="sq")
    clip = b.node("Clip", [node.outputs[0], None, b.const("hi", np.float32(1.0))], name="clip")
    g = b.output(clip.outputs[0])
    assert uses(x) == [("sq", 0), ("sq", 1)]
    assert x.consumers() == [node]  # each reader once
    assert clip.inputs[1] is None and clip.input(1) is None and clip.input(7) is None
    g.verify()
    feed = np.array([[0.1, 0.4, 0.7], [-1, 2, 0.2]], np.float32)
    want = np.minimum(feed + feed, 1.0)
    np.testing.assert_allclose(run_float(g, {"x": feed})[0], want)
    np.testing.assert_allclose(run_ort(g, {"x": feed})[0], want)


def test_add_node_index_and_generated_names():
    g, x, r, n, y = chain()
    node = g.add_node("Relu", [x], 2, index=0)
    assert g.nodes[0] is node
    assert node.name == "relu"
    assert [v.name for v in node.outputs] == ["relu_out0", "relu_out1"]
    node2 = g.add_node("Relu", [x])
    assert node2.name == "relu_1"  # unique among existing names
    assert node2.outputs[0].name == "relu_1_out"


def test_add_node_refuses_value_with_a_producer_without_side_effects():
    g, x, r, n, y = chain()
    before = list(x.uses)
    with pytest.raises(VerifyError, match="already produced"):
        g.add_node("Relu", [x], [r])
    # the failed call must not leave a dangling use on its inputs nor a node in the list
    assert x.uses == before
    assert len(g.nodes) == 3
    g.verify()


def test_set_input_rewires_uses():
    g, x, r, n, y = chain()
    c = g.nodes[2]
    g.set_input(c, 0, r)  # Abs now reads the Relu output
    assert uses(n) == [] and uses(r) == [("b", 0), ("c", 0)]
    assert c.inputs[0] is r
    g.set_input(c, 2, x)  # extends with None
    assert c.inputs == [r, None, x] and ("c", 2) in uses(x)
    g.set_input(c, 2, None)
    assert c.inputs[2] is None and ("c", 2) not in uses(x)
    g.set_input(c, 2, None)  # None -> None is fine
    g.set_input(c, 0, r)  # setting the same value keeps one use
    assert uses(r).count(("c", 0)) == 1


def test_remove_node_refuses_used_outputs():
    g, x, r, n, y = chain()
    a, bn, c = g.nodes
    with pytest.raises(VerifyError, match="still used"):
        g.remove_node(a)
    with pytest.raises(VerifyError, match="still used"):
        g.remove_node(c)  # its output is a graph output
    assert len(g.nodes) == 3
    g.verify()


def test_remove_node_detaches_inputs():
    g, x, r, n, y = chain()
    d = g.add_node("Sigmoid", [x], name="dead")
    assert uses(x) == [("a", 0), ("dead", 0)]
    out = d.outputs[0]
    g.remove_node(d)
    assert uses(x) == [("a", 0)]
    assert out.producer is None and d.inputs == [] and d not in g.nodes
    g.verify()


def test_remove_node_force_and_foreign_node():
    g, x, r, n, y = chain()
    a = g.nodes[0]
    g.remove_node(a, force=True)
    assert r.producer is None and uses(x) == []
    with pytest.raises(VerifyError, match="'b'.*reads 'a_out'.*nothing in the graph"):
        g.verify()
    stranger = Node("Relu", "stranger")
    with pytest.raises(VerifyError, match="not in graph"):
        g.remove_node(stranger)


def test_replace_all_uses_with_nodes_and_graph_outputs():
    b = GraphBuilder()
    x = b.input("x", ["N", 4])
    r = b.op("Relu", [x], name="a")
    s = b.op("Sigmoid", [r], name="s")
    t = b.op("Tanh", [r], name="t")
    g = b.output(r, s, t)
    g.replace_all_uses_with(r, x)
    assert r.uses == []
    assert uses(x) == [("a", 0), ("s", 0), ("t", 0)]
    assert g.outputs[0] is x and g.outputs[1:] == [s, t]
    g.replace_all_uses_with(x, x)  # no-op
    assert uses(x) == [("a", 0), ("s", 0), ("t", 0)]
    g.remove_node(g.nodes[0])  # the Relu is now dead
    g.verify()
    feed = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    out = run_float(g, {"x": feed})
    np.testing.assert_allclose(out[1], 1 / (1 + np.exp(-feed)), rtol=1e-6)


def test_bypass_forwards_input_and_keeps_output_name():
    b = GraphBuilder()
    x = b.input("x", ["N", 4])
    r = b.op("Relu", [x], name="a")
    i = b.op("Identity", [r], name="id")
    y = b.op("Neg", [i], name="neg")
    i2 = b.op("Identity", [y], name="id_out")
    i2.name = "y"
    g = b.output(i2)
    g.bypass(g.node_by_name("id"))
    assert ops(g) == ["Relu", "Neg", "Identity"]
    assert uses(r) == [("neg", 0)]
    g.bypass(g.node_by_name("id_out"))  # graph output: the forwarded value takes the output's name
    assert ops(g) == ["Relu", "Neg"]
    assert g.outputs == [y] and y.name == "y"
    g.verify()
    feed = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(run_ort(g, {"x": feed})[0], -np.maximum(feed, 0))


def test_bypass_keeps_input_to_output_identity():
    b = GraphBuilder()
    x = b.input("x", [2])
    y = b.op("Identity", [x], name="id")
    g = b.output(y)
    g.bypass(g.nodes[0])
    assert ops(g) == ["Identity"]  # the graph keeps its interface (input and output names)
    g.verify()


# ----------------------------------------------------------------------------- ordering
def test_toposort_is_stable_and_orders_dependencies():
    b = GraphBuilder()
    x = b.input("x", [4])
    p = b.op("Relu", [x], name="p")
    q = b.op("Neg", [x], name="q")
    s = b.op("Add", [p, q], name="s")
    t = b.op("Abs", [x], name="t")
    g = b.output(s, t)
    names = [n.name for n in g.nodes]
    g.toposort()
    assert [n.name for n in g.nodes] == names  # already sorted: unchanged
    # move the consumer first: toposort puts it after its producers, others keep their order
    g.nodes.insert(0, g.nodes.pop(2))
    with pytest.raises(VerifyError, match="'s'.*reads 'p_out'.*a later node"):
        g.verify()
    g.toposort()
    assert [n.name for n in g.nodes] == ["p", "q", "s", "t"]
    g.verify()
    g.nodes.reverse()
    g.toposort()
    assert [n.name for n in g.nodes] == ["t", "q", "p", "s"]  # ties broken by current order
    g.verify()


def test_toposort_detects_cycles():
    b = GraphBuilder()
    x = b.input("x", [4])
    a = b.node("Add", [x, x], name="a")
    c = b.node("Relu", [a.outputs[0]], name="c")
    g = b.output(c.outputs[0])
    g.set_input(a, 1, c.outputs[0])  # a <- c <- a
    with pytest.raises(VerifyError, match="cycle"):
        g.toposort()
    assert [n.name for n in g.nodes] == ["a", "c"]  # left as it was
    with pytest.raises(VerifyError):
        g.verify()


# ----------------------------------------------------------------------------- verify
def test_verify_missing_use():
    g, x, r, n, y = chain()
    r.uses.clear()
    with pytest.raises(VerifyError, match="missing from the value's uses"):
        g.verify()


def test_verify_stale_use():
    g, x, r, n, y = chain()
    r.uses.append((Node("Relu", "ghost"), 0))
    with pytest.raises(VerifyError, match="stale use by node 'ghost'"):
        g.verify()


def test_verify_wrong_producer():
    g, x, r, n, y = chain()
    r.producer = g.nodes[2]
    with pytest.raises(VerifyError, match="wrong producer"):
        g.verify()


def test_verify_output_not_produced():
    g, x, r, n, y = chain()
    g.outputs.append(Value("orphan", [4]))
    with pytest.raises(VerifyError, match="graph output 'orphan' is not produced"):
        g.verify()


def test_verify_duplicate_value_name():
    g, x, r, n, y = chain()
    n.name = r.name
    with pytest.raises(VerifyError, match="defined twice"):
        g.verify()


def test_verify_value_named_like_graph_input():
    g, x, r, n, y = chain()
    r.name = "x"
    with pytest.raises(VerifyError, match="defined twice"):
        g.verify()


def test_verify_constant_named_like_activation():
    g, x, r, n, y = chain()
    g.add_node("Add", [y, Value("a_out", const=np.ones(4, np.float32))], name="plus")
    with pytest.raises(VerifyError, match="'a_out'"):
        g.verify()


def test_verify_duplicate_node_names():
    g, x, r, n, y = chain()
    g.nodes[1].name = "a"
    with pytest.raises(VerifyError, match="node names are not unique: \\['a'\\]"):
        g.verify()


def test_verify_node_listed_twice():
    g, x, r, n, y = chain()
    g.nodes.append(g.nodes[0])
    with pytest.raises(VerifyError, match="twice"):
        g.verify()


def test_verify_ok_with_constant_inputs():
    b = GraphBuilder()
    x = b.input("x", [2, 3])
    w = b.const("w", np.ones((3, 2), np.float32))
    y = b.op("MatMul", [x, w], name="mm")
    g = b.output(y)
    g.verify()
    assert g.constants() == [w]
    assert g.layers() == [g.nodes[0]] and g.nodes[0].weight is w and g.nodes[0].bias is None
    assert g.num_params() == 6


# ----------------------------------------------------------------------------- clone, identity
def test_clone_is_independent():
    b = GraphBuilder()
    x = b.input("x", ["N", 1, 4, 4])
    w = b.const("w", np.ones((2, 1, 3, 3), np.float32))
    c = b.op("Conv", [x, w], name="conv", pads=[1, 1, 1, 1])
    y = b.op("Relu", [c], name="relu")
    g = b.output(y)
    g.metadata["k"] = "v"
    g2, vmap = g.clone()
    g2.verify()
    assert g2.summary() == g.summary()
    assert vmap[id(g.nodes[0])] is g2.nodes[0] and vmap[id(x)] is g2.inputs[0]
    # no shared Value or Node objects, shared (read-only) constant arrays
    old_ids = {id(v) for v in g.values()} | {id(n) for n in g.nodes}
    assert not old_ids & ({id(v) for v in g2.values()} | {id(n) for n in g2.nodes})
    assert g2.nodes[0].weight.const is w.const and not w.const.flags.writeable
    # mutate the clone in every way a pass might: the original does not change
    before = g.summary()
    g2.nodes[0].attrs["pads"].append(7)
    g2.nodes[0].attrs["strides"] = [2, 2]
    g2.inputs[0].name = "renamed"
    g2.metadata["k"] = "w"
    g2.bypass(g2.nodes[1])
    assert g.summary() == before
    assert g.nodes[0].attrs == {"pads": [1, 1, 1, 1]} and g.metadata == {"k": "v"}
    assert uses(c) == [("relu", 0)] and len(g.nodes) == 2
    g.verify()
    assert g.copy().summary() == before


def test_identity_keyed_hashing():
    a, b_ = Value("t", [2]), Value("t", [2])
    assert a != b_ and len({a, b_}) == 2 and {a: 1, b_: 2}[a] == 1
    n1, n2 = Node("Relu", "r"), Node("Relu", "r")
    assert n1 != n2 and len({n1, n2}) == 2
    g1, g2 = Graph("g"), Graph("g")
    assert g1 != g2 and len({g1, g2}) == 2 and g1 == g1
    c1, _ = chain()[0].clone()
    assert len({c1, c1.copy()}) == 2


def test_constants_are_read_only_copies():
    src = np.arange(4, dtype=np.float32)
    v = Value("c", const=src)
    src[0] = 99
    assert v.const[0] == 0 and not v.const.flags.writeable
    assert v.shape == (4,) and v.dtype == np.float32 and v.is_const and v.rank == 1 and v.static_shape


def test_values_and_lookups():
    g, x, r, n, y = chain()
    assert g.values() == [x, r, n, y]
    assert g.value_by_name("b_out") is n and g.node_by_name("c") is g.nodes[2]
    with pytest.raises(KeyError):
        g.value_by_name("nope")
    assert [m.name for m in g.iter_ops("Neg", "Abs")] == ["b", "c"]
    assert rel_err(np.ones(2), np.ones(2)) == 0.0


def test_bypass_keeps_nodes_whose_input_cannot_take_the_output_name():
    b = GraphBuilder()
    x = b.input("x", [2])
    r = b.op("Relu", [x], name="relu")
    r.name = "first"
    same = b.op("Identity", [r], name="id_out")  # both graph outputs
    same.name = "second"
    c = b.op("Identity", [b.const("k", np.ones(2, np.float32))], name="id_const")
    c.name = "third"
    g = b.output(r, same, c)
    g.bypass(g.node_by_name("id_out"))
    g.bypass(g.node_by_name("id_const"))
    assert ops(g) == ["Relu", "Identity", "Identity"]
    assert [v.name for v in g.outputs] == ["first", "second", "third"]
    g.verify()
    out = run_ort(g, {"x": np.array([-1.0, 2.0], np.float32)})
    assert [o.tolist() for o in out] == [[0.0, 2.0], [0.0, 2.0], [1.0, 1.0]]
