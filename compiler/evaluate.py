"""Evaluate a model file on a data split with one of the runtimes (``mpqc eval``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.bdcnn_program import is_bdcnn_bundle
from ..core.errors import DataError, ModelError, OptionError
from ..core.ir import Graph
from ..core.program import bundle_input_value
from ..runtime.bdcnn import run_bdcnn
from ..runtime.executor import run_batched
from .data import load_dataset
from .export import load_qdq_graph as load_graph  # the frontend's loader, plus int4 weights widened
from .export import to_onnx
from .lowering import run_emulator
from .metrics import NEEDS_REFERENCE, check_metric, evaluate

RUNTIMES = ("float", "emulator", "popcount", "ort")


def run_model(model: Graph | str | os.PathLike, x: np.ndarray, *, runtime: str = "float",
              batch_size: int = 64, progress: str | None = None) -> np.ndarray:
    """First output of ``model`` on ``x`` under ``runtime``."""
    if runtime == "ort":
        return run_ort(model, x, batch_size=batch_size)
    if runtime == "emulator":
        return run_emulator(model, x, batch_size=batch_size, progress=progress)
    if runtime == "popcount":
        return run_bdcnn(model, x, batch_size=batch_size, progress=progress)[0]
    if runtime != "float":
        raise OptionError(f"--runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIMES)}")
    g = model if isinstance(model, Graph) else load_graph(model)
    return run_batched(g, x, batch_size=batch_size, progress=progress)[0]


def ort_session(model: Graph | str | os.PathLike):
    import onnxruntime as ort  # start-up: onnxruntime loads in about a second, needed only here
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = to_onnx(model, check=False).SerializeToString() if isinstance(model, Graph) else str(model)
    # onnxruntime >= 1.20 would round float weights feeding a QDQ layer to int8 (a bdcnn model's
    # reconstructed weights): run the model as written
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["WeightBiasQuantization"])


def run_ort(model, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    sess = ort_session(model)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def evaluate_file(model: str, data: str, *, metric: str | None = None, reference: str | None = None,
                  runtime: str = "float", batch_size: int = 64) -> dict:
    is_bundle = str(model).endswith(".npz")
    if is_bundle:
        own = "popcount" if is_bdcnn_bundle(model) else "emulator"
        runtime = own if runtime in ("float", own) else runtime
        if runtime != own:
            raise OptionError(f"{model!r} is a {'binary-decomposed' if own == 'popcount' else 'fixed-point'} "
                              f"target bundle: evaluate it with --runtime {own}")
    if not is_bundle and not Path(model).exists():
        raise ModelError(f"model file {model!r} does not exist")
    if is_bundle:
        inp = bundle_input_value(model)
        graph_or_path = model
    else:
        g = load_graph(model)
        inp = g.inputs[0]
        graph_or_path = g if runtime != "ort" else model
    ds = load_dataset(data, inp, default_split="eval", option="--data")
    metric = metric or ("top1" if ds.y is not None else "agreement")
    check_metric(metric, ds.y is not None)
    ref = None
    if metric in NEEDS_REFERENCE:
        if reference is None:
            raise OptionError(f"--metric {metric} compares with a float model: give --reference FLOAT.onnx")
        ref = run_model(reference, ds.x, runtime="float", batch_size=batch_size)
    out = run_model(graph_or_path, ds.x, runtime=runtime, batch_size=batch_size, progress="eval")
    try:
        value = evaluate(metric, out, ds.y, ref)
    except DataError as e:  # name the data the labels / outputs came from
        raise DataError(f"--data {ds.source}: {e.message}", hint=e.hint) from None
    return {"model": str(model), "data": ds.source, "samples": len(ds), "metric": metric, "value": value,
            "runtime": runtime}
