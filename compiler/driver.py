"""The compile driver behind both the CLI and the Python API.

``compile_model`` imports the model, loads data, builds the pipeline for the level
and target (or parses ``passes``), runs it, and writes the outputs atomically: the
ONNX model, the report (JSON, optional HTML) and the target bundle. Outputs are
written only after the whole pipeline succeeded, so a failure leaves nothing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import DataError, OptionError
from ..core.ir import Graph
from ..runtime.executor import run_batched
from ..runtime.parallel import dask_scheduler
from .bdcnn import compile_bdcnn
from .bitsearch import FloatReference
from .bundle import bundle_bytes
from .cache import ResultCache, graph_digest, open_cache
from .data import Dataset, check_input, load_dataset, model_batch, parse_spec, peek_shape
from .export import atomic_write_bytes, commit_files, to_onnx
from .frontend import import_model
from .html_report import render_html
from .info import model_info
from .lowering import run_emulator
from .metrics import NEEDS_REFERENCE, check_metric, evaluate
from .options import CompileOptions, parse_bases
from .passes import Pass, PassContext, PassManager
from .pipelines import build_pipeline, parse_pipeline
from .qdq import dequantized_view, is_quantized
from .targets import Target, get_target

log = logging.getLogger(__name__)


@dataclass
class CompileResult:
    """What ``compile_model`` returns: the compiled IR ``graph`` (QDQ form after insert-qdq;
    ``node.qconfig``/``value.qformat`` hold the decisions), the canonical ``float_graph``, the
    ``report`` (what ``--report`` writes), the pass ``context`` and the pass ``timings``."""
    graph: Graph
    float_graph: Graph
    report: dict[str, Any]
    context: PassContext
    timings: list = field(default_factory=list)
    #: (npz, manifest JSON) of a bundle built by the compilation itself (the bdcnn target's); None:
    #: ``--emit-bundle`` lowers ``graph`` to the fixed-point program
    bundle: tuple[bytes, bytes] | None = None
    #: what came from the result cache (``ResultCache.summary``; None without a cache)
    cache: dict | None = None

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, to_onnx(self.graph).SerializeToString(deterministic=True))

    def onnx_bytes(self) -> bytes:
        return to_onnx(self.graph).SerializeToString(deterministic=True)


def _as_dataset(d, graph: Graph, option: str, default_split: str) -> Dataset | None:
    if d is None:
        return None
    if isinstance(d, Dataset):
        return d
    if isinstance(d, (str, os.PathLike)):
        return load_dataset(str(d), graph.inputs[0], default_split=default_split, option=option)
    if isinstance(d, tuple):
        x, y = d
        return Dataset(check_input(np.asarray(x), graph.inputs[0], option), None if y is None else np.asarray(y),
                       f"<array>{option}")
    return Dataset(check_input(np.asarray(d), graph.inputs[0], option), None, f"<array>{option}")


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_json"):
        return o.to_json()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def report_json_bytes(report: dict) -> bytes:
    return (json.dumps(report, indent=1, sort_keys=True, default=json_default, allow_nan=False) + "\n").encode()


def _clean_nan(o):
    if isinstance(o, float) and not np.isfinite(o):
        return None if np.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: _clean_nan(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean_nan(v) for v in o]
    return o


@dataclass(frozen=True)
class Outputs:
    """Files a compile writes, all or nothing, after the whole pipeline succeeded: ``model``
    (QDQ .onnx, ``-o``), ``report`` (JSON), ``html`` (report with plots), ``bundle`` (target
    bundle .npz, plus its .json manifest beside it)."""
    model: str | os.PathLike | None = None
    report: str | os.PathLike | None = None
    html: str | os.PathLike | None = None
    bundle: str | os.PathLike | None = None
    #: Make-format dependency file (``-MD``/``-MF``): the outputs depend on the model, its ONNX
    #: external-data files and the data files; written in the same transaction as the outputs
    depfile: str | os.PathLike | None = None
    #: the depfile rule's targets (``-MT``; default: every output above)
    dep_targets: tuple[str, ...] = ()
    #: also a phony rule per dependency (``-MP``), so that make does not fail on a deleted input
    dep_phony: bool = False

    def paths(self) -> list[str]:
        """Every file written besides the depfile (the bundle's manifest included), in order."""
        out = [os.fspath(p) for p in (self.model, self.bundle) if p is not None]
        if self.bundle is not None:
            out.append(str(bundle_manifest_path(self.bundle)))
        out += [os.fspath(p) for p in (self.report, self.html) if p is not None]
        return out


@dataclass(frozen=True)
class Diagnostics:
    """``--verify-each``, ``--print-after PASS`` (a set of pass names, or "all"), ``--time-passes``;
    ``printer`` receives the printed text (default: stdout)."""
    verify_each: bool = False
    print_after: frozenset[str] = frozenset()
    time_passes: bool = False
    printer: Any = None


def compile_model(model: str | os.PathLike | Graph, *, level: int = 1, target: str | Target | None = "npu8",
                  calib=None, eval=None, train=None, metric: str | None = None,
                  passes: str | list[Pass] | None = None, options: CompileOptions | dict | None = None,
                  outputs: Outputs | None = None, diagnostics: Diagnostics | None = None,
                  seed: int = 0, quiet: bool = True, batch_size: int = 64,
                  cache: ResultCache | str | os.PathLike | bool | None = None, jobs: int = 1,
                  scheduler: str | None = None) -> CompileResult:
    """Compile ``model`` (a path or a Graph) and write ``outputs``.

    ``level``: -O level (ignored when ``passes`` is given: a pass list string or Pass instances);
    ``target``: a target name or ``Target``; ``calib``/``eval``/``train``: data (``FILE.npz[:SPLIT]``,
    an array, an ``(x, y)`` tuple or a ``Dataset``); ``metric``: evaluation value (default top1
    with labels, else agreement); ``options``: ``CompileOptions`` (or a dict of its fields);
    ``seed``, ``quiet`` (no progress bars), ``batch_size``; ``cache``: the result cache
    (``compiler/cache.py``: a folder, True for the default one, a ``ResultCache``; None/False:
    none); ``jobs``: worker processes for the search's evaluations and influence sweeps (results
    identical for any number); ``scheduler``: run those on a Dask distributed cluster instead
    (``"tcp://HOST:PORT"``, or ``"local"`` for a LocalCluster of ``jobs`` workers; needs the optional
    ``dask[distributed]``; same results). See ``mpqc --help``."""
    t0 = time.perf_counter()
    t_start = time.monotonic()
    outputs = outputs or Outputs()
    diagnostics = diagnostics or Diagnostics()
    opts = CompileOptions.coerce(options)
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
    if not isinstance(jobs, int) or jobs < 1:
        raise OptionError(f"--jobs must be a whole number of at least 1, got {jobs}")
    if scheduler is not None and (not isinstance(scheduler, str) or not scheduler.strip()):
        raise OptionError(f"--scheduler must be a scheduler address (tcp://HOST:PORT) or 'local', got {scheduler!r}")
    for flag, chosen in (("finetune", opts.finetune), ("equalize", opts.equalize)):
        if passes is not None and chosen is not None:
            raise OptionError(f"--{flag}/--no-{flag} choose a level's pipeline; with --passes list '{flag}' "
                              "in the pass list instead")
    if passes is not None and opts.rounding is not None:
        raise OptionError("--rounding chooses a level's pipeline; with --passes give "
                          "'optimize-rounding{solver=...}' in the pass list instead")
    bdcnn = passes is None and level >= 1 and tgt_is_bdcnn(target)
    if bdcnn and level >= 3:
        raise OptionError("--target bdcnn compiles at -O1 (Q fixed) or -O2 (Q searched per layer); pruning "
                          "(-O3) is not combined with binary decomposition yet: prune with -O3 on another "
                          "target's pipeline first, or use -O2")
    if passes is None and not bdcnn:
        if level >= 3 and opts.flops is None:
            raise OptionError("-O3 prunes channels to a MACs budget: give --flops F (the fraction of the float "
                              "model's MACs to keep, e.g. 0.5)")
        if level < 3 and (opts.flops is not None or opts.prune is not None or opts.ratios is not None):
            raise OptionError("--flops, --prune and --ratios choose how -O3 prunes; use -O3 (or list "
                              "'prune-channels' in --passes)")
    if outputs.depfile is not None and not outputs.paths():
        raise OptionError("a depfile (-MD/-MF) names the outputs' dependencies: give -o (or --report, --html, "
                          "--emit-bundle)")
    check_outputs_differ(("--output", outputs.model), ("--report", outputs.report), ("--html", outputs.html),
                         ("--emit-bundle", outputs.bundle), ("-MF", outputs.depfile),
                         inputs=[(o, d) for o, d in (("model", None if isinstance(model, Graph) else model),
                                                     ("--calib", calib), ("--eval", eval), ("--train", train))
                                 if isinstance(d, (str, os.PathLike))])
    with _scheduler(scheduler, jobs) as client:
        if client is not None:  # the calls made with jobs > 1 go to the cluster: at least one per worker
            jobs = max(jobs, 2, len(client.scheduler_info().get("workers", {})))
        if isinstance(model, Graph):
            if opts.input_shape:
                raise OptionError("--input-shape fixes dims when a model file is imported; this model is an "
                                  "IR graph already (set its input's shape instead)")
            graph, shape_rows = model, None
        else:
            graph, shape_rows = import_model(model, input_shapes=opts.input_shapes,
                                             data_shape=_data_shape((calib, "--calib", "calib"),
                                                                    (eval, "--eval", "eval")))
        depends = [] if outputs.depfile is None else dependencies(model, calib, eval, train)
        tgt = get_target(target) if isinstance(target, str) else target
        if graph.inputs:
            batch_size = model_batch(graph.inputs[0], batch_size)  # a fixed-batch model runs at its batch
        store = open_cache(cache)
        ctx = PassContext(target=tgt, seed=seed, quiet=quiet, batch_size=batch_size, options=opts, metric=metric,
                          store=store, jobs=jobs,
                          deadline=None if opts.time_budget is None else t_start + float(opts.time_budget))
        ctx.calib = _as_dataset(calib, graph, "--calib", "calib")
        ctx.eval = _as_dataset(eval, graph, "--eval", "eval")
        ctx.train = _as_dataset(train, graph, "--train", "train")
        if bdcnn:
            pipeline = build_pipeline(0)  # canonicalize; then compile_bdcnn decomposes and searches Q
        elif passes is None:
            pipeline = build_pipeline(level, tgt, finetune=opts.finetune, equalize=opts.equalize,
                                      rounding=opts.rounding)
        elif isinstance(passes, str):
            pipeline = parse_pipeline(passes)
        else:
            pipeline = list(passes)
        ctx.report.update({
            "mpqc_version": _version(),
            "model": graph.name,
            "level": level if passes is None else None,
            "target": tgt.to_json() if tgt is not None else None,
            "pipeline": [p.spec() for p in pipeline] + (["binary-decomposition (compile_bdcnn)"] if bdcnn else []),
            "data": {k: (None if d is None else {"source": d.source, "samples": len(d), "labels": d.y is not None})
                     for k, d in (("calib", ctx.calib), ("eval", ctx.eval), ("train", ctx.train))},
            "inputs": shape_rows,
            "float_model": model_info(graph),
        })
        float_graph = graph.copy()
        ctx.float_graph = float_graph
        pm = PassManager(pipeline, verify_each=diagnostics.verify_each, print_after=set(diagnostics.print_after),
                         time_passes=diagnostics.time_passes, printer=diagnostics.printer)
        pm.run(graph, ctx)
        if bdcnn:
            result = _compile_bdcnn(graph, ctx, level, opts, pm.timings)
            result.cache = _finish_cache(ctx, diagnostics)
            write_outputs(result, outputs, depends)
            return result
        # the float reference for later comparisons is the canonical float network
        ctx.report["compiled_model"] = model_info(dequantized_view(graph))
        if ctx.eval is not None:
            measure_accuracy(graph, ctx.float_graph or float_graph, ctx)
        missed = [sec["goal_missed"] for sec in (ctx.report.get("passes") or {}).values()
                  if isinstance(sec, dict) and "goal_missed" in sec]
        if missed:
            ctx.report["goal_missed"] = missed[-1]  # the last word: the bit-width search's, after pruning's
        stages = stage_table(ctx.report)
        if stages:
            ctx.report["stages"] = stages
        if diagnostics.time_passes:  # timings vary run to run: only on request, so reports stay byte-identical
            ctx.report["timings"] = [{"pass": t.name, "seconds": round(t.seconds, 4), "modified": t.modified}
                                     for t in pm.timings]
            ctx.report["total_seconds"] = round(time.perf_counter() - t0, 3)
        stopped = [sec["time_budget_exceeded"] for sec in (ctx.report.get("passes") or {}).values()
                   if isinstance(sec, dict) and isinstance(sec.get("time_budget_exceeded"), dict)]
        if stopped:
            ctx.report["time_budget_exceeded"] = stopped[-1]
        result = CompileResult(graph, ctx.float_graph or float_graph, ctx.report, ctx, pm.timings,
                               cache=_finish_cache(ctx, diagnostics))
        write_outputs(result, outputs, depends)
        return result


def _data_shape(*candidates) -> tuple | None:
    """``(shape, option, source)`` of the first data given (calibration, else evaluation data):
    what fills the symbolic non-batch dims of the model's first input that --input-shape leaves
    open (``frontend.fix_input_shapes``)."""
    for d, option, split in candidates:
        if d is None:
            continue
        if isinstance(d, (str, os.PathLike)):
            peek = peek_shape(os.fspath(d), split)
            return None if peek is None else (peek[0], option, peek[1])
        x = d.x if isinstance(d, Dataset) else d[0] if isinstance(d, tuple) else d
        src = d.source if isinstance(d, Dataset) else f"<array>{option}"
        return tuple(np.shape(x)), option, src
    return None


def _scheduler(address: str | None, jobs: int):
    """The Dask cluster of ``--scheduler`` for the block (runtime/parallel.py), or nothing."""
    return contextlib.nullcontext() if address is None else dask_scheduler(address, jobs)


def _finish_cache(ctx: PassContext, diagnostics: Diagnostics) -> dict | None:
    """Bound the cache folder and return what came from the cache (``CompileResult.cache``: the
    CLI's --json and its stderr line); with --time-passes, whose report is run-specific anyway,
    also ``report["cache"]``. Other reports do not say it, so they stay byte-identical."""
    if ctx.store is None:
        return None
    evicted = ctx.store.trim()
    summary = ctx.store.summary()
    summary["evicted"] = evicted
    if diagnostics.time_passes:
        ctx.report["cache"] = summary
    return summary


def measure_accuracy(graph: Graph, float_graph: Graph, ctx: PassContext) -> dict:
    """Final measurement on the eval split: the float network (float runtime) and, when the
    graph is quantized, the fixed-point emulator. Written to ``report["accuracy"]``."""
    ds = ctx.eval
    metric = ctx.metric or ("top1" if ds.y is not None else "agreement")
    check_metric(metric, ds.y is not None)
    ref = ctx.analyses.get(FloatReference, float_graph, split="eval")
    acc = ctx.report.setdefault("accuracy", {})
    acc["metric"] = metric
    acc["data"] = f"{ds.source} ({len(ds)} samples)"
    acc["float"] = evaluate(metric, ref, ds.y, ref)
    if is_quantized(graph):
        def emulated() -> float:
            out = run_emulator(graph, ds.x, batch_size=ctx.batch_size,
                               progress=None if ctx.quiet else "eval emulator")
            return float(evaluate(metric, out, ds.y, ref if metric in NEEDS_REFERENCE else None))
        if ctx.store is None:
            acc["quantized (emulator)"] = emulated()
        else:
            acc["quantized (emulator)"] = ctx.store.memo_json(
                "emulator-accuracy", {"graph": graph_digest(graph), "float": graph_digest(float_graph),
                                      "data": ctx.store.data_digest(ds), "metric": metric,
                                      "batch": ctx.batch_size}, emulated)
    return acc


def tgt_is_bdcnn(target) -> bool:
    t = get_target(target) if isinstance(target, str) else target
    return t is not None and t.binary_decomposed


def _compile_bdcnn(graph: Graph, ctx: PassContext, level: int, opts: CompileOptions, timings) -> CompileResult:
    """The bdcnn target after canonicalization: binary decomposition, calibration of the quantization
    sub-layers, Q per layer (fixed at -O1 or with ``--planes``; Algorithm 1 at -O2), the QDQ model and
    the popcount bundle (``compiler/bdcnn.py``)."""
    if ctx.calib is None:
        raise DataError("--target bdcnn calibrates each layer's activation range: give --calib FILE.npz[:calib]")
    planes = opts.planes if opts.planes is not None else (ctx.target.default_act_bits if level == 1 else None)
    if planes is None and ctx.eval is None:
        raise DataError("-O2 --target bdcnn searches Q per layer on evaluation data: give --eval FILE.npz[:eval] "
                        "(or fix Q for every layer with --planes Q)")
    if opts.target_score is not None:
        raise OptionError("--target bdcnn takes its accuracy goal as --max-drop (Algorithm 1's tolerance)")
    ev = ctx.eval
    bd = compile_bdcnn(graph, ctx.calib.x, None if ev is None else ev.x, None if ev is None else ev.y,
                       max_drop=0.01 if opts.max_drop is None else opts.max_drop,
                       bases=parse_bases(opts.bases) if opts.bases is not None else 3,
                       restarts=opts.restarts or 3, iterations=20 if opts.iterations is None else opts.iterations,
                       fit=opts.fit, q_fixed=planes, metric=ctx.metric, seed=ctx.seed, batch_size=ctx.batch_size, quiet=ctx.quiet)
    rep = ctx.report
    rep["bdcnn"] = bd.report
    info = model_info(bd.decomposed)
    rows = {r["layer"]: r for r in bd.report["layers"]}
    for layer in info["layers"]:
        r = rows.get(layer["name"])
        if r is not None:  # bit-packed bases + coefficients; the quantization sub-layer's Q
            layer.update({"weight_bits": None, "bases": r["k"], "act_bits": r["Q"], "weight_bytes": r["bytes"]})
        else:  # not decomposed: 8-bit fixed point
            layer.update({"weight_bits": 8, "weight_bytes": layer["params"]})
    info["weight_bytes"] = float(sum(layer["weight_bytes"] for layer in info["layers"]))
    rep["compiled_model"] = info
    acc = bd.report.get("accuracy")
    if acc is not None:
        rep["accuracy"] = {"metric": acc["metric"], "data": f"{ev.source} ({len(ev)} samples)", "float": acc["float"],
                           "quantized (popcount)": acc["measured (popcount runtime)"]}
    return CompileResult(bd.graph, ctx.float_graph, rep, ctx, timings, bundle=(bd.bundle, bd.manifest))


STRUCTURAL_PASSES = ("serialize-residual", "prune-channels")


def stage_table(report: dict) -> list[dict]:
    """MACs, weight bytes and accuracy of the float model, after each structural pass that changed
    the network (their report sections' ``after``), and of the compiled model; empty when no
    structural pass ran."""
    secs = report.get("passes") or {}
    middle = [dict(secs[n]["after"]) for n in STRUCTURAL_PASSES if "after" in secs.get(n, {})]
    if not middle:
        return []
    acc = report.get("accuracy") or {}

    def row(stage: str, info: dict, value) -> dict:
        r = {"stage": stage, "nodes": info["nodes"], "params": info["params"], "macs": info["macs"],
             "weight_bytes": info["weight_bytes"]}
        if value is not None:
            r["metric"], r["accuracy"] = acc.get("metric"), value
        return r

    rows = [row("float", report["float_model"], acc.get("float"))] + middle
    # an unquantized result is the last structural stage's network, already measured
    rows.append(row("compiled", report["compiled_model"], acc.get("quantized (emulator)", middle[-1].get("accuracy"))))
    base = rows[0]["macs"] or 1
    for r in rows:
        r["macs_fraction"] = r["macs"] / base
    return rows


def write_outputs(result: CompileResult, outputs: Outputs, depends=()) -> None:
    """Serialize everything first, then write all files as one transaction (``commit_files``):
    every output or none, and no pre-existing file changed on failure. ``depends``: the input
    files the depfile (``outputs.depfile``) names."""
    blobs: list[tuple[Any, bytes]] = []
    report, html, bundle = outputs.report, outputs.html, outputs.bundle
    if outputs.model is not None:
        blobs.append((outputs.model, result.onnx_bytes()))
    if bundle is not None:
        npz, manifest = result.bundle or bundle_bytes(result.graph, result.report)
        blobs.append((bundle, npz))
        blobs.append((bundle_manifest_path(bundle), manifest))
    rep = _clean_nan(result.report)
    if report is not None:
        blobs.append((report, report_json_bytes(rep)))
    if html is not None:
        blobs.append((html, render_html(rep).encode()))
    if outputs.depfile is not None:
        blobs.append((outputs.depfile, depfile_bytes(outputs.dep_targets or outputs.paths(), depends,
                                                     phony=outputs.dep_phony)))
    commit_files(blobs)


def _external_data_files(path) -> list[str]:
    """The external-data files an ONNX model's initializers (and constant attributes) point to,
    as paths beside the model, in first-use order."""
    import onnx  # start-up
    from onnx import TensorProto  # start-up
    try:
        m = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # load_graph already refused an unreadable model
        return []
    tensors = list(m.graph.initializer)
    stack = [m.graph]
    while stack:  # constants in attributes and subgraphs
        g = stack.pop()
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    tensors.append(a.t)
                tensors.extend(a.tensors)
                if a.HasField("g"):
                    stack.append(a.g)
                    tensors.extend(a.g.initializer)
                for sg in a.graphs:
                    stack.append(sg)
                    tensors.extend(sg.initializer)
    base = os.path.dirname(os.fspath(path))
    out: list[str] = []
    for t in tensors:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        if loc:
            f = os.path.join(base, loc)
            if f not in out:
                out.append(f)
    return out


def dependencies(model, calib=None, eval=None, train=None) -> list[str]:
    """The input files a compile reads: the model (and its external-data files) and the data
    files of ``FILE.npz[:SPLIT]`` specs; arrays, Datasets and Graphs name no file."""
    out: list[str] = []
    if isinstance(model, (str, os.PathLike)):
        out.append(os.fspath(model))
        out += _external_data_files(model)
    for d, split in ((calib, "calib"), (eval, "eval"), (train, "train")):
        if isinstance(d, (str, os.PathLike)):
            out.append(parse_spec(os.fspath(d), split)[0])
    seen: list[str] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def make_escape(path: str) -> str:
    """A path as gcc writes it in a depfile: spaces (and tabs) and '#' after a backslash, a
    backslash before them doubled, '$' as '$$'."""
    if "\n" in path or "\r" in path:
        raise OptionError(f"cannot write a depfile naming {path!r}: a Make rule cannot hold a newline in a path")
    out = []
    for i, c in enumerate(path):
        if c in " \t":
            j = i - 1  # gcc: backslashes before a space are doubled
            while j >= 0 and path[j] == "\\":
                out.append("\\")
                j -= 1
            out.append("\\" + c)
        elif c == "#":
            out.append("\\#")
        elif c == "$":
            out.append("$$")
        else:
            out.append(c)
    return "".join(out)


def depfile_bytes(targets, depends, *, phony: bool = False) -> bytes:
    """A Make rule ``targets: depends`` in gcc's depfile format (one dependency a line); with
    ``phony`` (``-MP``) an empty rule ``dep:`` after it for each dependency, as gcc writes."""
    head = " ".join(make_escape(os.fspath(t)) for t in targets) + ":"
    text = " \\\n ".join([head] + [make_escape(d) for d in depends]) + "\n"
    if phony:
        text += "".join(f"\n{make_escape(d)}:\n" for d in depends)
    return text.encode()


def _version() -> str:
    try:
        return version("mpqc")
    except Exception:  # pragma: no cover
        return "0"


def bundle_manifest_path(bundle) -> Path:
    """The .json manifest a bundle writes beside itself."""
    return Path(str(bundle)).with_suffix(".json")


def _same(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_outputs_differ(*paths, inputs=()) -> None:
    """Before any work: every output path is a usable file path (not empty, not a folder, its
    folder not a file), the bundle's manifest is a file of its own, and no output names the same
    file as another output or as any input (``inputs``: (option, path) pairs; data specs
    FILE.npz:SPLIT are reduced to their file). An ``("model", path)`` pair among ``paths`` is taken
    as an input. Raises OptionError."""
    outs, ins = [], []
    for opt, p in paths:
        (ins if opt == "model" else outs).append((opt, p))
    for opt, p in inputs:
        if p is None:
            continue
        if opt in ("--calib", "--eval", "--train", "--data"):
            p = parse_spec(str(p), "x")[0]
        ins.append((opt, p))
    expanded = []
    for opt, p in outs:
        if p is None:
            continue
        s = os.fspath(p)
        if s == "" or s.strip() == "":
            raise OptionError(f"{opt}: the path is empty; give a file name")
        if os.path.isdir(s) or s.endswith(os.sep):
            raise OptionError(f"{opt}: cannot write {s!r}: it is a directory; give a file name")
        parent = os.path.dirname(os.path.abspath(s))
        while parent and not os.path.exists(parent) and parent != os.path.dirname(parent):
            parent = os.path.dirname(parent)
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise OptionError(f"{opt}: cannot write {s!r}: {parent!r} is a file, not a folder")
        expanded.append((opt, s))
        if opt == "--emit-bundle":
            man = str(bundle_manifest_path(s))
            if _same(man, s):
                raise OptionError(f"--emit-bundle {s!r}: a bundle writes its manifest beside itself as "
                                  f"{Path(man).name!r}; name the bundle with an .npz suffix")
            if os.path.isdir(man):
                raise OptionError(f"--emit-bundle {s!r}: its manifest path {man!r} is a directory")
            expanded.append(("--emit-bundle (its .json manifest)", man))
    seen: list[tuple[str, str]] = []
    for opt, s in expanded:
        for o2, s2 in seen:
            if _same(s, s2):
                raise OptionError(f"{opt} and {o2} name the same file {s!r}")
            a, b = os.path.abspath(s), os.path.abspath(s2)
            if b.startswith(a + os.sep) or a.startswith(b + os.sep):
                raise OptionError(f"{opt} {s!r} and {o2} {s2!r}: one would be a folder holding the other")
        for o2, s2 in ins:
            if _same(s, os.fspath(s2)):
                raise OptionError(f"{opt} {s!r} is the same file as the {o2} {os.fspath(s2)!r}; "
                                  f"an output never overwrites an input")
        seen.append((opt, s))
