"""--jobs: batches in forked worker processes give exactly the serial results."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from mpqc.core.errors import OptionError
from mpqc.runtime.executor import run_batched
from mpqc.runtime.parallel import default_jobs, map_batches
from mpqc.testing import GraphBuilder, randn


def _net():
    b = GraphBuilder()
    x = b.input("x", ("N", 3, 8, 8))
    y = b.op("Conv", [x, b.const("w", randn(4, 3, 3, 3, seed=1)), b.const("b", randn(4, seed=2))], name="c",
             pads=[1, 1, 1, 1])
    y = b.op("Relu", [y], name="r")
    y = b.op("Conv", [y, b.const("dw", randn(4, 1, 3, 3, seed=3))], name="d", group=4, strides=[2, 2],
             pads=[1, 1, 1, 1])
    y = b.op("GlobalAveragePool", [y], name="g")
    return b.output(b.op("Flatten", [y], name="f"))


def test_run_batched_identical_for_any_jobs():
    g = _net()
    x = randn(37, 3, 8, 8, seed=4)
    ref = run_batched(g, x, batch_size=5)[0]
    for jobs in (2, 3, 16):
        out = run_batched(g, x, batch_size=5, jobs=jobs)[0]
        assert out.tobytes() == ref.tobytes()


def _square(i):
    return i * i


def _boom(i):
    if i == 3:
        raise ValueError("batch 3 failed")
    return i


def _nested(i):
    return sum(map_batches(_square, range(i), jobs=2))  # inside a worker: runs serially


def test_map_batches_order_errors_and_nesting():
    assert map_batches(_square, range(10), jobs=3) == [i * i for i in range(10)]
    assert map_batches(_square, [], jobs=3) == []
    with pytest.raises(ValueError, match="batch 3 failed"):
        map_batches(_boom, range(6), jobs=2)
    assert map_batches(_nested, range(5), jobs=2) == [sum(j * j for j in range(i)) for i in range(5)]
    assert default_jobs() >= 1


def _dies(i):
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return i


def test_a_worker_killed_mid_batch_is_a_clear_error_not_a_hang():
    with pytest.raises(OptionError, match="--jobs 2: a worker process died") as e:
        map_batches(_dies, range(6), jobs=2)
    assert "fewer --jobs" in e.value.hint
    assert map_batches(_square, range(4), jobs=2) == [0, 1, 4, 9]  # the next map starts fresh workers
