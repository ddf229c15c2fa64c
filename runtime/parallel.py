"""Batches in worker processes (``--jobs N``): the same per-batch work, split over processes.

``map_batches(fn, slices, jobs=N)`` returns ``[fn(s) for s in slices]`` in order. With
``jobs > 1`` (and more than one slice) it forks ``min(jobs, len(slices))`` workers that
inherit the caller's state (graph, formats, data: nothing is pickled but the slices and the
results), each limited to one BLAS thread so that N workers use N cores. Every batch is
computed exactly as the serial loop computes it, so the results are identical for any N.
Where ``fork`` does not exist the work runs serially.

Scale-out: inside ``with dask_scheduler(address, workers):`` the same calls run on a Dask
distributed cluster instead (``--scheduler tcp://HOST:PORT``, or ``local`` for a ``LocalCluster``
of ``workers`` processes on 127.0.0.1). The function, with everything it closes over (graph,
formats, data), is scattered once per call, one copy per worker, and each batch is a task that
receives it and one slice; each task runs with one BLAS thread, so results are identical to the
serial run. As with local processes, only calls made with ``jobs > 1`` are distributed (the
driver raises ``jobs`` to at least the cluster's worker count). ``dask[distributed]`` is an
optional dependency (``pip install 'mpqc[dask]'``); the default path never imports it.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Sequence

from threadpoolctl import threadpool_limits

from ..core.errors import OptionError
from ..core.progress import progress_iter

_FN: Callable[[Any], Any] | None = None
#: the Dask client of the enclosing ``dask_scheduler`` block (None: local processes)
_CLIENT: contextvars.ContextVar = contextvars.ContextVar("mpqc_dask_client", default=None)
_IN_TASK = False


def default_jobs() -> int:
    """The number of cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _die_with_parent(parent: int) -> None:
    """Linux: this worker is killed when the process that forked it dies (a compile killed with
    SIGKILL would otherwise leave its workers waiting for batches forever)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _init(parent: int) -> None:
    _die_with_parent(parent)
    threadpool_limits(1)


def _call(item):
    return _FN(item)


#: a linked graph pickles depth first, one level per node: EfficientNet-Lite0's needs more than the
#: default 1000 levels (unpickling is not recursive)
_PICKLE_DEPTH = 20000
#: the function a worker last unpickled, by its pickle (one call's tasks share one scattered blob)
_UNPICKLED: dict[bytes, Callable[[Any], Any]] = {}


def _pickle_function(fn: Callable[[Any], Any]) -> bytes:
    import cloudpickle  # optional: a dependency of distributed, only inside dask_scheduler
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, _PICKLE_DEPTH))
    try:
        return cloudpickle.dumps(fn)
    finally:
        sys.setrecursionlimit(limit)


def _dask_task(item, blob: bytes):
    global _IN_TASK
    fn = _UNPICKLED.get(blob)
    if fn is None:
        _UNPICKLED.clear()
        fn = _UNPICKLED[blob] = pickle.loads(blob)
    _IN_TASK = True  # nested maps inside a task run serially
    with threadpool_limits(1):
        return fn(item)


def _dask_map(client, fn: Callable[[Any], Any], items: list, progress: str | None) -> list:
    from distributed import as_completed  # optional: only inside dask_scheduler
    # pickled here, in the caller's thread with a deeper recursion limit, not by Dask's own
    # serializer on its event loop thread
    fn_future = client.scatter(_pickle_function(fn), broadcast=True, hash=False)
    futures = client.map(_dask_task, items, blob=fn_future, pure=False)
    try:
        # loop=: as_completed would otherwise wait on the loop of Dask's *default* client, which need
        # not be this one (another client in the process): its futures never complete on that loop
        for _ in progress_iter(as_completed(futures, loop=client.loop), desc=progress, total=len(futures)):
            pass
        return client.gather(futures)
    except BaseException:
        client.cancel(futures + [fn_future])
        raise


@contextlib.contextmanager
def dask_scheduler(address: str, workers: int = 1, *, timeout: float = 30) -> Iterator[Any]:
    """Run the ``map_batches`` calls of the block on a Dask cluster: ``address`` is a scheduler
    (``tcp://HOST:PORT``) or ``"local"`` (a ``LocalCluster`` of ``workers`` single-threaded
    processes on 127.0.0.1, closed at the end); ``timeout``: seconds to wait for a scheduler.
    Yields the client."""
    try:
        import dask  # optional dependency
        from distributed import Client, LocalCluster  # optional dependency
    except ImportError:
        raise OptionError("--scheduler needs Dask's distributed scheduler, which is not installed",
                          hint="pip install 'mpqc[dask]' (or dask[distributed]), or leave --scheduler out") from None
    # Dask's own INFO lines (scheduler and worker start, task cancels) are not mpqc's messages
    log = logging.getLogger("distributed")
    level = log.level
    log.setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        stack.callback(log.setLevel, level)
        # every connection attempt (client, workers) gives up after ``timeout`` seconds
        # no work stealing on the local scheduler: the batches are alike, and with stealing on, tasks
        # were seen to stay "processing" on idle workers for good now and then (distributed 2026.8)
        stack.enter_context(dask.config.set({"distributed.comm.timeouts.connect": f"{timeout}s",
                                             "distributed.scheduler.work-stealing": False}))
        try:
            if address == "local":
                # death_timeout: a worker that cannot reach the scheduler gives up instead of retrying
                cluster = stack.enter_context(LocalCluster(
                    n_workers=max(1, workers), threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR, death_timeout=timeout))
                client = stack.enter_context(Client(cluster, timeout=f"{timeout}s", set_as_default=False))
                client.wait_for_workers(max(1, workers), timeout=timeout)
            else:
                client = stack.enter_context(Client(address, timeout=f"{timeout}s", set_as_default=False))
        except (OSError, TimeoutError, RuntimeError) as e:
            # RuntimeError: "Cluster failed to start" (no loopback network, workers that died at start)
            if address == "local":
                raise OptionError(f"--scheduler local: cannot start a Dask cluster on 127.0.0.1 ({e})",
                                  hint="this machine must let processes listen on 127.0.0.1; or leave --scheduler "
                                       "out (--jobs N runs local processes)") from None
            raise OptionError(f"--scheduler {address}: cannot connect ({e})",
                              hint="start a scheduler with `dask scheduler` and workers with `dask worker ADDRESS`, "
                                   "or use --scheduler local") from None
        token = _CLIENT.set(client)
        try:
            yield client
        finally:
            _CLIENT.reset(token)


def map_batches(fn: Callable[[Any], Any], items: Sequence, *, jobs: int = 1, progress: str | None = None) -> list:
    """``[fn(i) for i in items]`` in order, in ``jobs`` forked worker processes when that can help
    (on the Dask cluster of an enclosing ``dask_scheduler`` block instead, whatever its size). Only
    ``jobs > 1`` distributes: a caller passes it for work whose ``fn`` has no side effects (with
    ``jobs=1`` a ``fn`` may record into the caller's objects, as calibration does)."""
    global _FN
    items = list(items)
    client = _CLIENT.get()
    if client is not None and jobs > 1 and len(items) > 1 and _FN is None and not _IN_TASK:
        return _dask_map(client, fn, items, progress)
    if jobs <= 1 or len(items) < 2 or "fork" not in mp.get_all_start_methods() or _FN is not None or _IN_TASK:
        # (_FN set or _IN_TASK: already inside a map's worker or a Dask task)
        return [fn(i) for i in progress_iter(items, desc=progress)]
    _FN = fn
    # concurrent.futures, not multiprocessing.Pool: a worker that dies (killed for memory, a crash
    # in native code) breaks the pool with an error, where Pool would wait for its result forever
    # (with fork, all workers start before the executor's own thread, so none inherits its locks)
    pool = ProcessPoolExecutor(min(jobs, len(items)), mp_context=mp.get_context("fork"), initializer=_init,
                               initargs=(os.getpid(),))
    try:
        return list(progress_iter(pool.map(_call, items), desc=progress, total=len(items)))
    except BrokenProcessPool:
        raise OptionError(f"--jobs {jobs}: a worker process died before finishing its batch (the system may "
                          "have killed it for memory)", hint="use fewer --jobs or a smaller --batch-size") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _FN = None
