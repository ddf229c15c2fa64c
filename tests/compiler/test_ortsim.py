"""The onnxruntime simulation engine (compiler/ortsim.py): its quantization chains round bit for bit as
the numpy engine's ``fake_quant_act``/``fake_quant`` do (ties included), and the fake-quantized networks
it runs agree with the numpy engine and with the integer emulator; same outputs for any --jobs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mpqc.compiler.bitsearch import search_context
from mpqc.compiler.data import Dataset
from mpqc.compiler.frontend import load_graph
from mpqc.compiler.lowering import run_emulator
from mpqc.compiler.ortsim import _Builder, run_session, supported
from mpqc.compiler.passes import PassContext, PassManager
from mpqc.compiler.pipelines import build_pipeline, parse_pipeline
from mpqc.compiler.quant import BitConfig, config_from_ir
from mpqc.compiler.quantsim import QuantSim
from mpqc.compiler.targets import get_target
from mpqc.core.errors import OptionError
from mpqc.core.qformat import QFormat, fake_quant
from mpqc.runtime.fakequant import fake_quant_act
from tests.conftest import bench_path
from tests.graphs import GraphBuilder, randn


def run_chain(fmt: QFormat, rounding: str, x: np.ndarray) -> np.ndarray:
    b = _Builder()
    b.chain("x", fmt, rounding, x.ndim, "y")
    g = helper.make_graph(b.nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def tie_heavy(shape, frac, seed=0):
    """Values on the half-LSB grid of ``frac`` (every other one a tie), beyond the range, and random."""
    rng = np.random.default_rng(seed)
    half = rng.integers(-700, 700, size=shape).astype(np.float32) * np.float32(2.0 ** -(frac + 1))
    noise = rng.standard_normal(shape).astype(np.float32) * np.float32(4.0)
    return np.where(rng.random(shape) < 0.7, half, noise).astype(np.float32)


@pytest.mark.parametrize("rounding", ["half-even", "half-up"])
@pytest.mark.parametrize("fmt", [QFormat(8, 4), QFormat(4, 2), QFormat(2, 0), QFormat(8, 5, signed=False),
                                 QFormat(16, 10), QFormat(8, (3, 4, 6), axis=1), QFormat(6, (1, 2, 0), axis=1)],
                         ids=str)
def test_chain_rounds_bit_for_bit_as_the_numpy_engine(fmt, rounding):
    frac = max(np.atleast_1d(fmt.frac_array()))
    x = tie_heavy((5, 3, 4, 4), int(frac))
    ref = fake_quant_act(x, fmt, rounding)
    got = run_chain(fmt, rounding, x)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.int32), ref.view(np.int32))
    if rounding == "half-up":
        assert np.array_equal(got, fake_quant(x, fmt))


def test_float_scale_chain_is_quantize_dequantize_linear():
    fmt = QFormat(8, 0, fscale=0.037, zero_point=-5)
    x = tie_heavy((64,), 5)
    assert np.array_equal(run_chain(fmt, "half-even", x), fake_quant(x, fmt))


def test_wide_formats_stay_on_the_numpy_engine():
    assert supported(QFormat(16, 3)) and supported(None) and not supported(QFormat(24, 3))


# ----------------------------------------------------------------------- a tiny network, by hand
def tiny():
    b = GraphBuilder("tiny")
    x = b.input("x", ["N", 2, 6, 6])
    y = b.op("Conv", [x, b.const("w1", randn(4, 2, 3, 3, seed=1)), b.const("b1", randn(4, seed=2))],
             name="conv1", pads=[1, 1, 1, 1])
    y = b.op("Relu", [y])
    z = b.op("Conv", [y, b.const("w2", randn(4, 1, 3, 3, seed=3))], name="dw", group=4, strides=[2, 2],
             pads=[1, 1, 1, 1])
    z = b.op("Clip", [z, b.const("lo", np.float32(0)), b.const("hi", np.float32(6))])
    p = b.op("GlobalAveragePool", [z])
    f = b.op("Flatten", [p])
    o = b.op("Gemm", [f, b.const("w3", randn(3, 4, seed=4)), b.const("b3", randn(3, seed=5))], name="fc", transB=1)
    return b.output(o)


def tiny_search(engine="onnxruntime"):
    g = tiny()
    x = randn(40, 2, 6, 6, seed=9)
    ctx = PassContext(target=get_target("npu4"), batch_size=16)
    ctx.calib = Dataset(x[:20], None, "calib")
    ctx.eval = Dataset(x[20:], None, "eval")
    PassManager(parse_pipeline("choose-formats{start=ladder}")).run(g, ctx)
    return g, x, search_context(g, ctx, metric="agreement", bias_correction=True)


@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (4, 4), (2, 4)])
def test_tiny_network_equals_the_numpy_engine(bits):
    g, x, sctx = tiny_search()
    sim = sctx.sim
    cfg = BitConfig.uniform(sim.plan.layers, *bits)
    assert sim.engine == "onnxruntime" and sim.ort_session(cfg) is not None
    got = sim.run(cfg, x, batch_size=16)[0]
    sim.engine = "numpy"
    ref = sim.run(cfg, x, batch_size=16)[0]
    # the output format's LSB: float32 convolutions may add in another order than numpy's BLAS
    lsb = 2.0 ** -np.max(sctx.table.formats(cfg)[g.outputs[0]].frac_array())
    assert np.max(np.abs(got - ref)) <= lsb
    assert np.mean(got == ref) > 0.9


def test_partial_run_from_a_cut_equals_the_numpy_suffix():
    g, x, sctx = tiny_search()
    sim = sctx.sim
    cfg = BitConfig.uniform(sim.plan.layers, 4, 8)
    relu_out = next(n for n in g.nodes if n.op_type == "Relu").outputs[0]
    mid = sim.executor(cfg).run({g.inputs[0]: x}, [relu_out])[relu_out]
    ref = sim.executor(cfg).run({relu_out: mid}, [g.outputs[0]])[g.outputs[0]]
    sess = sim.ort_session(cfg, inputs=[relu_out], outputs=[g.outputs[0]])
    got = run_session(sess, {relu_out: mid}, [g.outputs[0]])[0]
    assert np.max(np.abs(got - ref)) <= 2.0 ** -np.max(sctx.table.formats(cfg)[g.outputs[0]].frac_array())
    # the suffix model holds only the nodes after the cut
    m = sim._ort.build(*sim.spec(cfg), sim.rounding, inputs=[relu_out], outputs=[g.outputs[0]])
    ops = {n.op_type for n in m.graph.node}
    assert "Relu" not in ops and [i.name for i in m.graph.input] == [relu_out.name]


def test_sessions_are_kept_per_config_and_evicted():
    g, x, sctx = tiny_search()
    sim = sctx.sim
    a = BitConfig.uniform(sim.plan.layers, 8, 8)
    s1 = sim.ort_session(a)
    assert sim.ort_session(a) is s1 and sim._ort.built == 1
    for w in (4, 2):
        for act in (8, 4):
            sim.ort_session(BitConfig.uniform(sim.plan.layers, w, act))
    assert sim._ort.built == 5 and len(sim._ort._sessions) == sim._ort.max_sessions


def test_unknown_engine_is_refused():
    g, x, sctx = tiny_search()
    with pytest.raises(OptionError, match="simulation engine"):
        QuantSim(sctx.plan, sctx.table, engine="torch")


# ----------------------------------------------------------------------- the real models
def real_search(name, target, n):
    data = np.load(bench_path("photos.npz" if name.startswith("efficientnet") else "digits.npz"))
    xc = data["x_calib"][:n].astype(np.float32)
    xe = data["x_eval"][:n].astype(np.float32)
    g = load_graph(bench_path(f"{name}.onnx"))
    ctx = PassContext(target=get_target(target), batch_size=16)
    ctx.calib, ctx.eval = Dataset(xc, None, "calib"), Dataset(xe, None, "eval")
    pipe = build_pipeline(2, get_target(target))
    PassManager(pipe[:[p.name for p in pipe].index("layer-influence")]).run(g, ctx)
    return g, xe, search_context(g, ctx, metric="agreement", bias_correction=True)


def check_engines(name, target, n, configs, lsbs=2, equal=0.8):
    """Both engines on the same networks: outputs within ``lsbs`` LSB of the output format (a float32
    sum that lands on the other side of a rounding tie changes one code, which later layers can carry),
    the same top-1 everywhere, at least ``equal`` of the elements equal."""
    g, xe, sctx = real_search(name, target, n)
    sim = sctx.sim
    for cfg in configs(sim):
        got = sim.run(cfg, xe, batch_size=16)[0]
        assert np.array_equal(got, sim.run(cfg, xe, batch_size=16, jobs=2)[0])  # --jobs: same outputs
        sim.engine = "numpy"
        ref = sim.run(cfg, xe, batch_size=16)[0]
        sim.engine = "onnxruntime"
        lsb = 2.0 ** -np.max(sctx.table.formats(cfg)[g.outputs[0]].frac_array())
        assert np.max(np.abs(got - ref)) <= lsbs * lsb and np.mean(got == ref) > equal
        assert np.array_equal(got.argmax(1), ref.argmax(1))
    return g, xe, sctx


def test_digits_resnet_engines_agree_and_match_the_emulator():
    g, xe, sctx = check_engines("digits_resnet", "npu4", 64, lambda sim: [
        config_from_ir(sim.plan), BitConfig.uniform(sim.plan.layers, 4, 8), BitConfig.uniform(sim.plan.layers, 2, 4)])


@pytest.mark.slow
def test_efficientnet_engines_agree():
    check_engines("efficientnet_lite0", "npu8", 16, lambda sim: [config_from_ir(sim.plan)], lsbs=4, equal=0.5)  # 16 blocks deep: 68% equal measured


def test_o2_score_is_the_emulators_with_the_onnxruntime_engine():
    """The search (onnxruntime engine) scores the network the emulator runs, sample for sample."""
    from mpqc.compiler.driver import compile_model
    d = np.load(bench_path("digits.npz"))
    res = compile_model(bench_path("digits_resnet.onnx"), level=2, target="npu4",
                        calib=(d["x_calib"], d["y_calib"]), eval=(d["x_eval"][:120], d["y_eval"][:120]),
                        options={"max_drop": 0.02, "strategy": "min-influence"})
    sec = res.report["passes"]["assign-bit-widths"]
    emu = run_emulator(res.graph, d["x_eval"][:120])
    acc = float(np.mean(np.argmax(emu, 1) == d["y_eval"][:120]))
    assert acc == pytest.approx(sec["final_value"], abs=1e-9)


def test_sweep_suffixes_on_onnxruntime_equal_the_numpy_engine():
    """The influence sweep's suffix runs (fed the prefix's tensors at each cut) on both engines."""
    from mpqc.compiler.influence import cut_positions, stream_order, sweep
    g, x, sctx = tiny_search()
    sim = sctx.sim
    hi = BitConfig.uniform(sim.plan.layers, 8, 8)
    lo = BitConfig.uniform(sim.plan.layers, 2, 4)
    cuts = [(c, hi) for c in cut_positions(sim.plan, stream_order(sim.plan))]
    got = sweep(sim, x, lo, cuts, batch_size=16)
    assert np.array_equal(got[0], sweep(sim, x, lo, cuts, batch_size=16, jobs=2)[0])
    sim.engine = "numpy"
    ref = sweep(sim, x, lo, cuts, batch_size=16)
    lsb = 2.0 ** -np.max(sctx.table.formats(hi)[g.outputs[0]].frac_array())
    for a, b in zip(got, ref):
        assert np.max(np.abs(a - b)) <= lsb
