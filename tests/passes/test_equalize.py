"""equalize: cross-layer equalization (power-of-two aware and Nagel's range rule), ReLU6 through
per-channel Clip bounds, checked against onnxruntime on the original network."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.driver import compile_model
from mpqc.compiler.equalize import equalize, find_chains, pow2_scales, wasted_bits
from mpqc.compiler.export import to_onnx
from mpqc.compiler.frontend import from_onnx
from mpqc.compiler.lowering import run_emulator
from mpqc.compiler.pipelines import pipeline_spec
from mpqc.compiler.targets import get_target
from tests.graphs import GraphBuilder, conv, conv_pool_fc, ops, randn, rel_err, run_float, run_ort, run_pass, set_shapes
from tests.test_o1_models import ort_outputs


def relu6(b: GraphBuilder, x, name: str):
    return b.op("Clip", [x, b.const(name + "_lo", np.array(0, np.float32)),
                         b.const(name + "_hi", np.array(6, np.float32))], name=name)


def separable(residual: bool = False, side: bool = False):
    """conv 3x3 (4 -> 6) -> ReLU6 -> depthwise 3x3 -> Relu -> conv 1x1 (6 -> 5) [-> + shortcut]."""
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 6, 6])
    c1 = conv(b, x, 4, 6, "c1", seed=1)
    a1 = relu6(b, c1, "r6")
    dw = b.op("Conv", [a1, b.const("dw_w", randn(6, 1, 3, 3, seed=2, scale=0.7)),
                       b.const("dw_b", randn(6, seed=3, scale=0.1))], name="dw", pads=[1, 1, 1, 1], group=6)
    a2 = b.op("Relu", [dw], name="relu")
    c3 = conv(b, a2, 6, 5, "c3", k=1, seed=4)
    outs = [c3]
    if residual:
        c4 = conv(b, c3, 5, 5, "c4", k=1, seed=5)
        outs = [b.op("Add", [c4, c3], name="add")]
    if side:
        outs.append(b.op("Sigmoid", [a2], name="side"))
    g = b.output(*outs)
    set_shapes(g)
    return g


def feed(n: int = 3, seed: int = 9, scale: float = 3.0):
    return {"x": randn(n, 4, 6, 6, seed=seed, scale=scale)}


def test_pow2_aligns_every_filter_and_keeps_the_function():
    g = separable()
    before = to_onnx(g)
    w1 = g.nodes[0].weight.const.astype(np.float64).reshape(6, -1)
    s1 = pow2_scales(w1, 8) / 2.0  # direction=down: every channel shrinks into its boundary
    assert np.all((s1 >= 0.5) & (s1 < 1.0))
    res = run_pass(g, "equalize", direction="down")
    assert res.modified is True and res.info == {"chains": 2}
    assert ops(g) == ["Conv", "Clip", "Conv", "Relu", "Conv"]
    c1, clip, dw, _, c3 = g.nodes
    # the first conv's filters: scaled by s1, each largest weight exactly 127 * 2^-n
    np.testing.assert_allclose(c1.weight.const.reshape(6, -1), (w1 * s1[:, None]).astype(np.float32), rtol=1e-7)
    top = np.abs(c1.weight.const.astype(np.float64)).reshape(6, -1).max(1)
    k = np.log2(top / 127)
    np.testing.assert_allclose(k, np.round(k), atol=1e-6)
    assert wasted_bits(c1.weight.const.reshape(6, -1), 8) < 1e-6
    assert wasted_bits(dw.weight.const.reshape(6, -1), 8) < 1e-6
    # ReLU6's upper bound follows each channel; its lower bound 0 stays a scalar
    assert clip.inputs[1].const.shape == () and float(clip.inputs[1].const) == 0.0
    assert clip.inputs[2].const.shape == (6, 1, 1)
    np.testing.assert_allclose(clip.inputs[2].const.reshape(-1), (6 * s1).astype(np.float32), rtol=1e-7)
    # the last conv reads scaled channels: its input columns are divided back
    f = feed()
    want = run_ort(before, f)[0]
    assert rel_err(run_float(g, f)[0], want) < 1e-5
    assert rel_err(run_ort(g, f)[0], want) < 1e-5  # exported with Max/Min for the per-channel Clip


def test_per_channel_clip_exports_as_max_min_and_imports_as_one_clip():
    g = separable()
    run_pass(g, "equalize", direction="down")
    model = to_onnx(g)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Max", "Min", "Conv", "Relu", "Conv"]
    back = from_onnx(model)
    assert ops(back) == ["Conv", "Clip", "Conv", "Relu", "Conv"]
    clip = back.nodes[1]
    assert clip.name == "r6" and clip.inputs[2].const.shape == (6, 1, 1)
    f = feed()
    assert rel_err(run_float(back, f)[0], run_float(g, f)[0]) == 0.0


def test_refused_layers_say_why():
    g = separable(residual=True, side=True)
    chains, refused = find_chains(g)
    assert [c.producer.name for c in chains] == ["c1"]
    assert "Sigmoid node 'side'" in refused["dw"]
    assert "Add node 'add'" in refused["c3"] and "Add node 'add'" in refused["c4"]
    rep = equalize(g, direction="down")
    assert [r["layer"] for r in rep["chains"]] == ["c1"]
    assert {r["layer"] for r in rep["not_equalized"]} == {"dw", "c3", "c4"}


def test_range_mode_makes_both_ranges_equal():
    b = GraphBuilder()
    x = b.input("x", ["N", 4, 6, 6])
    r = b.op("Relu", [conv(b, x, 4, 6, "c1", seed=1)], name="r")
    g = b.output(conv(b, r, 6, 5, "c2", k=1, seed=2))
    set_shapes(g)
    before = to_onnx(g)
    r1 = np.abs(g.nodes[0].weight.const).reshape(6, -1).max(1)
    r2 = np.abs(g.nodes[2].weight.const).reshape(5, 6).max(0)
    run_pass(g, "equalize", mode="range", iterations=1)
    n1 = np.abs(g.nodes[0].weight.const).reshape(6, -1).max(1)
    n2 = np.abs(g.nodes[2].weight.const).reshape(5, 6).max(0)
    np.testing.assert_allclose(n1, np.sqrt(r1 * r2), rtol=1e-6)
    np.testing.assert_allclose(n2, np.sqrt(r1 * r2), rtol=1e-6)
    f = feed()
    assert rel_err(run_float(g, f)[0], run_ort(before, f)[0]) < 1e-5


def test_auto_direction_grows_only_channels_below_the_tensor_maximum():
    g = separable()
    x = feed(8, seed=3, scale=0.3)["x"]  # small inputs: ReLU6 never saturates
    from mpqc.compiler.equalize import channel_maxima
    chains = find_chains(g)[0]
    m = channel_maxima(g, chains, x)[id(chains[0].producer)]
    s = pow2_scales(g.nodes[0].weight.const.astype(np.float64).reshape(6, -1), 8)
    grow = m * s <= m.max()
    rep = equalize(g, calib=x)
    row = rep["chains"][0]
    assert rep["data"] is True
    assert row["grown"] == int(np.sum(grow & (s > 1))) and row["grown"] + row["shrunk"] <= 6
    assert row["grown"] >= 1
    m2 = channel_maxima(g, find_chains(g)[0], x)[id(g.nodes[0])]
    assert m2.max() <= m.max() * (1 + 1e-6)  # the tensor's range did not grow


def test_through_flatten_into_gemm():
    g = conv_pool_fc(("c", "r", "p", "f", "fc"), fc_seed=2)
    before = to_onnx(g)
    rep = equalize(g, direction="down")
    assert rep["chains"][0]["consumers"] == ["fc"] and rep["chains"][0]["through"] == ["Relu", "MaxPool", "Flatten"]
    fd = {"x": randn(2, 3, 4, 4, seed=4)}
    assert rel_err(run_float(g, fd)[0], run_ort(before, fd)[0]) < 1e-5


def test_emulator_equals_onnxruntime_with_per_channel_relu6():
    """choose-formats + insert-qdq after equalization: the accumulator clamp per channel (folded into the
    requantization) gives exactly what onnxruntime's Max/Min -> QuantizeLinear gives."""
    g = separable()
    x = feed(16, seed=5, scale=4.0)["x"]  # large inputs: ReLU6 saturates in every channel
    res = compile_model(g, level=1, target="npu8", calib=(x, None),
                        passes="equalize{direction=down},choose-formats,insert-qdq")
    clip = next(n for n in res.graph.nodes if n.op_type == "Clip" and n.inputs[2] is not None
                and n.inputs[2].const.ndim == 3)
    assert clip.name == "r6"
    xt = feed(16, seed=6, scale=4.0)["x"]
    emu, ref = run_emulator(res.graph, xt), ort_outputs(res.onnx_bytes(), xt)
    assert np.array_equal(emu, ref)
    # the export writes the per-channel Clip as Max then Min
    assert "Max" in res.onnx_bytes().decode("latin1") and "Min" in res.onnx_bytes().decode("latin1")


def test_levels_run_it_with_the_equalize_flag():
    from mpqc.core.errors import OptionError
    assert not any(s.startswith("equalize") for lv in (1, 2, 3) for s in pipeline_spec(lv, get_target("npu8")))
    spec = pipeline_spec(2, get_target("npu4"), equalize=True)
    assert spec[spec.index("equalize") + 1] == "choose-formats{start=ladder}"
    assert "equalize{mode=range}" in pipeline_spec(1, get_target("ort-int8"), equalize=True)
    with pytest.raises(OptionError, match="--equalize needs a quantizing level"):
        pipeline_spec(0, None, equalize=True)


def test_cli_flag_and_its_conflict_with_passes(tmp_path):
    g = separable()
    x = feed(8)["x"]
    res = compile_model(g, level=1, target="npu8", calib=(x, None), options={"equalize": True})
    assert res.report["passes"]["equalize"]["chains"][0]["layer"] == "c1"
    from mpqc.core.errors import OptionError
    with pytest.raises(OptionError, match="--equalize/--no-equalize choose a level's pipeline"):
        compile_model(separable(), level=1, target="npu8", calib=(x, None), options={"equalize": True},
                      passes="choose-formats,insert-qdq")


def test_refuses_a_quantized_graph_and_bad_options():
    from mpqc.core.errors import OptionError, PassError
    g = separable()
    with pytest.raises(OptionError, match="bits=1"):
        run_pass(g, "equalize", bits=1)
    res = compile_model(g, level=1, target="npu8", calib=(feed(4)["x"], None),
                        passes="choose-formats")
    from mpqc.compiler.passes import PassContext, check_requires
    from mpqc.compiler.pipelines import make_pass
    with pytest.raises(PassError, match=r"\[equalize\] needs a float network"):
        check_requires(make_pass("equalize"), res.graph, PassContext())


@pytest.mark.slow
def test_efficientnet_lite0_function_unchanged_and_grid_filled(bench):
    import mpqc
    g = mpqc.load(bench / "efficientnet_lite0.onnx")
    x = np.load(bench / "photos.npz")["x_test"][:2].astype(np.float32)
    want = mpqc.run(g, x)
    rep = equalize(g, calib=x)
    assert len(rep["chains"]) == 35  # every expand, depthwise, stem and head conv; not the project convs
    assert all(r["wasted_bits_after"] < 1e-6 < r["wasted_bits_before"] for r in rep["chains"])
    assert sum(1 for n in g.nodes if n.op_type == "Clip" and n.inputs[2].const.ndim == 3) == 33
    assert rel_err(mpqc.run(g, x), want) < 1e-4
