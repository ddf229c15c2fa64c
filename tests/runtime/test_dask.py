"""--scheduler: the search's batches on a Dask distributed cluster (a LocalCluster on 127.0.0.1)
give exactly the serial results; missing Dask and an unreachable scheduler are clear errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mpqc.core.errors import OptionError
from mpqc.runtime.executor import run_batched
from mpqc.runtime.parallel import dask_scheduler, map_batches
from mpqc.testing import randn
from tests.runtime.test_parallel import _boom, _nested, _net, _square

distributed = pytest.importorskip("distributed")
# Dask's clusters, threads and spawned workers stay out of the processes that run the rest of the
# suite (whose --jobs tests fork): `make test` runs these in a pytest process of their own
pytestmark = pytest.mark.dask


@pytest.fixture(scope="module")
def cluster():
    with dask_scheduler("local", 2) as client:
        yield client


def _can_unshare_network() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_NO_LOOPBACK = """
from mpqc.core.errors import OptionError
from mpqc.runtime.parallel import dask_scheduler
if __name__ == "__main__":  # Dask's nannies spawn their workers: they import this file
    try:
        with dask_scheduler("local", 2, timeout=2):
            print("started")
    except OptionError as e:
        print("OptionError:", e)
"""


@pytest.mark.skipif(not _can_unshare_network(), reason="needs `unshare -n` (a network namespace, as root)")
def test_local_cluster_without_a_network_is_an_option_error_in_seconds(tmp_path):
    """In a network namespace whose loopback is down, Dask's workers can never reach the scheduler:
    the block gives up after its timeout with one clear error instead of waiting forever."""
    script = tmp_path / "no_loopback.py"
    script.write_text(_NO_LOOPBACK)
    r = subprocess.run(["unshare", "-n", sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OptionError: --scheduler local: cannot start a Dask cluster on 127.0.0.1" in r.stdout
    assert "leave --scheduler out" in r.stdout


def test_local_cluster_has_the_workers_asked_for(cluster):
    assert len(cluster.scheduler_info()["workers"]) == 2
    assert all(w.startswith("tcp://127.0.0.1:") for w in cluster.scheduler_info()["workers"])


def _on_worker(i):
    from distributed import get_worker
    return get_worker().address


def test_map_batches_on_the_cluster_order_errors_and_nesting(cluster):
    with dask_scheduler(cluster.scheduler.address, 1):  # a running scheduler by address
        assert map_batches(_square, range(10), jobs=2) == [i * i for i in range(10)]
        with pytest.raises(ValueError, match="batch 3 failed"):
            map_batches(_boom, range(6), jobs=2)
        assert map_batches(_nested, range(5), jobs=2) == [sum(j * j for j in range(i)) for i in range(5)]
        assert set(map_batches(_on_worker, range(8), jobs=2)) <= set(cluster.scheduler_info()["workers"])


def test_another_default_client_in_the_process_does_not_stall_the_map(cluster):
    """A user's own Dask client (the process's default) next to the block's: the map waits on its
    own client's loop (as_completed defaults to the default client's loop) and never replaces it."""
    with distributed.Client(cluster.scheduler.address, timeout="10s") as theirs:  # set as the default
        assert distributed.default_client() is theirs
        with dask_scheduler("local", 2, timeout=20) as ours:
            assert ours is not theirs and distributed.default_client() is theirs
            assert map_batches(_square, range(12), jobs=2) == [i * i for i in range(12)]
        assert distributed.default_client() is theirs  # ours never replaced it


class _Link:
    def __init__(self, nxt, v):
        self.nxt, self.v = nxt, v


def _chain(n):
    head = None
    for i in range(n):
        head = _Link(head, i)
    return head


def test_a_function_over_a_deeply_linked_graph_travels(cluster):
    """A graph pickles one level per linked node: EfficientNet-Lite0's closure failed Dask's own
    serializer with 'excessively deep recursion'."""
    head = _chain(5000)

    def total(k):
        s, h = 0, head
        while h is not None:
            s, h = s + h.v, h.nxt
        return s + k

    with dask_scheduler(cluster.scheduler.address, 1):
        assert map_batches(total, range(3), jobs=2) == [sum(range(5000)) + k for k in range(3)]


def test_run_batched_on_the_cluster_is_the_serial_run(cluster):
    g = _net()
    x = randn(37, 3, 8, 8, seed=4)
    ref = run_batched(g, x, batch_size=5)[0]
    with dask_scheduler(cluster.scheduler.address, 1):
        out = run_batched(g, x, batch_size=5, jobs=2)[0]
        serial = run_batched(g, x, batch_size=5, jobs=1)[0]  # jobs=1: in this process, as without Dask
    assert out.tobytes() == ref.tobytes() == serial.tobytes()


def test_sweep_on_the_cluster_is_the_serial_sweep(cluster):
    """An influence sweep's closure (graph, formats, onnxruntime engine, data) pickled to workers."""
    from mpqc.compiler.influence import cut_positions, stream_order, sweep
    from mpqc.compiler.quant import BitConfig
    from tests.compiler.test_ortsim import tiny_search
    g, x, sctx = tiny_search()
    sim = sctx.sim
    sim.run(None, x, batch_size=16)  # sessions exist in this process: they must not travel
    hi = BitConfig.uniform(sim.plan.layers, 8, 8)
    lo = BitConfig.uniform(sim.plan.layers, 2, 4)
    cuts = [(c, hi) for c in cut_positions(sim.plan, stream_order(sim.plan))]
    ref = sweep(sim, x, lo, cuts, batch_size=16)
    with dask_scheduler(cluster.scheduler.address, 1):
        got = sweep(sim, x, lo, cuts, batch_size=16, jobs=2)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.tobytes() == b.tobytes()


@pytest.mark.slow
def test_o2_compile_on_a_local_cluster_is_byte_identical(tmp_path):
    from mpqc.compiler.driver import compile_model
    from tests.conftest import bench_path
    d = np.load(bench_path("digits.npz"))
    kw = dict(level=2, target="npu4", calib=(d["x_calib"][:64], None), eval=(d["x_eval"][:120], d["y_eval"][:120]),
              options={"max_drop": 0.01}, batch_size=32, cache=False)
    serial = compile_model(bench_path("digits_resnet.onnx"), **kw)
    dask = compile_model(bench_path("digits_resnet.onnx"), scheduler="local", jobs=2, **kw)
    assert dask.onnx_bytes() == serial.onnx_bytes()
    sec = dask.report["passes"]["assign-bit-widths"]
    assert sec == serial.report["passes"]["assign-bit-widths"]
    assert sec["evaluations"] >= 5  # a real search: many sweeps and evaluations went through the cluster


def test_missing_dask_is_an_option_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails
    with pytest.raises(OptionError, match="not installed") as e:
        with dask_scheduler("local", 1):
            pass
    assert "mpqc[dask]" in str(e.value)


def test_unreachable_scheduler_is_an_option_error():
    with pytest.raises(OptionError, match="cannot connect") as e:
        with dask_scheduler("tcp://127.0.0.1:9", 1, timeout=1):
            pass
    assert "dask scheduler" in str(e.value)


def test_cli_scheduler_option(tmp_path, capsys):
    from mpqc.cli import main
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--scheduler" in capsys.readouterr().out
