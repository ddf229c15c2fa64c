"""Executor over the IR, with partial execution from a cut.

``Executor(graph).run(feeds, outputs=...)`` computes only the nodes needed for
the requested outputs. ``feeds`` maps Values (or names) to arrays; any value may
be fed, not only graph inputs, so a run can start at a cut of the graph: the
influence analysis feeds the low-precision network's tensors at a cut and runs the
float suffix. Intermediate arrays are dropped after their last use unless listed
in ``keep``. ``node_fn`` replaces the kernel call (fake quantization, the
fixed-point emulator), so every numeric mode shares this traversal.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..core.errors import CompilerError, DataError, UnsupportedOpError
from ..core.ir import Graph, Node, Value
from .parallel import map_batches
from .ops import KERNELS

NodeFn = Callable[[Node, list], Sequence[np.ndarray]]


def float_node_fn(node: Node, args: list) -> tuple:
    fn = KERNELS.get(node.op_type)
    if fn is None:
        raise UnsupportedOpError(f"node {node.name!r}: no kernel for operator {node.op_type}")
    try:
        out = fn(node, *args)
    except CompilerError:
        raise
    except Exception as e:
        shapes = [None if a is None else tuple(np.shape(a)) for a in args]
        raise CompilerError(f"node {node.name!r} ({node.op_type}) failed on inputs of shapes {shapes}: {e}") from e
    return out if isinstance(out, tuple) else (out,)


class Executor:
    """Runs a Graph (or a part of it) on numpy arrays."""

    def __init__(self, graph: Graph, node_fn: NodeFn | None = None):
        self.graph = graph
        self.node_fn = node_fn or float_node_fn
        self._plans: dict[tuple, list[Node]] = {}

    def _resolve(self, key) -> Value:
        if isinstance(key, Value):
            return key
        return self.graph.value_by_name(key)

    def plan(self, outputs: Sequence[Value], known: Iterable[Value]) -> list[Node]:
        """Nodes (in graph order) needed to compute ``outputs`` from ``known`` values."""
        known_ids = frozenset(id(v) for v in known)
        # keyed by the Values (identity), not their id(): an Executor may be pickled to a worker
        key = (tuple(outputs), frozenset(known))
        hit = self._plans.get(key)
        if hit is not None:
            return hit
        need: set[int] = set()
        stack = [v for v in outputs]
        seen: set[int] = set()
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            if id(v) in known_ids or v.is_const:
                continue
            p = v.producer
            if p is None:
                raise DataError(f"tensor {v.name!r} is needed but was not given (graph input missing from the feeds)")
            if id(p) in need:
                continue
            need.add(id(p))
            stack.extend(i for i in p.inputs if i is not None)
        nodes = [n for n in self.graph.nodes if id(n) in need]
        self._plans[key] = nodes
        return nodes

    def run(self, feeds: Mapping, outputs: Sequence | None = None, keep: Iterable | None = None
            ) -> dict[Value, np.ndarray]:
        """Execute and return ``{Value: array}`` for ``outputs`` (default graph outputs) and ``keep``."""
        env: dict[int, np.ndarray] = {}
        vals: dict[int, Value] = {}
        for k, a in feeds.items():
            v = self._resolve(k)
            env[id(v)] = a
            vals[id(v)] = v
        outs = [self._resolve(o) for o in (outputs if outputs is not None else self.graph.outputs)]
        keep_vals = [self._resolve(k) for k in (keep or [])]
        nodes = self.plan(outs + keep_vals, [vals[i] for i in env])
        # remaining reads per value, to free memory early
        pinned = {id(v) for v in outs} | {id(v) for v in keep_vals}
        remaining: dict[int, int] = {}
        for n in nodes:
            for v in n.inputs:
                if v is not None and not v.is_const:
                    remaining[id(v)] = remaining.get(id(v), 0) + 1
        for n in nodes:
            args = []
            for v in n.inputs:
                if v is None:
                    args.append(None)
                elif v.is_const and id(v) not in env:
                    args.append(v.const)
                else:
                    args.append(env[id(v)])
            res = self.node_fn(n, args)
            for v, a in zip(n.outputs, res):
                env[id(v)] = a
                vals[id(v)] = v
            for v in n.inputs:
                if v is not None and not v.is_const and id(v) in remaining:
                    remaining[id(v)] -= 1
                    if remaining[id(v)] == 0 and id(v) not in pinned:
                        env.pop(id(v), None)
        result: dict[Value, np.ndarray] = {}
        for v in outs + keep_vals:
            if v.is_const and id(v) not in env:
                result[v] = v.const
            else:
                result[v] = env[id(v)]
        return result


def batches(n: int, batch_size: int) -> Iterable[slice]:
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


def run_batched(graph: Graph, x: np.ndarray | Mapping, *, batch_size: int = 64, outputs=None,
                node_fn: NodeFn | None = None, progress: str | None = None, jobs: int = 1) -> list[np.ndarray]:
    """Run ``graph`` on ``x`` (array for the single input, or {input: array}) in batches.

    Returns one concatenated array per requested output (default: graph outputs). ``jobs > 1``
    runs the batches in worker processes (``runtime/parallel.py``; identical results).
    """
    ex = Executor(graph, node_fn)
    feeds = x if isinstance(x, Mapping) else {graph.inputs[0]: x}
    feeds = {ex._resolve(k): v for k, v in feeds.items()}
    n = len(next(iter(feeds.values())))
    outs = [ex._resolve(o) for o in (outputs or graph.outputs)]

    def one(sl: slice) -> list[np.ndarray]:
        res = ex.run({k: v[sl] for k, v in feeds.items()}, outs)
        return [res[o] for o in outs]

    per = map_batches(one, list(batches(n, batch_size)), jobs=jobs, progress=progress)
    return [np.concatenate([b[i] for b in per], axis=0) for i in range(len(outs))]
