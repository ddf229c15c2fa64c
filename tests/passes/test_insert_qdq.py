"""insert-qdq: exact QDQ structure, scales, integer constants, containers, ONNX checker and
onnxruntime execution (equal to the emulator), report contents, negative cases."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mpqc.compiler.data import Dataset
from mpqc.core.errors import OptionError, PassError
from mpqc.compiler.export import to_onnx
from mpqc.compiler.passes import PassContext, PassManager
from mpqc.compiler.pipelines import parse_pipeline
from mpqc.core.qformat import QFormat
from mpqc.compiler.targets import get_target
from mpqc.compiler.qdq import dequantized_view
from mpqc.passes.insert_qdq import InsertQDQPass
from mpqc.compiler.lowering import run_emulator
from mpqc.runtime.executor import run_batched
from mpqc.runtime.fakequant import ir_node_fn
from tests.graphs import GraphBuilder, ops, randn


def small_net():
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm (5 nodes)."""
    b = GraphBuilder("net", opset=17)
    x = b.input("x", ["N", 2, 6, 6])
    y = b.op("Conv", [x, b.const("w", randn(3, 2, 3, 3, seed=1, scale=0.4)), b.const("b", randn(3, seed=2))],
             name="conv", pads=[1, 1, 1, 1])
    y = b.op("Relu", [y], name="relu")
    y = b.op("GlobalAveragePool", [y], name="gap")
    y = b.op("Flatten", [y], name="flat")
    y = b.op("Gemm", [y, b.const("fw", randn(4, 3, seed=3)), b.const("fb", randn(4, seed=4, scale=0.1))],
             name="fc", transB=1)
    return b.output(y)


def calib(n=32, seed=0):
    return Dataset(randn(n, 2, 6, 6, seed=seed), None, "random")


def compile_small(target="npu8", passes="choose-formats,insert-qdq", graph=None):
    g = graph if graph is not None else small_net()
    ctx = PassContext(target=get_target(target), calib=calib())
    PassManager(parse_pipeline(passes), verify_each=True).run(g, ctx)
    return g, ctx


def ort_session(g, fused=False):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not fused:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(to_onnx(g).SerializeToString(), so, providers=["CPUExecutionProvider"])


def const_in(node, i):
    v = node.inputs[i]
    assert v.is_const
    return v.const


def test_structure_scales_and_integer_constants():
    g0 = small_net()
    ctx = PassContext(target=get_target("npu8"), calib=calib())
    PassManager(parse_pipeline("choose-formats")).run(g0, ctx)
    fmts = {v.name: v.qformat for v in g0.values() if v.qformat is not None}
    qc = {n.name: n.qconfig for n in g0.nodes if n.qconfig is not None}
    res = InsertQDQPass().run(g0, ctx)
    g = g0
    g.verify()
    assert res.modified is True
    assert ops(g) == ["QuantizeLinear", "DequantizeLinear",  # input point
                      "DequantizeLinear", "DequantizeLinear", "Conv", "Relu",  # weights, bias, fused Relu
                      "QuantizeLinear", "DequantizeLinear",  # layer output (after the Relu)
                      "GlobalAveragePool", "QuantizeLinear", "DequantizeLinear",  # arith point
                      "Flatten", "QuantizeLinear", "DequantizeLinear",  # layout point (same format)
                      "DequantizeLinear", "DequantizeLinear", "Gemm", "QuantizeLinear", "DequantizeLinear"]
    assert g.opset == 21 and g.metadata["mpqc.rounding"] == "half-even" and g.metadata["mpqc.target"] == "npu8"
    # activations: scale 2^-n, zero point 0 in int8 (signed) or uint8 (after the Relu)
    for q in (n for n in g.nodes if n.op_type == "QuantizeLinear"):
        src = q.inputs[0]
        f = fmts[src.name] if src.name in fmts else fmts[src.name.replace("_float", "")]
        assert float(const_in(q, 1)) == 2.0 ** -int(f.frac)
        zp = const_in(q, 2)
        assert zp.dtype == (np.int8 if f.signed else np.uint8) and int(zp) == 0
    relu_q = g.node_by_name("relu_out_QuantizeLinear")
    assert const_in(relu_q, 2).dtype == np.uint8
    # conv weights: int8 per output channel (axis 0), the integers of the chosen format
    conv = g.node_by_name("conv")
    wdq = conv.inputs[1].producer
    wf = qc["conv"].weight_format
    assert wdq.op_type == "DequantizeLinear" and wdq.attrs == {"axis": 0}
    wq = const_in(wdq, 0)
    assert wq.dtype == np.int8
    ws = const_in(wdq, 1)
    assert ws.tolist() == [2.0 ** -int(f) for f in wf.frac]
    w = randn(3, 2, 3, 3, seed=1, scale=0.4).astype(np.float64)
    expect = np.clip(np.floor(w * 2.0 ** np.asarray(wf.frac).reshape(3, 1, 1, 1) + 0.5), -128, 127)
    assert np.array_equal(wq, expect)
    # bias: int32 at the accumulator's scale s_in * s_w
    bdq = conv.inputs[2].producer
    s_in = float(const_in(g.node_by_name("x_QuantizeLinear"), 1))
    assert const_in(bdq, 0).dtype == np.int32
    assert np.array_equal(const_in(bdq, 1), (s_in * ws).astype(np.float32)) and bdq.attrs == {"axis": 0}
    # Gemm with transB=1: weight [4, 3] per output channel along axis 0
    fdq = g.node_by_name("fc").inputs[1].producer
    assert fdq.attrs == {"axis": 0} and const_in(fdq, 1).shape == (4,)
    # the graph output keeps its name on the DequantizeLinear
    assert g.outputs[0].producer.op_type == "DequantizeLinear" and g.outputs[0].name == "fc_out"


def test_onnxruntime_runs_it_and_equals_the_emulator_and_the_simulator():
    g0 = small_net()
    ctx = PassContext(target=get_target("npu8"), calib=calib())
    PassManager(parse_pipeline("choose-formats")).run(g0, ctx)
    x = randn(16, 2, 6, 6, seed=9)
    sim = run_batched(g0, x, node_fn=ir_node_fn(g0))[0]  # fake quantization on the annotated IR
    InsertQDQPass().run(g0, ctx)
    model = to_onnx(g0)  # runs onnx.checker with full shape inference
    onnx.checker.check_model(model, full_check=True)
    out = ort_session(g0).run(None, {"x": x})[0]
    emu = run_emulator(g0, x)
    assert np.array_equal(out, emu)
    lsb = float(g0.outputs[0].qformat.scale())
    # the simulator rounds half up in float32; the integer network rounds half to even
    assert np.max(np.abs(sim - emu)) <= 2 * lsb
    assert np.array_equal(np.argmax(sim, 1), np.argmax(emu, 1))


def test_negative_cases_nothing_to_do():
    g = small_net()
    n_before = len(g.nodes)
    assert InsertQDQPass().run(g, PassContext(target=get_target("npu8"))).modified is False  # no formats
    assert len(g.nodes) == n_before and g.opset == 17
    g, ctx = compile_small()
    n = len(g.nodes)
    assert InsertQDQPass().run(g, ctx).modified is False  # already quantized: idempotent
    assert len(g.nodes) == n


def test_4bit_weights_stored_as_int4_and_4bit_activations_clamped_in_int8():
    g, _ = compile_small("npu4", "choose-formats{weight_bits=4,act_bits=4},insert-qdq")
    model = to_onnx(g)
    types = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    assert types["w_quantized"] == "INT4" and types["fw_quantized"] == "INT4" and types["b_quantized"] == "INT32"
    clips = [n for n in g.nodes if n.op_type == "Clip"]
    assert len(clips) == 5  # one per quantized activation: input, relu, gap, flatten, output
    for c in clips:
        lo, hi = const_in(c, 1), const_in(c, 2)
        assert c.inputs[0].producer.op_type == "QuantizeLinear"
        assert (lo.dtype, int(lo), int(hi)) in ((np.dtype(np.int8), -8, 7), (np.dtype(np.uint8), 0, 15))
    x = randn(8, 2, 6, 6, seed=5)
    out = ort_session(g).run(None, {"x": x})[0]
    assert np.array_equal(out, run_emulator(g, x))
    lsb = float(g.outputs[0].qformat.scale())
    q = np.rint(out / lsb)
    assert q.min() >= -8 and q.max() <= 7
    g2, _ = compile_small("npu4", "choose-formats{weight_bits=4,act_bits=4},insert-qdq{int4=false}")
    types2 = {t.name: t.data_type for t in to_onnx(g2).graph.initializer}
    assert types2["w_quantized"] == onnx.TensorProto.INT8


def test_2bit_weights_in_int8_containers_and_16bit_activations_in_int16():
    g, _ = compile_small("npu4", "choose-formats{weight_bits=2,act_bits=4},insert-qdq")
    wq = g.node_by_name("conv").inputs[1].producer.inputs[0].const
    assert wq.dtype == np.int8 and wq.min() >= -2 and wq.max() <= 1
    g, _ = compile_small("npu8", "choose-formats{weight_bits=8,act_bits=16},insert-qdq")
    zps = {n.outputs[0].name: const_in(n, 2).dtype for n in g.nodes if n.op_type == "QuantizeLinear"}
    assert zps["relu_out_quantized"] == np.uint16 and zps["x_quantized"] == np.int16
    assert not any(n.op_type == "Clip" for n in g.nodes)
    x = randn(8, 2, 6, 6, seed=6)
    assert np.array_equal(ort_session(g).run(None, {"x": x})[0], run_emulator(g, x))


def test_widths_without_container_are_refused():
    g = small_net()
    ctx = PassContext(target=get_target("npu8"), calib=calib())
    PassManager(parse_pipeline("choose-formats")).run(g, ctx)
    g.value_by_name("relu_out").qformat = QFormat(17, 3, False)
    with pytest.raises(PassError, match="relu_out.*17-bit"):
        InsertQDQPass().run(g, ctx)


def test_float_scale_target_exports_onnxruntime_scales():
    from onnxruntime.quantization.quant_utils import compute_scale_zp
    g0 = small_net()
    ctx = PassContext(target=get_target("ort-int8"), calib=calib())
    PassManager(parse_pipeline("choose-formats")).run(g0, ctx)
    from mpqc.compiler.ranges import ActivationRanges
    stats = ctx.analyses.get(ActivationRanges, g0)
    InsertQDQPass().run(g0, ctx)
    q = g0.node_by_name("x_QuantizeLinear")
    st = stats[g0.inputs[0]]
    zp, sc = compute_scale_zp(np.array(st.min, np.float32), np.array(st.max, np.float32), np.array(0, np.uint8),
                              np.array(255, np.uint8))
    assert float(const_in(q, 1)) == float(sc) and int(const_in(q, 2)) == int(zp)
    assert const_in(q, 2).dtype == np.uint8
    wdq = g0.node_by_name("conv").inputs[1].producer
    w = randn(3, 2, 3, 3, seed=1, scale=0.4)
    expect = (np.abs(w).reshape(3, -1).max(1).astype(np.float64) / 127).astype(np.float32)
    assert np.array_equal(const_in(wdq, 1), expect)
    assert g0.metadata["mpqc.rounding"] == "half-even"
    x = randn(8, 2, 6, 6, seed=7)
    out = ort_session(g0).run(None, {"x": x})[0]
    lsb = float(const_in(g0.outputs[0].producer, 1))
    assert np.max(np.abs(out - run_emulator(g0, x))) <= 2 * lsb * 1.0001


def test_rounding_option():
    g, _ = compile_small("npu8", "choose-formats,insert-qdq{rounding=half-up}")
    assert g.metadata["mpqc.rounding"] == "half-up"
    with pytest.raises(OptionError, match="float scales"):
        compile_small("ort-int8", "choose-formats,insert-qdq{rounding=half-up}")


def test_report_per_layer_and_totals():
    g, ctx = compile_small(passes="infer-shapes,choose-formats,insert-qdq")  # MACs need shapes
    rep = ctx.report["quantization"]
    layers = {l["layer"]: l for l in rep["layers"]}
    conv, fc = layers["conv"], layers["fc"]
    assert (conv["weight_bits"], conv["act_bits"], conv["fused_activation"]) == (8, 8, "Relu")
    assert conv["macs"] == 6 * 6 * 3 * 2 * 9 and fc["macs"] == 12
    assert conv["weight_bytes"] == 54 * 1 + 3 * 4 and fc["weight_bytes"] == 12 + 16
    assert conv["weight_sqnr_db"] > 30 and conv["act_sqnr_db"] > 30
    assert conv["act_format_text"].startswith("UQ")
    tensors = {t["tensor"]: t for t in rep["tensors"]}
    assert tensors["relu_out"]["kind"] == "layer" and tensors["gap_out"]["kind"] == "arith"
    assert tensors["flat_out"]["kind"] == "layout" and tensors["x"]["kind"] == "input"
    assert all(t["sqnr_db"] is not None for t in rep["tensors"])
    tot = rep["totals"]
    assert tot["weight_bytes"] == {"float": 4.0 * (54 + 3 + 12 + 4), "uniform_int8": 66.0 + 28.0,
                                   "quantized": 66.0 + 28.0}
    assert tot["weight_bytes_vs_int8"] == 1.0 and tot["mac_cost_vs_int8"] == 1.0
    sec = ctx.report["passes"]["insert-qdq"]
    assert sec["quantize_nodes"] == 5 and sec["dequantize_nodes"] == 9 and sec["weights"] == 2


def test_dequantized_view_sees_the_layers_again():
    g, _ = compile_small()
    v = dequantized_view(g)
    assert [n.op_type for n in v.nodes] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    assert [n.name for n in v.layers()] == ["conv", "fc"]
    assert v.outputs[0].name == "fc_out" and v.layers()[0].qconfig.weight_bits == 8
    w = v.layers()[0].weight.const
    wdq = g.node_by_name("conv").inputs[1].producer
    assert np.array_equal(w, const_in(wdq, 0).astype(np.float32) * const_in(wdq, 1).reshape(3, 1, 1, 1))
