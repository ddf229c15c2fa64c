"""Evaluate a model file on a data split with one of the runtimes (``mpqc eval``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.bdcnn_program import is_bdcnn_bundle
from ..core.errors import CompilerError, DataError, ModelError, OptionError
from ..core.ir import Graph
from ..core.program import bundle_input_value
from ..runtime.bdcnn import run_bdcnn
from ..runtime.executor import run_batched
from .data import load_dataset, model_batch
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


def _ort_error(e: Exception, model, stage: str) -> ModelError:
    msg = " ".join(str(e).split())[:300] or type(e).__name__
    src = "the model" if isinstance(model, Graph) else repr(str(model))
    return ModelError(f"onnxruntime {stage} {src}: {msg}",
                      hint="onnxruntime rejects this model; try --runtime float")


def run_ort(model, x: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    try:
        sess = ort_session(model)
    except CompilerError:
        raise
    except Exception as e:  # onnxruntime's Fail / InvalidGraph / NotImplemented / RuntimeException ...
        raise _ort_error(e, model, "cannot load") from None
    try:
        inp = sess.get_inputs()[0]
        name = inp.name
        fixed = inp.shape[0] if inp.shape else None
        if isinstance(fixed, int) and fixed > 0:  # a fixed batch: run at the model's batch size
            if len(x) % fixed:
                raise DataError(f"the model's input {name!r} has a fixed batch of {fixed}, but the data has "
                                f"{len(x)} samples, not a multiple of it")
            batch_size = fixed
        outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
        return np.concatenate(outs, axis=0)
    except (MemoryError, CompilerError):
        raise
    except Exception as e:
        raise _ort_error(e, model, "failed to run") from None


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
    batch_size = model_batch(inp, batch_size)  # a fixed-batch model runs at its batch size
    metric = metric or ("top1" if ds.y is not None else "agreement")
    check_metric(metric, ds.y is not None)
    ref = None
    if metric in NEEDS_REFERENCE:
        if reference is None:
            raise OptionError(f"--metric {metric} compares with a float model: give --reference FLOAT.onnx")
        ref = run_model(reference, ds.x, runtime="float", batch_size=batch_size)
    if is_bundle:
        try:
            out = run_model(graph_or_path, ds.x, runtime=runtime, batch_size=batch_size, progress="eval")
        except CompilerError:
            raise
        except (KeyError, IndexError, ValueError, TypeError, AttributeError, ZeroDivisionError) as e:
            # the manifest passed its schema check, but its steps do not fit together
            raise ModelError(f"bundle {str(model)!r} cannot be executed ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]})",
                             hint="the bundle is damaged or was not written by this mpqc; write it again") from None
    else:
        out = run_model(graph_or_path, ds.x, runtime=runtime, batch_size=batch_size, progress="eval")
    out = np.asarray(out)
    if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise DataError(f"--data {ds.source}: the model's output holds {bad} NaN or infinite values "
                        f"({runtime} runtime); its value would be meaningless",
                        hint="check the model's weights and the data's range")
    try:
        value = evaluate(metric, out, ds.y, ref)
    except DataError as e:  # name the data the labels / outputs came from
        raise DataError(f"--data {ds.source}: {e.message}", hint=e.hint) from None
    return {"model": str(model), "data": ds.source, "samples": len(ds), "metric": metric, "value": value,
            "runtime": runtime}
