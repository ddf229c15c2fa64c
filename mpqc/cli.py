"""The ``mpqc`` command line.

    mpqc MODEL.onnx [-O0|-O1|-O2|-O3] [--target T] [--calib F.npz:calib] [--eval F.npz:eval] -o OUT.onnx
    mpqc info MODEL.onnx [--json]
    mpqc eval MODEL.onnx --data F.npz:SPLIT [--metric M] [--runtime float|emulator|popcount|ort] [--json]
    mpqc targets | mpqc passes
    mpqc opt FILE.mir|MODEL.onnx --passes "a,b{opt=1}" [--split-input-file] [--target T]

User errors print one line ``mpqc: error: ...`` and exit with code 2, with no
traceback and no output file left behind.

Each command imports what it needs when it runs ("# start-up" below): the compiler loads
onnx, onnxruntime and numba (about a second), which ``mpqc --help`` does not need.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mpqc.core.errors import CompilerError, OptionError

SUBCOMMANDS = ("info", "eval", "targets", "passes", "compile", "opt")

EPILOG = """\
examples:
  mpqc model.onnx -O0 -o canonical.onnx
  mpqc model.onnx -O1 --target npu8 --calib data.npz:calib -o model_q.onnx --report report.json
  mpqc model.onnx -O2 --target npu4 --calib data.npz:calib --eval data.npz:eval --max-drop 0.01 \\
       -o model_q.onnx --report report.json --html report.html
  mpqc model.onnx -O3 --target npu4 --calib data.npz:calib --eval data.npz:eval --flops 0.5 \
       --max-drop 0.01 -o model_q.onnx --report report.json
  mpqc model.onnx --passes "fold-constants,fold-batchnorm" -o out.onnx
  mpqc info model.onnx
  mpqc eval model_q.onnx --data data.npz:test --metric top1

other commands: info, eval, targets, passes, opt (each has --help).
data files are .npz archives with x_SPLIT (and y_SPLIT for labels); FILE.npz:SPLIT picks a split.
exit codes: 0 success, 2 user error (bad model, data or option; a missed goal with --strict),
  3 accuracy goal missed (the best network found and the report are written), 1 internal error.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"mpqc: error: {message} (see '{self.prog} --help')\n")


def compile_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpqc", description="Mixed-precision quantization and pruning compiler for ONNX CNNs: "
                "imports a float model, searches per-layer bit widths (and prunes) under an accuracy target, "
                "and exports a QDQ ONNX model, a target bundle and a report.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="input float model (.onnx)")
    p.add_argument("-o", "--output", help="output model (.onnx); written only if compilation succeeds")
    p.add_argument("--version", action="version", version=f"mpqc {_version()}", help="print the version and exit")
    from mpqc.compiler.options import ROUNDINGS, SIGNALS, SIM_ENGINES  # start-up: options.py imports only the core's errors
    g = p.add_argument_group("pipeline")
    g.add_argument("-O", dest="level", type=int, default=None, choices=[0, 1, 2, 3], metavar="LEVEL",
                   help="optimisation level: 0 canonicalize, 1 fixed point at default widths, "
                        "2 mixed precision by layer influence, 3 channel pruning to --flops, then 2 "
                        "(default 1)")
    g.add_argument("--target", default="npu8", help="target profile (see 'mpqc targets'; default npu8)")
    g.add_argument("--passes", help="run this pass list instead of a level, e.g. "
                                    "'fold-batchnorm,assign-bit-widths{strategy=min-influence}'")
    g.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=None,
                   help="cross-layer equalization before the formats are chosen: each filter scaled to fill "
                        "its power-of-two grid, the scale moved into the next layer (docs/EQUALIZATION.md); "
                        "default off")
    g.add_argument("--rounding", choices=ROUNDINGS, default=None,
                   help="how the integer weights are chosen: obq (default: each layer's weights fitted to the "
                        "float network's outputs in closed form), adaround (learned by gradient descent through "
                        "each layer and its activation; several times slower), nearest (round to nearest); "
                        "docs/ROUNDING.md")
    d = p.add_argument_group("data")
    d.add_argument("--calib", metavar="FILE.npz[:SPLIT]", help="calibration data (default split: calib)")
    d.add_argument("--eval", metavar="FILE.npz[:SPLIT]", help="evaluation data for searches (default split: eval)")
    d.add_argument("--train", metavar="FILE.npz[:SPLIT]", help="training data (default split: train)")
    d.add_argument("--metric", help="evaluation value: top1, top5, mean-score, agreement, mse, psnr "
                                    "(default top1 with labels, else agreement)")
    d.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x48x192",
                   help="fix the symbolic dims of model input NAME (repeatable; '?' keeps a dim symbolic; "
                        "without NAME: the first input), so shape subgraphs fold; without it the symbolic "
                        "non-batch dims of the first input are taken from the --calib (else --eval) data's "
                        "shape; the report's 'inputs' says where each input's shape came from")
    d.add_argument("--batch-size", type=int, default=64, help="batch size of every run (default 64)")
    d.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                   help="worker processes for the search's evaluations and influence sweeps, one BLAS thread "
                        "each (default: $MPQC_JOBS, else the number of cores; results are identical for any N)")
    d.add_argument("--scheduler", metavar="ADDRESS",
                   help="run those evaluations and sweeps on a Dask distributed cluster instead: tcp://HOST:PORT "
                        "of a running scheduler, or 'local' for a LocalCluster of --jobs worker processes on "
                        "this machine (needs the optional dask[distributed]: pip install 'mpqc[dask]'; results "
                        "are identical to a serial run)")
    s = p.add_argument_group("accuracy target (-O2 and above)")
    s.add_argument("--max-drop", type=float, help="largest allowed drop of the evaluation value relative to "
                                                  "the float model (e.g. 0.01)")
    s.add_argument("--target-score", type=float, help="lowest allowed absolute evaluation value")
    s.add_argument("--strict", action="store_true",
                   help="an accuracy goal that cannot be met is an error (exit 2, nothing written); by default "
                        "the best network found is written and mpqc exits with code 3")
    s.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop the bit-width search this many seconds after the compile started and keep the "
                        "best network accepted so far (the report's time_budget_exceeded says where it stopped)")
    s.add_argument("--sim", choices=SIM_ENGINES, default=SIM_ENGINES[0],
                   help="engine that simulates the candidate networks during the search: onnxruntime (default; "
                        "the fake-quantized network as an ONNX model) or numpy (mpqc's own runtime)")
    s.add_argument("--strategy", help="bit-width search strategy: auto (default: influence-update unless too "
                                    "costly, then min-influence), influence-update, min-influence, threshold "
                                    "(US 2021/0201141 A1), weight-diff-bsearch, weight-diff-topk (US 12,393,828 B2)")
    s.add_argument("--rank-signal", choices=SIGNALS, default=SIGNALS[0],
                   help="what layer influences are measured in: metric (default; the evaluation value, as the "
                        "patent does), kl (KL divergence from the float network's outputs) or mse (their mean "
                        "squared error); kl and mse move with every rung, so the ranking has no ties. The "
                        "accuracy goal stays on --metric")
    s.add_argument("--ranking-subset", type=int, metavar="N",
                   help="measure layer influences on N evaluation samples (evenly spaced over the split); "
                        "every candidate network is still judged on the whole split (default: all)")
    r = p.add_argument_group("pruning (-O3)")
    r.add_argument("--flops", type=float, metavar="F",
                   help="fraction of the float model's multiply-accumulates to keep, e.g. 0.5 (required at -O3)")
    r.add_argument("--prune", metavar="METHOD",
                   help="channel selection: reap (default; reconstruction-error aware, REAP), l1 (filter L1 "
                        "norm, then the least-squares refit), l1-norefit, thinet")
    r.add_argument("--ratios", metavar="HOW",
                   help="per-layer pruning ratios: pro (default; error-vs-MACs curves, PRO) or uniform")
    bd = p.add_argument_group("binary decomposition (--target bdcnn)")
    bd.add_argument("--bases", metavar="K[,LAYER=K]",
                    help="binary bases k per output filter: one number, or per layer as LAYER=K with a bare "
                         "number as the default (default 3)")
    bd.add_argument("--restarts", type=int, metavar="N", help="seeded restarts of each decomposition (default 3)")
    bd.add_argument("--iterations", type=int, metavar="N",
                    help="alternating-optimisation rounds of each decomposition (default 20)")
    bd.add_argument("--fit", choices=("outputs", "outputs-float", "weights"), default="outputs",
                    help="fit each decomposition to the layer's outputs on --calib, from the decomposed "
                         "network's inputs (outputs, default) or the float network's (outputs-float), or "
                         "to the weights alone, as the paper does (weights)")
    bd.add_argument("--planes", type=int, metavar="Q",
                    help="activation bit-planes Q (2..8) of every layer instead of the per-layer search "
                         "(default: 8 at -O1, searched at -O2)")
    t = p.add_argument_group("training (needs --train with labels)")
    t.add_argument("--cycles", type=int, metavar="K",
                   help="training cycles (SGD steps) of the weight-difference statistic used by the "
                        "weight-diff-bsearch / weight-diff-topk strategies (default 50)")
    t.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=None,
                   help="fine-tune with fake quantization after the bit widths are chosen (and after "
                        "pruning at -O3); default off")
    t.add_argument("--finetune-epochs", type=float, metavar="N", help="epochs of fine-tuning (default 3)")
    o = p.add_argument_group("outputs")
    o.add_argument("--report", metavar="OUT.json", help="JSON report: per-layer bits, formats, search trace")
    o.add_argument("--html", metavar="OUT.html", help="HTML report with plots")
    o.add_argument("--emit-bundle", metavar="OUT.npz", help="target bundle (.npz) plus a .json manifest")
    o.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout (model, sizes, accuracy, search "
                        "result, per-layer bits, output paths) instead of text on stderr")
    o.add_argument("-MD", dest="md", action="store_true",
                   help="write a Make-format depfile OUTPUT.d beside -o (like gcc -MD): the outputs depend on "
                        "the model, its external-data files and the data files")
    o.add_argument("-MF", dest="mf", metavar="FILE", help="write the depfile to FILE (implies -MD)")
    o.add_argument("-MT", dest="mt", action="append", default=[], metavar="TARGET",
                   help="the depfile rule's target (repeatable; default: every output file)")
    o.add_argument("-MP", dest="mp", action="store_true",
                   help="add a phony target for each dependency (like gcc -MP), so that a deleted input "
                        "does not break the build")
    c = p.add_argument_group("result cache (calibration, influence sweeps, search evaluations)")
    c.add_argument("--cache-dir", metavar="DIR",
                   help="folder of the content-addressed result cache (default: $MPQC_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/mpqc, else ~/.cache/mpqc); safe to share between parallel builds")
    c.add_argument("--no-cache", action="store_true", help="compute everything; read and write no cache")
    c.add_argument("--cache-size", metavar="SIZE", default="2G",
                   help="largest size of the cache folder; least recently used entries go first (default 2G)")
    x = p.add_argument_group("diagnostics")
    x.add_argument("--print-after", action="append", default=[], metavar="PASS",
                   help="print the IR after this pass ('all' for every pass); repeatable")
    x.add_argument("--time-passes", action="store_true",
                   help="print the time each pass took (the report then holds the timings and what came from "
                        "the cache; otherwise reports are byte-identical run to run)")
    x.add_argument("--verify-each", action="store_true", help="verify the IR after every pass")
    x.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    x.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    x.add_argument("-v", "--verbose", action="count", default=0, help="log what passes do (-vv: debug)")
    return p


def info_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpqc info", description="Show a model's ops, parameters, MACs and weight bytes per layer.")
    p.add_argument("model", help="model to describe (.onnx)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("-O", dest="level", type=int, default=None, choices=[0],
                   help="canonicalize first (-O0), as the compiler would see the model")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpqc eval", description="Evaluate a model (or a target bundle) on a data split.")
    p.add_argument("model", help=".onnx model, or a bundle .npz written by --emit-bundle")
    p.add_argument("--data", required=True, metavar="FILE.npz[:SPLIT]", help="data (default split: eval)")
    p.add_argument("--metric", help="top1, top5, mean-score, agreement, mse, psnr (default top1 with labels)")
    p.add_argument("--reference", metavar="FLOAT.onnx", help="float model for agreement/mse/psnr")
    p.add_argument("--runtime", default="float", choices=["float", "emulator", "popcount", "ort"],
                   help="float: mpqc's float runtime (QDQ nodes fake-quantize); emulator: bit-exact fixed "
                        "point (a bundle of -O1/-O2); popcount: the binary-decomposed bundle of --target "
                        "bdcnn; ort: onnxruntime (default float; a bundle defaults to its own runtime)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per run (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _version() -> str:
    from importlib.metadata import version  # start-up
    try:
        return version("mpqc")
    except Exception:  # pragma: no cover
        return "0"


def _depfile(args) -> str | None:
    """The depfile path of -MD/-MF (None: no depfile)."""
    if args.mf is not None:
        return args.mf
    if args.md:
        if not args.output:
            raise OptionError("-MD writes OUTPUT.d beside -o OUTPUT: give -o, or name the depfile with -MF FILE")
        return args.output + ".d"
    if args.mt:
        raise OptionError("-MT names the target of a depfile: give -MD or -MF FILE too")
    return None


def _setup(quiet: bool, verbose: int = 0) -> None:
    from mpqc.core.progress import set_quiet  # start-up
    set_quiet(quiet)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="mpqc: %(name)s: %(message)s", stream=sys.stderr)


def cmd_compile(argv: list[str]) -> int:
    args = compile_parser().parse_args(argv)
    _setup(args.quiet, args.verbose)
    from mpqc.compiler.driver import Diagnostics, Outputs, check_outputs_differ, compile_model  # start-up
    from mpqc.compiler.options import CompileOptions  # start-up
    if args.passes and args.level is not None:
        raise OptionError("give either -O LEVEL or --passes, not both")
    level = 1 if args.level is None else args.level
    _check_number_options(args)
    depfile = _depfile(args)
    check_outputs_differ(("--output", args.output), ("--report", args.report), ("--html", args.html),
                         ("--emit-bundle", args.emit_bundle), ("-MF" if args.mf else "-MD", depfile),
                         inputs=[("model", args.model), ("--calib", args.calib), ("--eval", args.eval),
                                 ("--train", args.train)])
    options = CompileOptions(max_drop=args.max_drop, target_score=args.target_score, strategy=args.strategy,
                             cycles=args.cycles, finetune=args.finetune, finetune_epochs=args.finetune_epochs,
                             equalize=args.equalize, rounding=args.rounding,
                             flops=args.flops, prune=args.prune, ratios=args.ratios, bases=args.bases,
                             restarts=args.restarts, iterations=args.iterations, planes=args.planes, fit=args.fit,
                             strict=args.strict, time_budget=args.time_budget, sim=args.sim,
                             rank_signal=args.rank_signal, ranking_subset=args.ranking_subset,
                             input_shape=tuple(args.input_shape))
    outputs = Outputs(args.output, args.report, args.html, args.emit_bundle, depfile, tuple(args.mt),
                      dep_phony=args.mp)
    from mpqc.compiler.cache import open_cache, parse_size  # start-up
    if args.no_cache and args.cache_dir is not None:
        raise OptionError("give either --cache-dir DIR or --no-cache, not both")
    cache = None if args.no_cache else open_cache(args.cache_dir if args.cache_dir is not None else True,
                                                  max_bytes=parse_size(args.cache_size))
    # with --json stdout holds the JSON object only: printed IR and pass times go to stderr
    printer = (lambda text: print(text, file=sys.stderr)) if args.json else None
    res = compile_model(args.model, level=level, target=args.target, calib=args.calib, eval=args.eval,
                        train=args.train, metric=args.metric, passes=args.passes, options=options,
                        outputs=outputs,
                        diagnostics=Diagnostics(args.verify_each, frozenset(args.print_after), args.time_passes,
                                                printer=printer),
                        seed=args.seed, quiet=args.quiet, batch_size=args.batch_size, cache=cache,
                        jobs=_jobs(args.jobs), scheduler=args.scheduler)
    if args.json:
        from mpqc.compiler.driver import json_default  # start-up
        summary = summary_json(res.report, outputs)
        if res.cache is not None:
            summary["cache"] = res.cache
        print(json.dumps(summary, indent=1, sort_keys=True, default=json_default))
    elif not args.quiet:
        print(summary_text(res.report), file=sys.stderr)
        if res.cache is not None:
            print(cache_line(res.cache), file=sys.stderr)
    stopped = res.report.get("time_budget_exceeded")
    if stopped:
        print(f"mpqc: note: {stopped['message']}", file=sys.stderr)
    missed = res.report.get("goal_missed")
    if missed:  # the outputs hold the best network found; say by how much the goal was missed
        print(f"mpqc: goal missed: {missed['message']}; wrote the best network found ({missed['metric']} "
              f"{missed['value']:.4f}, goal {missed['goal']:.4f}, missed by {missed['missed_by']:.4f}); "
              "--strict writes nothing instead", file=sys.stderr)
        return 3
    return 0


def _jobs(n: int | None) -> int:
    """--jobs N, else $MPQC_JOBS, else the number of cores."""
    if n is None:
        import os  # start-up
        env = os.environ.get("MPQC_JOBS", "").strip()
        if env:
            try:
                n = int(env)
            except ValueError:
                raise OptionError(f"MPQC_JOBS={env!r} is not a number of worker processes") from None
        else:
            from mpqc.runtime.parallel import default_jobs  # start-up
            return default_jobs()
    if n < 1:
        raise OptionError(f"--jobs must be at least 1, got {n}")
    return n


def cache_line(cache: dict) -> str:
    """One line: what came from the result cache and what was computed."""
    kinds = cache.get("kinds") or {}
    hit = ", ".join(f"{v['hits']} {k}" for k, v in kinds.items() if v["hits"])
    miss = ", ".join(f"{v['misses']} {k}" for k, v in kinds.items() if v["misses"])
    text = f"cache {cache['dir']}: reused {hit or 'nothing'}; computed {miss or 'nothing'}"
    rejected = sum(v.get("rejected", 0) for v in kinds.values())
    if rejected:
        text += f"; {rejected} damaged or foreign entr{'y' if rejected == 1 else 'ies'} ignored and recomputed"
    if cache.get("disabled"):
        text += f"; disabled: {cache['disabled']}"
    return text


def summary_json(report: dict, outputs) -> dict:
    """What ``--json`` prints: the text summary's facts, and the files written."""
    from mpqc.compiler.driver import _clean_nan  # start-up

    def sizes(info: dict) -> dict:
        return {k: info[k] for k in ("nodes", "params", "macs", "weight_bytes") if k in info}

    fm, cm = report["float_model"], report.get("compiled_model") or {}
    out = {"mpqc_version": report.get("mpqc_version"), "model": report["model"], "level": report.get("level"),
           "target": (report.get("target") or {}).get("name"),
           "float_model": sizes(fm), "compiled_model": sizes(cm), "accuracy": report.get("accuracy")}
    search = (report.get("passes") or {}).get("assign-bit-widths")
    if search and "final_value" in search:
        out["search"] = {k: search.get(k) for k in ("strategy", "metric", "signal", "final_value", "goal",
                                                    "float_value", "weight_ratio_int8", "evaluations", "note")
                         if search.get(k) is not None}
        if isinstance(search.get("data"), dict):
            out["search"]["split"] = search["data"].get("split")
    out["layers"] = [{k: l.get(k) for k in ("name", "op", "weight_bits", "act_bits", "weight_bytes")}
                     for l in cm.get("layers", [])]
    if report.get("stages"):
        out["stages"] = report["stages"]
    if report.get("bdcnn"):
        bd = report["bdcnn"]
        out["bdcnn"] = {k: bd[k] for k in ("q_mode", "sizes", "accuracy", "layers", "not_decomposed") if k in bd}
    files = {"model": outputs.model, "report": outputs.report, "html": outputs.html, "bundle": outputs.bundle,
             "depfile": outputs.depfile}
    if outputs.bundle is not None:
        from mpqc.compiler.driver import bundle_manifest_path  # start-up
        files["bundle_manifest"] = str(bundle_manifest_path(outputs.bundle))
    out["outputs"] = {k: str(v) for k, v in files.items() if v is not None}
    return _clean_nan(out)


def _check_number_options(args) -> None:
    """Float options are finite and in range; counts are not negative (before any work)."""
    import math  # start-up
    ranges = {"max_drop": (None, None), "target_score": (None, None), "flops": (None, None),
              "finetune_epochs": (0.0, 1e6), "time_budget": (None, None)}  # the ranges of the others are CompileOptions' checks
    for key, (lo, hi) in ranges.items():
        v = getattr(args, key, None)
        if v is None:
            continue
        opt = "--" + key.replace("_", "-")
        if not math.isfinite(v):
            raise OptionError(f"{opt} must be a finite number, got {v}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise OptionError(f"{opt} must be between {lo if lo is not None else '-inf'} and "
                              f"{hi if hi is not None else 'inf'}, got {v}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 32:
        raise OptionError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    for key in ("restarts", "iterations", "cycles", "planes"):
        v = getattr(args, key, None)
        if v is not None and v < 0:
            raise OptionError(f"--{key} must not be negative, got {v}")


def summary_text(report: dict) -> str:
    from mpqc.compiler.info import format_table  # start-up
    fm, cm = report["float_model"], report["compiled_model"]
    lines = [f"{report['model']}: {fm['nodes']} -> {cm['nodes']} nodes, weights {fm['weight_bytes']:,.0f} -> "
             f"{cm['weight_bytes']:,.0f} bytes"]
    for row in report.get("inputs") or ():  # a symbolic dim fixed by --input-shape or the data
        if row.get("source", "model") != "model":
            dims = "x".join(str(d) for d in row["shape"])
            lines.append(f"input {row['name']}: shape {dims} from {row['source']}"
                         + (f" {row['data']}" if row.get("data") else "")
                         + f" (the model says {'x'.join(str(d) for d in row['model_shape'] or ())})")
        elif "Shape" in (cm.get("ops") or {}) and any(not isinstance(d, int) for d in (row.get("shape") or [])[1:]):
            dims = "x".join(str(d) for d in row["shape"])
            lines.append(f"note: input {row['name']} has symbolic dims ({dims}), so its shape subgraph stays; "
                         f"--input-shape {row['name']}:... (or --calib data) fixes them")
    acc = report.get("accuracy")
    if acc:
        lines.append("accuracy: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in acc.items()))
    search = (report.get("passes") or {}).get("assign-bit-widths")
    if search and isinstance(search.get("final_value"), float):
        ratio = search.get("weight_ratio_int8")
        lines.append(f"bit-width search ({search['strategy']}): {search['metric']} on {search['data']['split']} "
                     f"{search['final_value']:.4f} (goal {search['goal']:.4f}, float {search['float_value']:.4f})"
                     + (f", weights {ratio:.1%} of uniform int8" if isinstance(ratio, float) else "")
                     + f", {search.get('evaluations', 0)} evaluations")
        rk = search.get("ranking") or {}
        if rk.get("sweeps") and (rk.get("signal") != "metric" or rk.get("samples") != rk.get("of")):
            lines.append(f"influences in {rk['signal']} on {rk['samples']} of {rk['of']} samples "
                         f"({rk['sweeps']} sweeps)")
        if search.get("note"):
            lines.append(f"note: {search['note']}")
    stages = report.get("stages")
    if stages:
        lines.append(format_table(["stage", "MACs", "of float", "weight bytes", "accuracy"],
                                  [[r["stage"], f"{r['macs']:,}", f"{r['macs_fraction']:.3f}",
                                    f"{r['weight_bytes']:,.0f}",
                                    f"{r['accuracy']:.4f}" if isinstance(r.get("accuracy"), float) else "-"]
                                   for r in stages]))
    bd = report.get("bdcnn")
    if bd:
        sz = bd["sizes"]
        lines.append(f"binary decomposition: {len(bd['layers'])} layers, Q {bd['q_mode']}; bases + coefficients "
                     f"{sz['bytes']:,} bytes = {sz['vs_float']:.1%} of float, {sz['vs_int8']:.1%} of int8")
        a = bd.get("accuracy") or {}
        if "predicted" in a:
            lines.append(f"Algorithm 1: predicted {a['predicted']:.4f}, measured (popcount runtime) "
                         f"{a['measured (popcount runtime)']:.4f} ({a['metric']})")
        lines.append(format_table(["layer", "op", "k", "Q", "rel. error", "bytes"],
                                  [[r["layer"], r["op"], r["k"], r["Q"], f"{r['rel_error']:.3f}", f"{r['bytes']:,}"]
                                   for r in bd["layers"]], "llrrrr"))
        for r in bd.get("not_decomposed", []):
            lines.append(f"not decomposed: {r['layer']}: {r['reason']} ({r['path']})")
        return "\n".join(lines)
    layers = cm.get("layers", [])
    if layers and any(l.get("act_bits") for l in layers):
        lines.append(format_table(["layer", "op", "w bits", "a bits", "bytes"],
                                  [[l["name"], l["op"], l["weight_bits"], l["act_bits"], f"{l['weight_bytes']:,.0f}"]
                                   for l in layers], "llrrr"))
    return "\n".join(lines)


def cmd_info(argv: list[str]) -> int:
    args = info_parser().parse_args(argv)
    from mpqc.compiler.export import load_qdq_graph  # start-up
    from mpqc.compiler.info import format_info, model_info  # start-up
    from mpqc.compiler.qdq import dequantized_view, is_qdq_graph  # start-up
    g = load_qdq_graph(args.model)
    if is_qdq_graph(g):  # a quantized model: statistics of its layers at their recorded widths
        g = dequantized_view(g)
        _restore_bits(g)
    if args.level == 0:
        from mpqc.compiler.passes import PassContext, PassManager  # start-up
        from mpqc.compiler.pipelines import build_pipeline  # start-up
        PassManager(build_pipeline(0)).run(g, PassContext())
    else:
        from mpqc.compiler.canonical import infer_shapes  # start-up
        infer_shapes(g)
    info = model_info(g)
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
    else:
        print(format_info(info))
    return 0


def _restore_bits(g) -> None:
    """Layer widths recorded by insert-qdq in the model's metadata -> ``node.qconfig``."""
    from mpqc.core.qformat import LayerQConfig  # start-up
    bits = json.loads(g.metadata.get("mpqc.layer_bits", "{}"))
    for n in g.layers():
        if n.name in bits and n.qconfig is None:
            n.qconfig = LayerQConfig(int(bits[n.name][0]), int(bits[n.name][1]))


def cmd_eval(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    _setup(args.quiet)
    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {args.batch_size}")
    from mpqc.compiler.evaluate import evaluate_file  # start-up
    res = evaluate_file(args.model, args.data, metric=args.metric, reference=args.reference,
                        runtime=args.runtime, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(res, indent=1, sort_keys=True))
    else:
        print(f"{res['metric']} = {res['value']:.4f} on {res['samples']} samples of {res['data']} "
              f"({res['runtime']} runtime)")
    return 0


def cmd_targets(argv: list[str]) -> int:
    from mpqc.compiler.info import format_table  # start-up
    from mpqc.compiler.targets import TARGETS  # start-up
    p = _Parser(prog="mpqc targets", description="List the target profiles.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.json:
        print(json.dumps([t.to_json() for t in TARGETS.values()], indent=1))
        return 0
    rows = [[t.name, "/".join(map(str, t.weight_bits)), "/".join(map(str, t.act_bits)), t.scale,
             "yes" if t.per_channel else "no", t.accumulator_bits, t.description] for t in TARGETS.values()]
    print(format_table(["target", "weights", "activations", "scale", "per-channel", "acc", "description"],
                       rows, "lllllrl"))
    return 0


def cmd_passes(argv: list[str]) -> int:
    import dataclasses  # start-up
    from mpqc.compiler.pipelines import pass_registry  # start-up
    _Parser(prog="mpqc passes", description="List the registered passes and their options.").parse_args(argv)
    registry = pass_registry()
    for name in sorted(registry):
        cls = registry[name]
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        first = doc[0].split(":", 1)[-1].strip() if doc else ""
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)
                         if f.default is not dataclasses.MISSING)
        print(f"{name:<24} {first}")
        if opts:
            print(f"{'':<24}   options: {opts}")
    return 0


def opt_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpqc opt", description="Run passes on a graph in textual IR (.mir) or ONNX and print the "
                "resulting textual IR (docs/TEXTUAL_IR.md, docs/TESTING_PASSES.md).")
    p.add_argument("input", help="textual IR (.mir), ONNX (.onnx), or - for textual IR on standard input")
    p.add_argument("--passes", default="", help="pass list, e.g. 'fold-constants,choose-formats{start=ladder}' "
                                               "(default: none: parse and print)")
    p.add_argument("--split-input-file", action="store_true",
                   help="the input holds several graphs separated by '// -----' lines: run the passes on each "
                        "(an error in one is reported and the others still run)")
    p.add_argument("--target", help="target profile for passes that need one (see 'mpqc targets')")
    p.add_argument("--calib", metavar="FILE.npz[:SPLIT]", help="calibration data (default split: calib)")
    p.add_argument("--eval", metavar="FILE.npz[:SPLIT]", help="evaluation data (default split: eval)")
    p.add_argument("--random-data", type=int, metavar="N",
                   help="N seeded standard-normal samples shaped like the graph's input as calibration and "
                        "evaluation data (for tests of passes that need data)")
    p.add_argument("--elide-above", type=int, default=16, metavar="N",
                   help="print constants of more than N elements as dense<seed=...> (-1: print all; default 16)")
    p.add_argument("-o", "--output", help="write the textual IR here instead of standard output")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log what passes do (-vv: debug)")
    return p


def cmd_opt(argv: list[str]) -> int:
    args = opt_parser().parse_args(argv)
    _setup(True, args.verbose)
    from mpqc.core.errors import ModelError  # start-up
    from mpqc.core.textir import SPLIT_MARKER, parse_graph, print_graph, split_input  # start-up
    from mpqc.testing import register_compiler_records  # start-up: loads the compiler
    register_compiler_records()
    elide = None if args.elide_above is not None and args.elide_above < 0 else args.elide_above
    if args.random_data is not None and (args.calib or args.eval or args.random_data < 1):
        raise OptionError("--random-data N takes N >= 1 and replaces --calib/--eval")
    if args.input.endswith(".onnx"):
        if args.split_input_file:
            raise OptionError("--split-input-file needs textual IR, not an .onnx model")
        from mpqc.compiler.frontend import load_graph  # start-up
        graphs = [lambda: load_graph(args.input)]
    else:
        if args.input == "-":
            text, name, base = sys.stdin.read(), "<stdin>", None
        else:
            try:
                text = Path(args.input).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ModelError(f"cannot read {args.input}: {e}") from None
            name, base = args.input, Path(args.input).resolve().parent
        chunks = split_input(text) if args.split_input_file else [(0, text)]
        graphs = [lambda t=t, o=o: parse_graph(t, filename=name, line_offset=o, base_dir=base) for o, t in chunks]
    outs, failed = [], 0
    for make in graphs:
        try:
            g = make()
            g.verify()
            if args.passes.strip():
                _opt_run(g, args)
            outs.append(print_graph(g, elide_above=elide))
        except CompilerError as e:
            if not args.split_input_file:
                raise
            failed += 1
            print(f"mpqc: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
    text = f"{SPLIT_MARKER}\n".join(outs)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 2 if failed else 0


def _opt_run(g, args) -> None:
    import numpy as np  # start-up

    from mpqc.compiler.data import Dataset, load_dataset  # start-up
    from mpqc.compiler.passes import PassContext, PassManager  # start-up
    from mpqc.compiler.pipelines import parse_pipeline  # start-up
    from mpqc.compiler.targets import get_target  # start-up
    passes = parse_pipeline(args.passes)
    calib = ev = None
    x0 = g.inputs[0] if g.inputs else None
    if args.random_data:
        if x0 is None or x0.shape is None:
            raise OptionError("--random-data needs a graph whose first input has a shape")
        shape = [args.random_data] + [d if isinstance(d, int) else 1 for d in x0.shape[1:]]
        x = np.random.default_rng(args.seed).standard_normal(shape).astype(x0.dtype)
        calib = ev = Dataset(x, None, f"<random {args.random_data}>")
    if args.calib:
        calib = load_dataset(args.calib, x0, default_split="calib", option="--calib")
    if args.eval:
        ev = load_dataset(args.eval, x0, default_split="eval", option="--eval")
    ctx = PassContext(target=get_target(args.target) if args.target else None, calib=calib, eval=ev,
                      seed=args.seed)
    PassManager(passes, verify_each=True).run(g, ctx)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = {"info": cmd_info, "eval": cmd_eval, "targets": cmd_targets, "passes": cmd_passes,
            "compile": cmd_compile, "opt": cmd_opt}
    try:
        if argv and argv[0] in cmds and not Path(argv[0]).is_file():  # a folder named 'passes' is no model
            return cmds[argv[0]](argv[1:])
        return cmd_compile(argv)
    except CompilerError as e:
        msg = " ".join(str(e).split("\n"))
        print(f"mpqc: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mpqc: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("mpqc: error: out of memory; lower --batch-size", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that quit early (mpqc info ... | head)
        import os  # start-up
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
