"""runtime/executor.py: traversal, partial execution from a cut, memory release, the node_fn hook,
errors that name the tensor or node, and batching; the float result checked against onnxruntime."""
from __future__ import annotations

import weakref

import numpy as np
import pytest

from mpqc.core.errors import CompilerError, DataError, UnsupportedOpError
from mpqc.runtime.executor import Executor, batches, float_node_fn, run_batched
from tests.graphs import GraphBuilder, randn, run_ort


def chain():
    """x -> Conv(3x3, pad 1) -> Relu (r) -> Conv(1x1) -> Add(r) -> y, and a dead Sigmoid branch."""
    b = GraphBuilder()
    x = b.input("x", [2, 3, 5, 5])
    w1 = b.const("w1", randn(4, 3, 3, 3, seed=1, scale=0.4))
    c = b.op("Conv", [x, w1], name="conv1", pads=[1, 1, 1, 1])
    r = b.op("Relu", [c], name="relu")
    w2 = b.const("w2", randn(4, 4, 1, 1, seed=2, scale=0.5))
    d = b.op("Conv", [r, w2], name="conv2")
    y = b.op("Add", [d, r], name="add")
    b.op("Sigmoid", [x], name="unused")
    return b.output(y), x, c, r, d, y


def test_float_run_matches_onnxruntime():
    g, x, *_ = chain()
    a = randn(2, 3, 5, 5, seed=3)
    got = Executor(g).run({"x": a})[g.outputs[0]]
    (want,) = run_ort(g, {"x": a})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_plan_runs_only_what_the_outputs_need():
    g, x, c, r, d, y = chain()
    ex = Executor(g)
    assert [n.name for n in ex.plan([y], [x])] == ["conv1", "relu", "conv2", "add"]
    # from a cut at r, only the suffix runs
    assert [n.name for n in ex.plan([y], [r])] == ["conv2", "add"]
    assert [n.name for n in ex.plan([c], [x])] == ["conv1"]
    # plans are cached by (outputs, known)
    assert ex.plan([y], [r]) is ex.plan([y], [r])


def test_partial_execution_from_a_cut_equals_the_full_run():
    g, x, c, r, d, y = chain()
    a = randn(2, 3, 5, 5, seed=4)
    full = Executor(g).run({x: a}, keep=[r])
    calls = []

    def spy(node, args):
        calls.append(node.name)
        return float_node_fn(node, args)

    part = Executor(g, spy).run({r: full[r]}, outputs=[y])
    assert calls == ["conv2", "add"]
    np.testing.assert_array_equal(part[y], full[y])


def test_feeding_a_modified_cut_value_changes_only_the_suffix():
    g, x, c, r, d, y = chain()
    zeros = np.zeros((2, 4, 5, 5), np.float32)
    out = Executor(g).run({r: zeros}, outputs=[y])[y]
    np.testing.assert_array_equal(out, zeros)  # conv2(0) + 0 with no bias


def test_intermediates_are_released_after_their_last_use_unless_kept():
    g, x, c, r, d, y = chain()
    a = randn(2, 3, 5, 5, seed=5)

    def watcher(alive_at_add):
        refs = {}

        def fn(node, args):
            if node.name == "add":
                alive_at_add.update({k: ref() is not None for k, ref in refs.items()})
            outs = float_node_fn(node, args)
            refs[node.name] = weakref.ref(outs[0])
            return outs
        return fn

    alive = {}
    res = Executor(g, watcher(alive)).run({x: a})
    assert set(res) == {y}
    # conv1's output is dead once relu ran; relu's is still read by add
    assert alive == {"conv1": False, "relu": True, "conv2": True}
    alive = {}
    res = Executor(g, watcher(alive)).run({x: a}, keep=[c, r])
    assert set(res) == {y, c, r} and alive["conv1"]
    np.testing.assert_array_equal(res[r], np.maximum(res[c], 0))


def test_node_fn_hook_replaces_every_kernel_call():
    g, x, c, r, d, y = chain()
    a = randn(2, 3, 5, 5, seed=6)

    def doubled(node, args):
        return tuple(2 * o for o in float_node_fn(node, args))

    plain = Executor(g).run({x: a}, keep=[r, d])
    hooked = Executor(g, doubled).run({x: a}, keep=[r])
    # conv1 and relu double (2 relu), conv2 of 4r doubles again (8 d), add doubles the sum
    np.testing.assert_allclose(hooked[r], 4 * plain[r], rtol=1e-6)
    np.testing.assert_allclose(hooked[y], 2 * (8 * plain[d] + 4 * plain[r]), rtol=1e-5, atol=1e-5)


def test_missing_input_names_the_tensor():
    g, x, c, r, d, y = chain()
    with pytest.raises(DataError, match="'x'"):
        Executor(g).run({}, outputs=[y])


def test_unsupported_operator_names_the_node():
    b = GraphBuilder()
    x = b.input("x", [1, 2])
    g = b.output(b.op("NoSuchOp", [x], name="weird"))
    with pytest.raises(UnsupportedOpError, match="'weird'.*NoSuchOp"):
        Executor(g).run({"x": np.zeros((1, 2), np.float32)})


def test_kernel_failure_names_the_node_and_the_shapes():
    b = GraphBuilder()
    x = b.input("x", [2, 3])
    w = b.const("w", randn(4, 5, seed=1))
    g = b.output(b.op("MatMul", [x, w], name="mm"))
    with pytest.raises(CompilerError, match=r"'mm' \(MatMul\).*\(2, 3\), \(4, 5\)"):
        Executor(g).run({"x": np.zeros((2, 3), np.float32)})


def test_constant_output_is_returned():
    b = GraphBuilder()
    b.input("x", [1])
    k = b.const("k", np.arange(3, dtype=np.float32))
    g = b.output(k)
    res = Executor(g).run({"x": np.zeros(1, np.float32)})
    np.testing.assert_array_equal(res[k], np.arange(3, dtype=np.float32))


def test_batches_cover_every_row_once():
    assert [(s.start, s.stop) for s in batches(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    assert list(batches(0, 4)) == []


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_run_batched_equals_one_run(batch_size):
    g, x, c, r, d, y = chain()
    a = randn(7, 3, 5, 5, seed=7)
    g.inputs[0].shape = [7, 3, 5, 5]
    whole = Executor(g).run({x: a}, keep=[r])
    out_y, out_r = run_batched(g, a, batch_size=batch_size, outputs=[y, r])
    np.testing.assert_allclose(out_y, whole[y], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out_r, whole[r], rtol=1e-6, atol=1e-6)
    (by_name,) = run_batched(g, {"x": a}, batch_size=batch_size)
    np.testing.assert_allclose(by_name, whole[y], rtol=1e-6, atol=1e-6)
