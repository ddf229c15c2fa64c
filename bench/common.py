"""Helpers shared by the benchmark scripts: data, onnxruntime sessions, timing, RESULTS.md sections."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(os.environ.get("MPQC_BENCH") or ROOT.parent / "shared" / "bench")
RESULTS = ROOT / "bench" / "RESULTS.md"
OUT = ROOT / "bench" / "out"

DIGITS_MODELS = ("digits_resnet", "digits_vgg", "digits_alexnet")
ALL_MODELS = DIGITS_MODELS + ("efficientnet_lite0",)


def model_path(name: str) -> Path:
    return BENCH / f"{name}.onnx"


def load_split(model: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(x float32, y) of a split: digits.npz for the digits models, photos.npz for EfficientNet
    (whose labels are the float model's top-1: accuracy there is agreement with float)."""
    d = np.load(BENCH / ("photos.npz" if model.startswith("efficientnet") else "digits.npz"))
    return d[f"x_{split}"].astype(np.float32), d[f"y_{split}"]


def ort_session(model, *, exact: bool = False, threads: int | None = None):
    """onnxruntime CPU session. ``exact``: QDQ fusion off, so every QuantizeLinear/DequantizeLinear
    and float op runs as the ONNX specification defines it (the reference for bit-exactness);
    otherwise the default session with onnxruntime's fused int8 kernels."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        so.intra_op_num_threads = threads
    src = model if isinstance(model, (bytes, str)) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_run(sess, x: np.ndarray, batch: int = 64) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def top1(out: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(out.reshape(len(out), -1), 1) == np.asarray(y).reshape(-1)))


def agreement_stats(a: np.ndarray, b: np.ndarray, lsb: float) -> dict:
    """Top-1 equality count and the largest elementwise difference in LSB of the output format."""
    eq = int(np.sum(np.argmax(a.reshape(len(a), -1), 1) == np.argmax(b.reshape(len(b), -1), 1)))
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)) / lsb
    return {"top1_equal": eq, "samples": int(len(a)), "max_lsb": float(d.max()),
            "elements_differing": int(np.sum(d > 0)), "elements": int(d.size)}


def throughput(fn, n_items: int, *, repeat: int = 3) -> float:
    """Items per second of ``fn()`` (one warm-up call, best of ``repeat``)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_items / best


def replace_section(text: str, section: str, body: str) -> str:
    """``text`` with the markdown section starting at ``section`` replaced by ``body`` (appended if absent)."""
    if section not in text:
        return text.rstrip("\n") + "\n\n" + body
    start = text.index(section)
    nxt = text.find("\n## ", start + len(section))
    end = len(text) if nxt < 0 else nxt + 1
    return text[:start] + body + ("\n" if nxt >= 0 and not body.endswith("\n\n") else "") + text[end:]


def write_section(section: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    RESULTS.write_text(replace_section(text, section, body))
