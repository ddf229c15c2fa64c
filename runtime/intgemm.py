"""Exact 8-bit integer GEMMs for the fixed-point emulator, on onnxruntime's ``MatMulInteger``.

The emulator holds integers in float arrays and multiplies them with float BLAS, which is exact
(docs/FIXED_POINT.md) but runs at float speed. When a layer's weights are 8-bit integers and a
batch's activations span at most 256 values, the same product-sums can run on 8-bit integer
kernels: ``A`` (uint8, the activations shifted by a zero point ``z``) times ``B`` (the weights)
with int32 accumulation, ``(A - z) @ B``. The result is the same integers, so the emulator stays
bit-exact; only the speed changes.

Which kernel is exact. onnxruntime's uint8 x uint8 kernel (``B`` stored as ``w + 128`` with zero
point 128) widens both operands to 16 bits before multiplying: exact for any 8-bit data. Its
uint8 x int8 kernel is about twice as fast but, on x86 CPUs without VNNI, adds pairs of products
in a *saturating* 16-bit instruction (``vpmaddubsw``): exact only while every pair sum fits in
[-32768, 32767]. ``IntGemm`` uses it only where that holds for any pairing of the K elements:
``max(A) * (|b|_1st + |b|_2nd largest in any column) <= 32767``, checked per call on the actual
batch; otherwise it uses the uint8 x uint8 kernel. On CPUs with VNNI (``vpdpbusd``: four
products added into int32, no 16-bit step) the uint8 x int8 kernel is exact for any data;
``u8s8_exact`` finds out once per process by running it on the worst pairs there are (every
product 255 x -128 or 255 x 127, a shape off the kernels' block sizes) and comparing with int64
arithmetic: a saturating kernel cannot pass that probe, and where it passes every batch takes the
fast kernel. int32 accumulation is exact because the
lowering bounds each layer's accumulator (``bound``) and the emulator only calls this below 2^31
(products of the shifted operands may wrap in int32 on the way; two's-complement wrapping undoes
itself in the zero-point correction, and the final value fits).

One onnxruntime thread per session, like the emulator's other kernels (serial on purpose: see
runtime/emulator_kernels.py).
"""
from __future__ import annotations

import functools

import numpy as np

#: the largest accumulator bound the int32 kernels may be given
INT32_EXACT = float(1 << 31)
_PAIR_LIMIT = 32767


def _session(b: np.ndarray, zero_point: int):
    # start-up: onnxruntime and onnx load when the first 8-bit layer runs, not with the emulator
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper  # start-up (as above)

    K, M = b.shape
    etype = TensorProto.INT8 if b.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zp", "b_zp"], ["y"])], "intgemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["R", K]),
         helper.make_tensor_value_info("a_zp", TensorProto.UINT8, [])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["R", M])],
        [numpy_helper.from_array(b, "b"),
         numpy_helper.from_array(np.array(zero_point, b.dtype), "b_zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@functools.cache
def u8s8_exact() -> bool:
    """Whether onnxruntime's uint8 x int8 ``MatMulInteger`` is exact for any 8-bit data on this CPU
    (no saturating 16-bit pair sums): one probe per process, on the worst case (module docstring)."""
    K, M, R = 75, 37, 7  # not multiples of 4, 16 or 64: the kernels' remainder paths run too
    w = np.full((K, M), 127, np.int8)
    w[:, ::2] = -128  # pairs of 255 x -128: -65280 in a column of -128s, 64770 in a column of 127s
    w[::5, 3::4] = -128  # mixed columns
    a = np.full((R, K), 255, np.uint8)
    a[1, ::3] = 0
    ref = a.astype(np.int64) @ w.astype(np.int64)
    y = _session(w, 0).run(None, {"a": a, "a_zp": np.array(0, np.uint8)})[0]
    return bool(np.array_equal(y.astype(np.int64), ref))


class IntGemm:
    """``(A - z) @ W`` for a fixed integer matrix ``W`` (K, M) with entries in [-128, 127]."""

    def __init__(self, w: np.ndarray):
        w = np.asarray(w)
        if not self.supports(w):
            raise ValueError("IntGemm needs an integer matrix with entries in [-128, 127]")
        self.w = w.astype(np.int8)
        a = np.sort(np.abs(self.w.astype(np.int32)), axis=0)
        # the largest sum of two entries of one column: bounds any pair of products
        self.pair = int((a[-1] + (a[-2] if len(a) > 1 else 0)).max()) if a.size else 0
        self._signed = None
        self._unsigned = None

    @staticmethod
    def supports(w: np.ndarray) -> bool:
        return (w.ndim == 2 and w.size > 0 and bool(np.all(np.isfinite(w))) and float(w.min()) >= -128
                and float(w.max()) <= 127 and bool(np.all(np.rint(w) == w)))

    def kernel_for(self, a_max: int) -> str:
        """``"u8s8"`` when the uint8 x int8 kernel is exact for activations up to ``a_max`` (always on a
        CPU where it does not saturate: ``u8s8_exact``), else ``"u8u8"``."""
        return "u8s8" if a_max * self.pair <= _PAIR_LIMIT or u8s8_exact() else "u8u8"

    def __call__(self, a: np.ndarray, zero_point: int, a_max: int | None = None) -> np.ndarray:
        """``a``: uint8 (R, K); returns the int32 (R, M) product of ``a - zero_point`` and ``W``.
        ``a_max``: a bound on ``a`` the caller already knows (default: read from ``a``)."""
        if a_max is None:
            a_max = int(a.max()) if a.size else 0
        if self.kernel_for(a_max) == "u8s8":
            if self._signed is None:
                self._signed = _session(self.w, 0)
            sess = self._signed
        else:
            if self._unsigned is None:
                self._unsigned = _session((self.w.astype(np.int16) + 128).astype(np.uint8), 128)
            sess = self._unsigned
        return sess.run(None, {"a": a, "a_zp": np.array(zero_point, np.uint8)})[0]


def uint8_zero_point(x: np.ndarray) -> tuple[int, int] | None:
    """``(z, a_max)``: the zero point ``z`` in [0, 255] with ``x + z`` in [0, 255] (so that 0, a
    convolution's padding, maps to ``z``) for an integer-valued array spanning at most 256 values
    around 0, and the largest shifted value ``max(x, 0) + z``; None when there is no such ``z``."""
    if x.size == 0:
        return None
    lo, hi = float(x.min()), float(x.max())
    z = int(-min(lo, 0.0))
    a_max = int(max(hi, 0.0)) + z
    if z > 255 or a_max > 255:
        return None
    return z, a_max
