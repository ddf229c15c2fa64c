"""choose-formats: Qm.n formats of every layer and tensor from calibration data, checked by hand."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.data import Dataset
from mpqc.core.errors import DataError, OptionError
from mpqc.compiler.passes import PassContext
from mpqc.compiler.pipelines import make_pass
from mpqc.compiler.targets import get_target
from mpqc.runtime.executor import Executor
from tests.graphs import GraphBuilder, randn


def net():
    """MatMul -> Relu -> Gemm (3 nodes)."""
    b = GraphBuilder("cf")
    x = b.input("x", ["N", 4])
    y = b.op("MatMul", [x, b.const("w", randn(4, 5, seed=1))], name="mm")
    r = b.op("Relu", [y], name="relu")
    z = b.op("Gemm", [r, b.const("fw", randn(3, 5, seed=2, scale=0.2)), b.const("fb", randn(3, seed=3))],
             name="fc", transB=1)
    return b.output(z)


def mse_best(x, bits, signed, n0):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    x = np.asarray(x, np.float64)
    errs = [(np.mean((np.clip(np.floor(x * 2.0 ** n + 0.5), lo, hi) / 2.0 ** n - x) ** 2), d != 0, n)
            for d, n in ((d, n0 + d) for d in (0, -1, 1, -2, 2))]
    return min(errs)[2]


def run(g, target="npu8", x=None, **opts):
    ctx = PassContext(target=get_target(target), calib=Dataset(x if x is not None else randn(64, 4, seed=4),
                                                               None, "calib"))
    res = make_pass("choose-formats", {k: str(v) for k, v in opts.items()}).run(g, ctx)
    g.verify()
    return res, ctx


def test_formats_by_hand():
    g = net()
    x = randn(64, 4, seed=4)
    res, ctx = run(g, x=x)
    assert res.modified is True
    acts = Executor(g).run({g.inputs[0]: x}, outputs=[g.value_by_name("relu_out"), g.outputs[0]])
    relu, out = acts[g.value_by_name("relu_out")], acts[g.outputs[0]]
    # the Relu output: unsigned, n by minimum MSE around n0 = 8 - ceil(log2 max)
    f = g.value_by_name("relu_out").qformat
    n0 = 8 - int(np.ceil(np.log2(relu.max())))
    assert (f.bits, f.signed, int(f.frac)) == (8, False, mse_best(relu.reshape(-1), 8, False, n0))
    # the input: signed (it has negative values)
    fi = g.inputs[0].qformat
    n0 = 7 - int(np.ceil(np.log2(np.abs(x).max())))
    assert (fi.signed, int(fi.frac)) == (True, mse_best(x.reshape(-1), 8, True, n0))
    fo = g.outputs[0].qformat
    n0 = 7 - int(np.ceil(np.log2(np.abs(out).max())))
    assert int(fo.frac) == mse_best(out.reshape(-1), 8, True, n0)
    assert g.value_by_name("mm_out").qformat is None  # fused into the layer output
    # weights per output channel (MatMul [K, N]: axis 1), biases int32 at n_in + n_w
    mm, fc = g.node_by_name("mm"), g.node_by_name("fc")
    wf = mm.qconfig.weight_format
    assert wf.axis == 1 and (mm.qconfig.weight_bits, mm.qconfig.act_bits) == (8, 8)
    w = randn(4, 5, seed=1)
    for c in range(5):
        n0 = 7 - int(np.ceil(np.log2(np.abs(w[:, c]).max())))
        assert wf.frac[c] == mse_best(w[:, c], 8, True, n0)
    fwf = fc.qconfig.weight_format
    assert fwf.axis == 0 and fc.qconfig.bias_format.bits == 32
    assert list(fc.qconfig.bias_format.frac) == [int(f.frac) + n for n in fwf.frac]
    rows = ctx.report["passes"]["choose-formats"]["layers"]
    assert [r["layer"] for r in rows] == ["mm", "fc"] and rows[0]["fused_activation"] == "Relu"
    assert rows[0]["act_format_text"] == f"UQ{8 - int(f.frac)}.{int(f.frac)}"
    assert all(r["weight_sqnr_db"] > 35 and r["act_sqnr_db"] > 30 for r in rows)


def test_options_and_idempotence():
    g = net()
    res, _ = run(g, target="npu4", weight_bits=4, act_bits=4)
    assert res.modified is True
    q = g.node_by_name("mm").qconfig
    assert (q.weight_bits, q.act_bits, q.weight_format.bits) == (4, 4, 4)
    assert g.value_by_name("relu_out").qformat.bits == 4
    res, _ = run(g, target="npu4", weight_bits=4, act_bits=4)
    assert res.modified is False  # same decisions again: nothing changed
    res, _ = run(g, target="npu8", start="ladder")  # npu8's ladder starts at w8/a16
    assert res.modified is True and g.node_by_name("fc").qconfig.act_bits == 16


def test_float_scale_target():
    g = net()
    run(g, target="ort-int8")
    f = g.value_by_name("relu_out").qformat
    assert not f.is_pow2 and f.zero_point == 0 and not f.signed  # min 0 -> zero point 0
    fi = g.inputs[0].qformat
    assert 0 < fi.zero_point < 255


def test_errors():
    g = net()
    with pytest.raises(OptionError, match="weight_bits=2.*npu8"):
        run(g, weight_bits=2)
    with pytest.raises(OptionError, match="--target"):
        make_pass("choose-formats").run(g, PassContext(calib=Dataset(randn(4, 4), None, "c")))
    with pytest.raises(DataError, match="--calib"):
        make_pass("choose-formats").run(g, PassContext(target=get_target("npu8")))
