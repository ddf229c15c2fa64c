"""serialize-residual: residual blocks become plain chains (SRN) that compute the same function."""
from __future__ import annotations

import numpy as np
import pytest

import mpqc
from mpqc.compiler.export import to_onnx
from mpqc.compiler.passes import PassContext, PassManager
from mpqc.compiler.pipelines import make_pass
from mpqc.core.errors import CompilerError, PassError
from mpqc.core.qformat import QFormat

from tests.conftest import bench_path
from tests.graphs import GraphBuilder, conv, ops, randn, rel_err, run_float, run_ort, set_shapes


def block(relu_input: bool = True, projection: bool = False):
    """stem conv [-> relu] -> (c1 -> relu -> c2) + shortcut -> relu -> head."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 8, 8])
    s = conv(b, x, 3, 4, "stem", seed=1)
    xin = b.op("Relu", [s], name="stem_relu") if relu_input else s
    cout = 6 if projection else 4
    h = b.op("Relu", [conv(b, xin, 4, 5, "c1", seed=2)], name="r1")
    c2 = conv(b, h, 5, cout, "c2", seed=3)
    sc = conv(b, xin, 4, cout, "sc", k=1, seed=4, pads=[0, 0, 0, 0]) if projection else xin
    y = b.op("Relu", [b.op("Add", [c2, sc], name="add")], name="out_relu")
    g = b.output(conv(b, y, cout, 2, "head", k=1, seed=5))
    set_shapes(g)
    return g


def run(g, spec: str, ctx: PassContext | None = None):
    ctx = ctx or PassContext()
    PassManager([make_pass(spec.split("{")[0], _opts(spec))]).run(g, ctx)
    g.verify()
    return ctx


def _opts(spec: str) -> dict:
    if "{" not in spec:
        return {}
    return dict(kv.split("=") for kv in spec[spec.index("{") + 1:-1].split(","))


@pytest.mark.parametrize("projection", [False, True])
def test_block_becomes_a_chain_with_the_same_outputs(projection):
    g = block(projection=projection)
    before = to_onnx(g)
    ctx = run(g, "serialize-residual")
    assert ops(g) == ["Conv", "Relu", "Conv", "Relu", "Conv", "Relu", "Conv"]
    cout = 6 if projection else 4
    c1, c2 = g.node_by_name("c1"), g.node_by_name("c2")
    assert c1.weight.shape == (5 + 4, 4, 3, 3) and c2.weight.shape == (cout, 5 + 4, 3, 3)
    # the carried channels are Dirac kernels at the centre tap with zero bias
    np.testing.assert_array_equal(c1.weight.const[5:, :, 1, 1], np.eye(4, dtype=np.float32))
    assert c1.weight.const[5:].sum() == 4 and not c1.bias.const[5:].any()  # nothing off the centre tap
    sec = ctx.section("serialize-residual")
    assert sec["serialized"] == ["add"] and sec["refused"] == []
    # MACs after: stem 4*3*9, c1 9*4*9, c2 cout*9*9, head 2*cout, per 8x8 position
    assert sec["after"]["macs"] == 64 * (4 * 3 * 9 + 9 * 4 * 9 + cout * 9 * 9 + 2 * cout)
    xs = np.abs(randn(5, 3, 8, 8, seed=6))
    want = run_ort(before, {"x": xs})[0]
    assert rel_err(run_ort(g, {"x": xs})[0], want) < 1e-5
    assert rel_err(run_float(g, {"x": xs})[0], want) < 1e-5


def test_block_with_a_possibly_negative_input_is_left_and_reported():
    g = block(relu_input=False)
    before = g.summary()
    ctx = run(g, "serialize-residual")
    assert g.summary() == before
    (ref,) = ctx.section("serialize-residual")["refused"]
    assert ref["block"] == "add" and "may be negative" in ref["reason"]
    with pytest.raises(CompilerError, match=r"\[serialize-residual\].*Add node 'add'.*may be negative") as e:
        run(block(relu_input=False), "serialize-residual{strict=true}")
    assert "\n" not in str(e.value)


def test_requires_a_float_network_with_batchnorm_folded():
    g = block()
    g.node_by_name("c1").outputs[0].qformat = QFormat(8, 4)
    with pytest.raises(PassError, match=r"\[serialize-residual\] needs a float network"):
        run(g, "serialize-residual")


def test_real_resnet_serialized_equals_the_original():
    path = bench_path("digits_resnet.onnx")
    x = np.load(bench_path("digits.npz"))["x_test"][:64]
    g = mpqc.load(path)
    ctx = PassContext()
    PassManager([make_pass(n) for n in ("fold-batchnorm", "serialize-residual")]).run(g, ctx)
    assert len(ctx.section("serialize-residual")["serialized"]) == 3 and "Add" not in ops(g)
    (want,) = run_ort(str(path), {g.inputs[0].name: x})
    assert rel_err(run_ort(g, {g.inputs[0].name: x})[0], want) < 1e-4
    assert rel_err(run_float(g, {g.inputs[0].name: x})[0], want) < 1e-4
