"""ActivationRanges: statistics per tensor, in batches, with a bounded subsample."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.compiler.data import Dataset
from mpqc.core.errors import DataError
from mpqc.compiler.passes import PassContext
from mpqc.compiler.ranges import ActivationRanges, TensorStats, profile
from mpqc.runtime.executor import Executor
from tests.graphs import GraphBuilder, randn


def net():
    b = GraphBuilder("r")
    x = b.input("x", ["N", 3])
    y = b.op("MatMul", [x, b.const("w", randn(3, 4, seed=1))], name="mm")
    r = b.op("Relu", [y], name="relu")
    side = b.op("Neg", [y], name="unused")  # read by nothing: still profiled
    del side
    return b.output(r)


def test_tensor_stats_by_hand():
    s = TensorStats()
    s.update(np.array([1.0, -3.0, 2.0], np.float32), per_batch=10)
    s.update(np.array([0.5], np.float32), per_batch=10)
    s.update(np.array([7], np.int64), per_batch=10)  # integer tensors are not statistics of activations
    assert (s.min, s.max, s.absmax, s.count) == (-3.0, 2.0, 3.0, 4)
    assert s.mean == pytest.approx(0.125) and not s.nonnegative
    assert s.sample.tolist() == [1.0, -3.0, 2.0, 0.5]
    assert s.percentile(50) == pytest.approx(1.5)
    hist = s.histogram(bins=5)
    assert sum(hist["counts"]) == 4 and hist["edges"][0] == -3.0 and hist["edges"][-1] == 2.0
    j = s.to_json()
    assert j["absmax"] == 3.0 and j["count"] == 4


def test_subsample_is_bounded_and_strided():
    s = TensorStats()
    s.update(np.arange(1000, dtype=np.float32), per_batch=100)
    assert s.sample.size == 100 and s.sample[:3].tolist() == [0.0, 10.0, 20.0]
    assert s.max == 999.0 and s.count == 1000


def test_profile_in_batches_equals_one_batch():
    g = net()
    x = randn(50, 3, seed=2)
    a = profile(g, x, batch_size=7)
    b = profile(g, x, batch_size=50)
    full = Executor(g).run({g.inputs[0]: x}, outputs=[g.value_by_name("mm_out"), g.value_by_name("unused_out"),
                                                      g.outputs[0]])
    for v in [g.inputs[0]] + [n.outputs[0] for n in g.nodes]:
        sa, sb = a[v], b[v]
        assert (sa.min, sa.max, sa.absmax, sa.count) == (sb.min, sb.max, sb.absmax, sb.count)
        assert sa.sum == pytest.approx(sb.sum, rel=1e-6, abs=1e-9)
    ref = full[g.value_by_name("mm_out")]
    assert a[g.value_by_name("mm_out")].max == float(ref.max())
    assert a[g.value_by_name("unused_out")].count == ref.size  # a tensor no output needs
    assert a[g.outputs[0]].nonnegative and a[g.outputs[0]].min == 0.0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow itself
def test_analysis_needs_calibration_data_and_rejects_overflow():
    g = net()
    with pytest.raises(DataError, match="--calib"):
        PassContext().analyses.get(ActivationRanges, g)
    b = GraphBuilder("big")
    x = b.input("x", ["N", 3])
    big = b.output(b.op("MatMul", [x, b.const("w", np.full((3, 2), 2.0, np.float32))], name="mm"))
    ctx = PassContext(calib=Dataset(np.full((2, 3), 1e38, np.float32), None, "big"))
    with pytest.raises(DataError, match="mm_out.*overflows"):
        ctx.analyses.get(ActivationRanges, big)
    ctx = PassContext(calib=Dataset(randn(4, 3), None, "ok"))
    st = ctx.analyses.get(ActivationRanges, g)
    assert st is ctx.analyses.get(ActivationRanges, g)  # cached
