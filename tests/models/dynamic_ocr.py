"""A PaddleOCR-style text-direction classifier, exported the way paddle2onnx does at opset 11.

* input ``x`` of shape ``[N, 3, H, W]`` with symbolic N, H and W (``dim_param``);
* every weight a ``Constant`` node (no initializers);
* Conv (+ bias) -> BatchNormalization -> hard-swish (``x * HardSigmoid(x)``: HardSwish is an
  opset-14 op, so an opset-11 export spells it out), a depthwise Conv -> opset-11 ``Clip`` with
  min/max as inputs (ReLU6), a squeeze-and-excitation block (GlobalAveragePool -> Conv -> Relu ->
  Conv -> HardSigmoid -> Mul), a 1x1 Conv and an AveragePool;
* a head that computes its flatten target from the tensor's shape: ``Shape -> Slice`` (batch) and
  ``Shape -> Gather`` (C, H, W) -> Mul -> Unsqueeze -> Concat -> Reshape, then MatMul + Add.

The classifier's weight is sized for a 3x48x192 input (what PaddleOCR's classifier is trained on),
so the model only runs at that height and width although its input says ``?``.

``build(path)`` writes the model; ``write_data(path, model)`` writes a ``.npz`` with calib / eval /
test splits whose labels are the float model's argmax (agreement with the float model).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H, W = 48, 192
CLASSES = 4
SPLITS = {"calib": 32, "eval": 48, "test": 48}


class _B:
    def __init__(self, seed: int):
        self.nodes: list = []
        self.rng = np.random.default_rng(seed)
        self.k = 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}_{self.k}"

    def const(self, base: str, arr) -> str:
        out = self.name(base)
        arr = np.asarray(arr)
        self.nodes.append(helper.make_node("Constant", [], [out], name=out + "_node",
                                           value=numpy_helper.from_array(arr, out)))
        return out

    def op(self, op: str, ins: list[str], base: str | None = None, **attrs) -> str:
        out = self.name(base or op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], name=out + "_node", **attrs))
        return out

    def randn(self, *shape, scale=1.0):
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def conv(self, x, cin, cout, k=3, stride=1, group=1, bias=True):
        fan = cin // group * k * k
        ins = [x, self.const("w", self.randn(cout, cin // group, k, k, scale=np.sqrt(2.0 / fan)))]
        if bias:
            ins.append(self.const("b", self.randn(cout, scale=0.1)))
        return self.op("Conv", ins, "conv", kernel_shape=[k, k], strides=[stride, stride],
                       pads=[k // 2] * 4, group=group)

    def bn(self, x, c):
        return self.op("BatchNormalization",
                       [x, self.const("gamma", 1 + self.randn(c, scale=0.1)), self.const("beta", self.randn(c, scale=0.1)),
                        self.const("mean", self.randn(c, scale=0.1)),
                        self.const("var", (0.5 + self.rng.random(c)).astype(np.float32))], "bn", epsilon=1e-5)

    def hardswish(self, x, opset):
        if opset >= 14:
            return self.op("HardSwish", [x], "hswish")
        return self.op("Mul", [x, self.op("HardSigmoid", [x], "hsig", alpha=1 / 6, beta=0.5)], "hswish")


def make_model(seed: int = 0, opset: int = 11) -> onnx.ModelProto:
    """The classifier at ``opset`` (11: hard-swish spelled out, Unsqueeze's axes an attribute; 14 and
    later: the HardSwish op; 13 and later: axes an input)."""
    b = _B(seed)
    x = "x"
    t = b.hardswish(b.bn(b.conv(x, 3, 8, 3, stride=2), 8), opset)                       # [N,8,24,96]
    t = b.conv(t, 8, 8, 3, stride=2, group=8)                                    # depthwise, [N,8,12,48]
    t = b.op("Clip", [t, b.const("min", np.array(0, np.float32)), b.const("max", np.array(6, np.float32))], "relu6")
    s = b.op("GlobalAveragePool", [t], "se_pool")                               # squeeze-and-excitation
    s = b.op("Relu", [b.conv(s, 8, 4, 1)], "se_relu")
    s = b.op("HardSigmoid", [b.conv(s, 4, 8, 1)], "se_gate", alpha=0.2, beta=0.5)
    t = b.op("Mul", [t, s], "se_scale")
    t = b.hardswish(b.conv(t, 8, 16, 1), opset)                                       # [N,16,12,48]
    t = b.op("AveragePool", [t], "pool", kernel_shape=[4, 4], strides=[4, 4])   # [N,16,3,12]
    shape = b.op("Shape", [t], "shape")
    n = b.op("Slice", [shape, b.const("s0", np.array([0], np.int64)), b.const("e0", np.array([1], np.int64)),
                       b.const("ax", np.array([0], np.int64))], "batch")
    dims = [b.op("Gather", [shape, b.const("i", np.array(i, np.int64))], "dim", axis=0) for i in (1, 2, 3)]
    chw = b.op("Mul", [b.op("Mul", dims[:2], "ch"), dims[2]], "chw")
    chw1 = (b.op("Unsqueeze", [chw], "chw1", axes=[0]) if opset < 13 else
            b.op("Unsqueeze", [chw, b.const("axes", np.array([0], np.int64))], "chw1"))
    target = b.op("Concat", [n, chw1], "target", axis=0)
    flat = b.op("Reshape", [t, target], "flatten")                               # [N, 576]
    feat = 16 * (H // 16) * (W // 16)
    logits = b.op("Add", [b.op("MatMul", [flat, b.const("fc_w", b.randn(feat, CLASSES, scale=np.sqrt(1.0 / feat)))],
                               "fc"), b.const("fc_b", b.randn(CLASSES, scale=0.05))], "logits")
    graph = helper.make_graph(
        b.nodes, "text_direction_cls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", CLASSES])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="paddle2onnx-like")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def build(path: str | Path, seed: int = 0, opset: int = 11) -> Path:
    path = Path(path)
    onnx.save(make_model(seed, opset), str(path))
    return path


def images(n: int, seed: int, h: int = H, w: int = W) -> np.ndarray:
    """Text-line-like images: dark strokes on a bright background with a per-image tilt, in [0, 1]
    normalised by PaddleOCR's (x - 0.5) / 0.5."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        f = rng.uniform(0.05, 0.4)
        phase = rng.uniform(0, 2 * np.pi)
        slope = rng.uniform(-0.3, 0.3)
        base = 0.5 + 0.4 * np.sin(f * xx + phase + slope * yy) * np.exp(-((yy - h * rng.uniform(0.3, 0.7)) / (h / 3)) ** 2)
        img = base[None] * rng.uniform(0.6, 1.2, (3, 1, 1)) + rng.normal(0, 0.08, (3, h, w))
        out[i] = (np.clip(img, 0, 1) - 0.5) / 0.5
    return out


def write_data(path: str | Path, model: str | Path, seed: int = 1) -> Path:
    """calib / eval / test splits; labels are the float model's argmax (onnxruntime)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    arrays = {}
    for k, (split, n) in enumerate(SPLITS.items()):
        x = images(n, seed + k)
        arrays[f"x_{split}"] = x
        arrays[f"y_{split}"] = np.argmax(s.run(None, {"x": x})[0], 1).astype(np.int64)
    path = Path(path)
    np.savez(path, **arrays)
    return path
