"""Bit-exact fixed-point emulator: executes the integer ``Program`` of a quantized network.

compiler/lowering.py builds the Program from a QDQ graph (its docstring has the
semantics of every step; docs/FIXED_POINT.md the full story); a target bundle is the
Program serialized (core/program.py), so ``run_program(BUNDLE.npz, x)`` runs from the
bundle alone. Integer tensors are float32/float64 arrays of integers: a product-sum of
B-bit integers is exact in float64, and in float32 while it stays below 2^24 (the
lowering checks it per layer); the shifts, rounding and saturation are numba kernels
(``runtime/emulator_kernels.py``). Conv and Gemm layers with 8-bit weights run on exact 8-bit
integer kernels when a batch's activations span at most 256 values (``runtime/intgemm.py``;
``int8_kernels=False`` keeps every layer on float BLAS: the same integers, slower). A layer whose
only reader is a shift requantization runs with it as one pass over its accumulators (bias,
rounding, saturation; depthwise convolutions entirely in one numba kernel); ``fuse=False`` runs
the steps one by one: the same integers, more passes over memory. Between 8-bit convolutions
(and the max pools between them) activations stay the uint8 codes channels last that the next
GEMM reads (``_Codes``), as an integer accelerator keeps them; every other step, ``keep`` and the
outputs see the usual float32 NCHW integers.
"""
from __future__ import annotations

import numpy as np

from ..core.errors import CompilerError, DataError
from ..core.ir import Node, Value
from ..core.program import Program, Step, free_lists, load_bundle
from ..core.progress import progress_iter
from . import emulator_kernels as K
from .executor import batches, float_node_fn
from .intgemm import INT32_EXACT, IntGemm, uint8_zero_point
from .ops import (CHANNELS_LAST_FROM, conv_params, im2col_channels_last, max_pool_channels_last, out_size,
                  weights_channels_last, windows_channels_last)

ROUNDINGS = ("half-up", "half-even")
F32_EXACT = float(1 << 24)
F64_EXACT = float(1 << 53)


def _int8_conv_pays(x_shape, w_shape, codes_out: bool = False) -> bool:
    """Whether the 8-bit kernel is faster for this convolution of a float32 NCHW input: it needs the
    input channels-last and, unless the output stays uint8 codes (``codes_out``), the output back to
    NCHW, which the float path also pays for k x k kernels of 16 channels or more (runtime/ops.py)
    but not for 1x1 kernels, whose float GEMM reads NCHW as it is. Measured on the bench models (one
    thread): 1.2-2x faster for those k x k layers, for k x k layers of fewer channels that write
    codes (digits_alexnet's first layer) and for 1x1 layers of at most 8x8 positions; slower for 1x1
    layers on 28x28 and larger, which are memory-bound."""
    k = int(np.prod(w_shape[2:]))
    if k > 1:
        return codes_out or x_shape[1] >= CHANNELS_LAST_FROM
    return int(np.prod(x_shape[2:])) <= 64


class _Codes:
    """A 4-D tensor of centered integers held as the uint8 codes an 8-bit GEMM reads, channels last:
    ``value = data - z`` with ``data`` (N, H, W, C). Passed between 8-bit convolutions (and the max
    pools between them) instead of float32 NCHW arrays; ``canonical()`` is the emulator's usual form."""

    __slots__ = ("data", "z")

    def __init__(self, data: np.ndarray, z: int):
        self.data = data
        self.z = z

    @property
    def nchw_shape(self) -> tuple:
        N, H, W, C = self.data.shape
        return N, C, H, W

    def canonical(self) -> np.ndarray:
        out = np.empty(self.nchw_shape, np.float32)
        np.subtract(self.data.transpose(0, 3, 1, 2), np.float32(self.z), out=out)
        return out


def _conv_geometry(node, x_shape, w_shape) -> tuple[list, list, list, list]:
    """A 2-D convolution's ``(strides, pads, dilations, output size)``."""
    strides, pads, dil = conv_params(node, x_shape, w_shape)
    out_sp = [out_size(x_shape[2 + k], w_shape[2 + k], strides[k], dil[k], pads[k], pads[k + 2]) for k in range(2)]
    return strides, pads, dil, out_sp


def _nchw(y: np.ndarray, shape: tuple, dt) -> np.ndarray:
    """An 8-bit GEMM's channels-last accumulators (N, positions, M) as the NCHW layer output ``shape``."""
    return y.transpose(0, 2, 1).reshape(shape).astype(dt, order="C")


def _canonical(v):
    return v.canonical() if isinstance(v, _Codes) else v


class Emulator:
    """Executes a Program on numpy arrays (see module docstring)."""

    def __init__(self, program: Program, *, check_overflow: int | None = 32, int8_kernels: bool = True,
                 fuse: bool = True):
        self.p = program
        self.check_overflow = check_overflow
        self.int8_kernels = int8_kernels
        self._gemms: dict[int, IntGemm | None] = {}
        self._nodes: list[Node | None] = []
        self._cache: dict[tuple, np.ndarray] = {}
        for i, s in enumerate(program.steps):
            node = None
            if s.op:
                node = Node(s.op, s.node or f"step{i}", s.attrs)
                node.inputs = [Value(x) if x else None for x in s.inputs]
                node.outputs = [Value(o) for o in s.outputs]
            self._nodes.append(node)
        # tensors to drop after their last reader
        self._free = free_lists(program.steps, program.consts, program.outputs)
        self._fused = self._fusable() if fuse else {}
        self._codes_out, self._codes_pools = self._codes_plan() if fuse and int8_kernels else ({}, set())

    def _fusable(self) -> dict[int, tuple[int, tuple]]:
        """Layer steps whose only reader is a shift requantization (no divisor): ``{layer step:
        (requant step, (bias, shift, lo, hi, mode) per output channel)}``. Such a layer runs with
        its requantization as one pass (``_layer_requant``), the same integers in fewer passes over
        memory. Not where the accumulator's overflow check applies (bound >= 2^(check_overflow-1))."""
        steps = self.p.steps
        readers = self._readers()
        outputs = {o["tensor"] for o in self.p.outputs}
        lim = float(1 << (self.check_overflow - 1)) if self.check_overflow else np.inf
        fused = {}
        for i, s in enumerate(steps):
            if s.kind != "layer" or s.params["bound"] >= lim or s.outputs[0] in outputs:
                continue
            r = readers.get(s.outputs[0], [])
            if len(r) != 1 or r[0] <= i:
                continue
            q = steps[r[0]]
            P = q.params
            if q.kind != "requant" or "shift" not in P or P.get("den") not in (None, 1.0) or len(q.inputs) != 1:
                continue
            if s.op not in ("Conv", "Gemm") or P["axis"] not in (None, 1):
                continue
            w_shape = self.p.consts[s.inputs[1]].shape
            C = int(w_shape[0] if s.op == "Conv" or self._nodes[i].attr("transB", 0) else w_shape[1])
            chan = [np.ascontiguousarray(np.broadcast_to(np.asarray(P[k], dt), (C,)))
                    for k, dt in (("shift", np.int64), ("lo", np.float64), ("hi", np.float64))]
            bias = (np.zeros(C) if not s.inputs[2]
                    else np.ascontiguousarray(np.asarray(self.p.consts[s.inputs[2]], np.float64).reshape(C)))
            fused[i] = (r[0], (bias, *chan, K.MODES[P["mode"]]))
        return fused

    def _readers(self) -> dict[str, list[int]]:
        readers: dict[str, list[int]] = {}
        for j, s in enumerate(self.p.steps):
            for x in dict.fromkeys(s.inputs):
                if x:
                    readers.setdefault(x, []).append(j)
        return readers

    def _int8_conv(self, i: int) -> bool:
        """Whether layer step ``i`` is a one-group 2-D convolution with 8-bit weights and an int32 bound."""
        s = self.p.steps[i]
        if s.kind != "layer" or s.op != "Conv" or int(self._nodes[i].attr("group", 1)) != 1:
            return False
        w = self.p.consts[s.inputs[1]]
        return w.ndim == 4 and s.params["bound"] < INT32_EXACT and IntGemm.supports(w.reshape(w.shape[0], -1))

    def _codes_plan(self) -> tuple[dict[int, int], set[int]]:
        """Where tensors stay uint8 codes channels last (``_Codes``) between steps: ``({requant step
        fused into an 8-bit convolution: its zero point z}, {max pool and shift-0 requant steps run on
        codes})``. A requantization qualifies when its range fits 256 codes and every reader is an
        8-bit convolution (as its input), or a max pool or a shift-0 requantization whose readers all
        qualify in turn; program outputs never do. At run time a layer that cannot take the 8-bit
        path still writes float32 NCHW, and every other step reads the canonical form
        (``_Codes.canonical``). Codes are handed to the GEMM with the bound 255 (``_conv_codes``):
        on a CPU without VNNI that can pick the widening uint8 x uint8 kernel where the data would
        have allowed the faster one; the integers are the same."""
        steps = self.p.steps
        readers = self._readers()
        outputs = {o["tensor"] for o in self.p.outputs}

        def codes_ok(t: str, pools: set[int], depth: int = 0) -> bool:
            if t in outputs or depth > 8 or not readers.get(t):
                return False
            for j in readers[t]:
                r = steps[j]
                if self._int8_conv(j) and r.inputs[0] == t and t not in r.inputs[1:]:
                    continue
                if r.kind == "move" and r.op == "MaxPool" and len(r.outputs) == 1:
                    kernel = self._nodes[j].attr("kernel_shape")
                    pads = list(self._nodes[j].attr("pads", [0] * 4))
                    ok = (len(kernel) == 2 and self._nodes[j].attr("auto_pad", "NOTSET") == "NOTSET"
                          and all(0 <= p < kernel[k % 2] for k, p in enumerate(pads)))
                elif r.kind == "requant":  # a change of range only (as after a max pool): a clip of the codes
                    P = r.params
                    ok = (len(r.inputs) == 1 and "shift" in P and not np.any(np.asarray(P["shift"]))
                          and P.get("den") in (None, 1.0) and P["axis"] in (None, 1))
                else:
                    ok = False
                if ok and codes_ok(r.outputs[0], pools, depth + 1):
                    pools.add(j)
                    continue
                return False
            return True

        out: dict[int, int] = {}
        pools: set[int] = set()
        for i, (j, chan) in self._fused.items():
            lo, hi = float(np.min(chan[2])), float(np.max(chan[3]))
            z = -lo
            if not self._int8_conv(i) or not (0 <= z <= 255 and hi + z <= 255):
                continue
            found: set[int] = set()
            if codes_ok(steps[j].outputs[0], found):
                out[j] = int(z)
                pools |= found
        return out, pools

    def _const(self, name: str, dtype) -> np.ndarray:
        key = (name, str(dtype))
        a = self._cache.get(key)
        if a is None:
            a = self._cache[key] = np.ascontiguousarray(self.p.consts[name], dtype=dtype)
        return a

    def run(self, feeds, keep=()) -> dict[str, np.ndarray]:
        """``feeds``: an array for the first input or ``{input name: array}``. Returns
        ``{output name: array}``, plus the tensors named in ``keep`` (integer tensors
        hold the centered integers ``q - zero_point``)."""
        if not isinstance(feeds, dict):
            feeds = {self.p.inputs[0]["name"]: feeds}
        env: dict[str, np.ndarray] = dict(self.p.consts)
        for k, v in feeds.items():
            env[k] = np.asarray(v)
        keep = set(keep)
        kept = {}
        ahead: dict[int, np.ndarray | _Codes] = {}  # requantizations computed with their layer
        for i, s in enumerate(self.p.steps):
            fuse = self._fused.get(i)
            if i in ahead:
                outs = (ahead.pop(i),)
            elif i in self._codes_pools and isinstance(env[s.inputs[0]], _Codes):
                outs = (self._on_codes(i, s, env[s.inputs[0]]),)
            elif fuse is not None and s.outputs[0] not in keep:
                y = self._layer_requant(i, s, env, fuse[1], self._codes_out.get(fuse[0]))
                if y is None:
                    outs = self._exec(i, s, env)
                else:
                    ahead[fuse[0]] = y
                    outs = ()
            else:
                if s.kind != "layer":  # layers read codes themselves (_gemm_int8)
                    for x in s.inputs:
                        if x and isinstance(env.get(x), _Codes):
                            env[x] = env[x].canonical()
                outs = self._exec(i, s, env)
            for o, a in zip(s.outputs, outs):
                env[o] = a
                if o in keep:
                    kept[o] = _canonical(a)
            for x in self._free[i]:
                env.pop(x, None)
        res = {o["name"]: _canonical(env[o["tensor"]]) for o in self.p.outputs}
        res.update(kept)
        return res

    def _exec(self, i: int, s: Step, env: dict) -> tuple:
        P = s.params
        k = s.kind
        if k == "float" or k == "move":
            return float_node_fn(self._nodes[i], [env[x] if x else None for x in s.inputs])
        if k == "layer":
            return (self._layer(i, s, env),)
        if k == "requant":
            return (self._requant(s, env),)
        if k == "quantize":
            x = np.ascontiguousarray(env[s.inputs[0]])
            out = np.empty(x.shape, np.float32)
            if P["frac"] is not None:
                K.quantize_pow2(x.reshape(-1), int(P["frac"]), float(P["zero_point"]), float(P["qmin"]),
                                float(P["qmax"]), K.MODES[P["mode"]], out.reshape(-1))
            else:
                K.quantize_float(x.reshape(-1), float(P["scale"]), float(P["zero_point"]), float(P["qmin"]),
                                 float(P["qmax"]), out.reshape(-1))
            return (out,)
        if k == "clamp":
            x = np.ascontiguousarray(env[s.inputs[0]])
            lo = np.asarray(P["lo"], np.float64)
            hi = np.asarray(P["hi"], np.float64)
            xv = K.as_pcs(x, P["axis"])
            C = xv.shape[1]
            out = np.empty_like(x)
            K.clamp_channels(xv, np.broadcast_to(lo, (C,)).copy(), np.broadcast_to(hi, (C,)).copy(),
                             K.as_pcs(out, P["axis"]))
            return (out,)
        if k == "add":
            acc = None
            for x, m in zip(s.inputs, P["mult"]):
                t = env[x].astype(np.float64) * m if m != 1.0 else env[x].astype(np.float64)
                acc = t if acc is None else acc + t
            return (acc.astype(np.float32) if P["bound"] < F32_EXACT else acc,)
        if k == "mul":
            y = env[s.inputs[0]].astype(np.float64) * env[s.inputs[1]].astype(np.float64)
            return (y.astype(np.float32) if P["bound"] < F32_EXACT else y,)
        if k == "sum_pool":
            x = env[s.inputs[0]].astype(np.float64)
            if s.op == "GlobalAveragePool":
                total = x.sum(axis=tuple(range(2, x.ndim)), keepdims=True)
                if len(s.outputs) > 1:
                    return total, np.array(float(np.prod(x.shape[2:])))
                return (total,)
            avg = float_node_fn(self._nodes[i], [x])[0]
            cnt = P["den"] if P["den"] is not None else env[s.inputs[1]]
            return (np.rint(avg * cnt),)
        if k == "dequantize":
            x = env[s.inputs[0]]
            sc = np.asarray(P["scale"], np.float64)
            if P["axis"] is not None and sc.ndim:
                shp = [1] * x.ndim
                shp[P["axis"] % x.ndim] = -1
                sc = sc.reshape(shp)
            den = P["den"] if P["den"] is not None else (env[s.inputs[1]] if len(s.inputs) > 1 else 1.0)
            if P["dtype"] == "float32" and np.ndim(sc) == 0 and np.ndim(den) == 0 and den == 1.0:
                # ONNX DequantizeLinear: (int - zero point) * scale in float32
                return (x.astype(np.float32) * np.float32(sc),)
            y = x.astype(np.float64) * sc / den
            return (y.astype(P["dtype"]),)
        if k == "raw":
            x = env[s.inputs[0]]
            return ((x + P["zero_point"]).astype(P["dtype"]),)
        raise CompilerError(f"emulator program step {i} has an unknown kind {k!r}")

    def _int_gemm(self, i: int, s: Step, w2d) -> IntGemm | None:
        """The layer's 8-bit integer GEMM (None: its weights are not 8-bit or it is not eligible)."""
        if i not in self._gemms:
            g = None
            if self.int8_kernels and s.params["bound"] < INT32_EXACT:
                w = w2d()
                if w is not None and IntGemm.supports(w):
                    g = IntGemm(w)
            self._gemms[i] = g
        return self._gemms[i]

    def _gemm_int8(self, i: int, s: Step, x, codes_out: bool = False) -> tuple[np.ndarray, tuple] | None:
        """Conv (2-D, one group) and Gemm layers on 8-bit integer kernels (runtime/intgemm.py), when
        the weights are 8-bit and this batch's activations span at most 256 values: the int32
        accumulators channels-last (N, positions, M) and the layer's NCHW output shape; None otherwise."""
        node = self._nodes[i]
        wc = self.p.consts[s.inputs[1]]
        if isinstance(x, _Codes):
            return self._conv_codes(i, s, x) if s.op == "Conv" else None
        if s.op == "Conv" and x.ndim == 4 and int(node.attr("group", 1)) == 1 and _int8_conv_pays(x.shape, wc.shape, codes_out):
            g = self._int_gemm(i, s, lambda: weights_channels_last(np.asarray(wc)))
            shift = None if g is None else uint8_zero_point(x)
            if shift is None:
                return None
            z, a_max = shift
            strides, pads, dil, out_sp = _conv_geometry(node, x.shape, wc.shape)
            a = im2col_channels_last(x + np.float32(z), wc.shape[2:], pads, strides, dil, out_sp,
                                     pad_value=z, dtype=np.uint8)
            N, M = x.shape[0], wc.shape[0]
            return g(a, z, a_max).reshape(N, -1, M), (N, M, *out_sp)
        if s.op == "Gemm" and x.ndim == 2 and not node.attr("transA", 0):
            trans_b = bool(node.attr("transB", 0))
            g = self._int_gemm(i, s, lambda: np.ascontiguousarray(np.asarray(wc).T if trans_b else wc))
            shift = None if g is None else uint8_zero_point(x)
            if shift is None:
                return None
            z, a_max = shift
            y = g((x + np.float32(z)).astype(np.uint8), z, a_max)
            return y[:, None, :], y.shape
        return None

    def _on_codes(self, i: int, s: Step, x: _Codes) -> _Codes:
        """A max pool or a shift-0 requantization (``_codes_plan``) on codes."""
        if s.kind == "move":  # codes >= 0: padding with 0 never wins a window
            return _Codes(max_pool_channels_last(self._nodes[i], x.data, 0), x.z)
        lo = np.asarray(s.params["lo"], np.float64) + x.z
        hi = np.asarray(s.params["hi"], np.float64) + x.z
        if np.all(lo <= 0) and np.all(hi >= 255):
            return x  # the range holds every code
        C = x.data.shape[3]
        lo = np.clip(np.broadcast_to(lo, (C,)), 0, 255).astype(np.uint8)
        hi = np.clip(np.broadcast_to(hi, (C,)), 0, 255).astype(np.uint8)
        return _Codes(np.minimum(np.maximum(x.data, lo), hi), x.z)

    def _conv_codes(self, i: int, s: Step, x: _Codes) -> tuple[np.ndarray, tuple] | None:
        """``_gemm_int8`` of a convolution whose input is already uint8 codes channels last: a 1x1
        stride-1 layer multiplies them as they are, others pad them with ``z`` (the code of 0) and
        copy the windows; no conversion, no transpose."""
        node = self._nodes[i]
        wc = self.p.consts[s.inputs[1]]
        g = self._int_gemm(i, s, lambda: weights_channels_last(np.asarray(wc)))
        strides, pads, dil, out_sp = _conv_geometry(node, x.nchw_shape, wc.shape)
        if g is None or min(pads) < 0:
            return None
        N, H, W, C = x.data.shape
        if wc.shape[2:] == (1, 1) and strides == [1, 1] and not any(pads):
            a = x.data.reshape(-1, C)
        else:
            xh = np.full((N, H + pads[0] + pads[2], W + pads[1] + pads[3], C), x.z, np.uint8)
            xh[:, pads[0]:pads[0] + H, pads[1]:pads[1] + W] = x.data
            a = windows_channels_last(xh, wc.shape[2:], strides, dil, out_sp)
        M = wc.shape[0]
        return g(a, x.z, 255).reshape(N, -1, M), (N, M, *out_sp)

    def _layer_requant(self, i: int, s: Step, env: dict, chan: tuple, codes_z: int | None = None):
        """The layer and the requantization that reads it (``_fusable``) with the bias, rounding and
        saturation in one pass: depthwise convolutions in ``depthwise_requant`` (the accumulators
        never leave a scratch row), other layers' products through ``requant_bias``; an 8-bit
        convolution with ``codes_z`` (``_codes_plan``) writes uint8 codes channels last
        (``requant_codes``). None when this batch cannot take the fused path (a depthwise layer with
        negative pads)."""
        dt = np.dtype(s.params["dtype"])
        x = env[s.inputs[0]]
        r = self._gemm_int8(i, s, x, codes_z is not None)
        if r is not None:
            y, shape = r
            if codes_z is not None:
                N, M = shape[:2]
                out = np.empty((N, *shape[2:], M), np.uint8)
                K.requant_codes(y.reshape(-1, M), *chan, codes_z, out.reshape(-1, M))
                return _Codes(out, codes_z)
            return self._requant_bias(_nchw(y, shape, dt), chan)
        x = _canonical(x)
        node = self._nodes[i]
        w = self._const(s.inputs[1], dt)
        group = int(node.attr("group", 1))
        if s.op == "Conv" and x.ndim == 4 and group > 1 and group == x.shape[1] and w.shape[1] == 1:
            strides, pads, dil, (oh, ow) = _conv_geometry(node, x.shape, w.shape)
            if min(pads) < 0:
                return None
            N, C, H, W = x.shape
            Wp = W + pads[1] + pads[3]
            plane = np.zeros((H + pads[0] + pads[2] + 1, Wp), dt)
            acc = np.empty(max(oh * Wp, Wp), dt)
            out = np.empty((N, w.shape[0], oh, ow), np.float32)
            K.depthwise_requant(np.ascontiguousarray(x), w, w.shape[0] // group, pads[0], pads[1], *strides, *dil,
                                *chan, out, plane, acc)
            return out
        return self._requant_bias(float_node_fn(node, [x.astype(dt, copy=False), w])[0], chan)

    @staticmethod
    def _requant_bias(y: np.ndarray, chan: tuple) -> np.ndarray:
        y = np.ascontiguousarray(y)
        out = np.empty(y.shape, np.float32)
        K.requant_bias(K.as_pcs(y, 1), *chan, K.as_pcs(out, 1))
        return out

    def _layer_int8(self, i: int, s: Step, x, dt) -> np.ndarray | None:
        r = self._gemm_int8(i, s, x)
        return None if r is None else _nchw(*r, dt)

    def _layer(self, i: int, s: Step, env: dict) -> np.ndarray:
        dt = np.dtype(s.params["dtype"])
        x = env[s.inputs[0]]
        y = self._layer_int8(i, s, x, dt)
        if y is None:
            x = _canonical(x).astype(dt, copy=False)
            w = self._const(s.inputs[1], dt)
            y = float_node_fn(self._nodes[i], [x, w])[0]
        if y.dtype != dt:
            y = y.astype(dt)
        if s.inputs[2]:
            b = self._const(s.inputs[2], dt)
            ax = s.params["out_axis"] % y.ndim
            shp = [1] * y.ndim
            shp[ax] = -1
            y = y + b.reshape(shp)
        if self.check_overflow:
            lim = float(1 << (self.check_overflow - 1))
            if s.params["bound"] >= lim and y.size and float(np.max(np.abs(y))) >= lim:
                raise DataError(f"layer {s.node!r}: the {self.check_overflow}-bit accumulator overflows on this "
                                "input", hint="use narrower weights or activations for this layer")
        return y

    def _requant(self, s: Step, env: dict) -> np.ndarray:
        P = s.params
        x = np.ascontiguousarray(env[s.inputs[0]])
        out = np.empty(x.shape, np.float32)
        xv = K.as_pcs(x, P["axis"])
        ov = K.as_pcs(out, P["axis"])
        C = xv.shape[1]
        lo = np.broadcast_to(np.asarray(P["lo"], np.float64), (C,)).copy()
        hi = np.broadcast_to(np.asarray(P["hi"], np.float64), (C,)).copy()
        if "mult" in P:
            mult = np.broadcast_to(np.asarray(P["mult"], np.float64), (C,)).copy()
            K.requant_float(xv, mult, lo, hi, ov)
            return out
        shift = np.broadcast_to(np.asarray(P["shift"], np.int64), (C,)).copy()
        mode = K.MODES[P["mode"]]
        den = P.get("den")
        if len(s.inputs) > 1:  # per-position counts
            d = np.ascontiguousarray(np.broadcast_to(env[s.inputs[1]], x.shape), dtype=np.float64)
            K.requant_div(xv.astype(np.float64), shift, K.as_pcs(d, P["axis"]), lo, hi, mode, ov)
        elif den is not None and den != 1.0:
            d = np.full(x.shape, float(den))
            K.requant_div(xv.astype(np.float64), shift, K.as_pcs(d, P["axis"]), lo, hi, mode, ov)
        else:
            K.requant_bias(xv, np.zeros(C), shift, lo, hi, mode, ov)
        return out


def run_program(program, x: np.ndarray, *, batch_size: int = 64, progress: str | None = None,
                outputs: str = "first") -> np.ndarray | dict:
    """Run ``program`` (a Program or the path of a bundle .npz) on ``x`` in batches; returns the
    first output (``outputs="all"``: every output by name)."""
    prog = program if isinstance(program, Program) else load_bundle(program)
    emu = Emulator(prog)
    chunks: dict[str, list] = {o["name"]: [] for o in prog.outputs}
    for sl in progress_iter(list(batches(len(x), batch_size)), desc=progress):
        res = emu.run(x[sl])
        for k2, v in res.items():
            chunks[k2].append(v)
    out = {k2: np.concatenate(v, axis=0) for k2, v in chunks.items()}
    return out if outputs == "all" else out[prog.outputs[0]["name"]]
