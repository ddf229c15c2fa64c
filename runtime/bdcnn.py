"""Popcount interpreter of a binary-decomposed program (core/bdcnn_program.py).

Runs a network compiled for the ``bdcnn`` target ("Binary-decomposed DCNN for
accelerating computation and compressing model without retraining", Kamiya et al.,
ICCV Workshops 2017; docs/BDCNN.md) from its bundle alone:

* a ``binary`` step quantizes its input with the layer's quantization sub-layer
  (``q = clip(rint(x / delta) + zp, 0, 2^Q - 1)``, runtime/popcount.py ``ActQuant``) and
  computes ``sum_k c_k delta P_k + min * sum_j w~_j + bias`` with the AND + popcount
  kernel (``P_k = sum_e 2^e (2 popcount(M+_k & b_e) - popcount(b_e))``), for Conv (strides,
  pads, dilations, groups, depthwise) and fully connected layers;
* a ``float`` step runs the ONNX operator with the float kernels of runtime/ops.py.

``BdcnnRuntime(program).run(x)`` returns the outputs; ``timings`` (seconds per step,
accumulated) lets benchmarks time each layer. ``run_bdcnn(path_or_program, x)`` runs in
batches.
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from ..core.bdcnn_program import BdcnnProgram, load_bdcnn_bundle
from ..core.errors import DataError, UnsupportedOpError
from ..core.ir import Node, Value
from ..core.program import free_lists
from ..core.progress import progress_iter
from .executor import batches, float_node_fn
from .ops import conv_params
from .popcount import ActQuant, BinaryLayer, binary_forward, unpack_weights


class _Binary:
    """A binary step made ready: the layer (unpacked M, c), the quantizer, the bias."""

    def __init__(self, prog: BdcnnProgram, step):
        p = step.params
        c_int = prog.consts[step.inputs[2]].astype(np.float64)
        frac = prog.consts[step.inputs[3]].astype(np.int64)
        c = np.ldexp(c_int, -frac[:, None])
        M = unpack_weights(prog.consts[step.inputs[1]], int(p["D"]))
        self.layer = BinaryLayer(M, c, tuple(p["weight_shape"]), int(p["group"]))
        self.act = ActQuant(lo=float(p["min"]), delta=float(p["delta"]), Q=int(p["Q"]), zp=int(p["zero_point"]))
        b = step.inputs[4] if len(step.inputs) > 4 else ""
        self.bias = prog.consts[b].astype(np.float64) if b else None
        self.op = step.op
        self.node = Node(step.op, step.node, step.attrs)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        q = self.act.quantize(x)
        if self.op == "Gemm":
            if x.ndim != 2:
                raise DataError(f"layer {self.node.name!r}: a fully connected layer needs a 2-D input, got {x.shape}")
            y = binary_forward(self.layer, q, self.act, self.bias, dtype=np.float32)
        else:
            strides, pads, dil = conv_params(self.node, x.shape, self.layer.weight_shape)
            if len(strides) != 2:
                raise UnsupportedOpError(f"layer {self.node.name!r}: binary convolutions are 2-D")
            y = binary_forward(self.layer, q, self.act, self.bias, strides, pads, dil, dtype=np.float32)
        return y


class BdcnnRuntime:
    """Executes a ``BdcnnProgram`` (see the module docstring)."""

    def __init__(self, program: BdcnnProgram):
        self.p = program
        self.timings: dict[str, float] = defaultdict(float)
        self._exec = []
        for i, s in enumerate(program.steps):
            if s.kind == "binary":
                self._exec.append(_Binary(program, s))
            elif s.kind == "float":
                node = Node(s.op, s.node or f"step{i}", s.attrs)
                node.inputs = [Value(x) if x else None for x in s.inputs]
                node.outputs = [Value(o) for o in s.outputs]
                self._exec.append(node)
            else:
                raise UnsupportedOpError(f"step {i} of {program.name!r} has unknown kind {s.kind!r}")
        self._free = free_lists(program.steps, program.consts, program.outputs)

    def run(self, x, *, time_steps: bool = False) -> list[np.ndarray]:
        """Outputs (in program order) for ``x`` (array for the first input, or {name: array})."""
        env: dict[str, np.ndarray] = {}
        feeds = x if isinstance(x, dict) else {self.p.inputs[0]["name"]: x}
        for spec in self.p.inputs:
            if spec["name"] not in feeds:
                raise DataError(f"input {spec['name']!r} of {self.p.name!r} was not given")
            env[spec["name"]] = np.asarray(feeds[spec["name"]], np.dtype(spec["dtype"]))
        for i, (s, ex) in enumerate(zip(self.p.steps, self._exec)):
            t0 = time.perf_counter() if time_steps else 0.0
            if s.kind == "binary":
                outs = (ex(env[s.inputs[0]]),)
            else:
                args = [None if not n else (self.p.consts[n] if n in self.p.consts else env[n]) for n in s.inputs]
                outs = float_node_fn(ex, args)
            for o, a in zip(s.outputs, outs):
                env[o] = a
            if time_steps:
                self.timings[s.node or f"step{i}"] += time.perf_counter() - t0
            for n in self._free[i]:
                env.pop(n, None)
        return [env[o["tensor"]] for o in self.p.outputs]


def run_bdcnn(program, x: np.ndarray, *, batch_size: int = 64, progress: str | None = None) -> list[np.ndarray]:
    """Run a ``BdcnnProgram`` (or a bundle path) on ``x`` in batches; one array per output."""
    prog = program if isinstance(program, BdcnnProgram) else load_bdcnn_bundle(program)
    rt = BdcnnRuntime(prog)
    chunks: list[list[np.ndarray]] = [[] for _ in prog.outputs]
    for sl in progress_iter(list(batches(len(x), batch_size)), desc=progress):
        for i, y in enumerate(rt.run(x[sl])):
            chunks[i].append(y)
    return [np.concatenate(c, axis=0) for c in chunks]
