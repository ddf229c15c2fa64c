"""mpqc against onnxruntime and NNCF on a real mobile network (EfficientNet-Lite0), in one run.

Every row is measured on the 160 test photos of photos.npz (agreement with the float model's
top-1): the float model under onnxruntime; onnxruntime's ``quantize_static`` (QDQ, per channel,
MinMax on ``x_calib``); NNCF's ``nncf.quantize`` (ONNX backend, defaults, the 64 calibration
photos; optional: ``pip install nncf``); and mpqc rows, each a CLI compile (``--no-cache``,
``--batch-size 16``) whose bundle is scored by ``mpqc eval --runtime emulator`` and whose QDQ
model by onnxruntime, exactly as ONNX defines it (QDQ fusion off) and with its default fused
int8 kernels (``mpqc eval --runtime ort``). The mpqc rows (``--rows``):

    1. -O1 --target npu8 without equalize and optimize-rounding (weights rounded to nearest)
    2. 1 with cross-layer equalization (equalize)
    3. 1 with optimize-rounding{inputs=float} (fitted on the float network's inputs)
    4. 1 with optimize-rounding (on the quantized network's inputs)
    5. -O1 --target npu8 --equalize (equalize, then optimize-rounding)
    6. 4-bit weights, 8-bit activations everywhere, round to nearest
    7. 6 with optimize-rounding
    8. 6 with equalize{bits=4} and optimize-rounding
    9. -O2 --target npu8 --max-drop 0.02 --jobs 2 (searched on x_eval); 10. the same with --equalize
    11. -O2 --target npu8 --max-drop 0.05 --jobs 2; 12. the same with --equalize

Logit MSE: the emulator's outputs against the float model's on the test photos (``mpqc eval
--metric mse --reference``), the measure that does not move by a photo at a time.

Weight bytes: the Conv/Gemm weights at their stored width plus the biases (32 bits), as in
mpqc's report (``quantization.totals``); seconds: wall time to quantize (mpqc: the whole CLI
process). Each subprocess runs with one BLAS thread.

    .venv/bin/python bench/bench_mobile.py [--rows 1,3,6] [--no-nncf] [--write]

Prints the table and writes bench/out/mobile.json; a run of every row (or ``--write``)
rewrites bench/results/mobile.md (section "## Real mobile networks (EfficientNet-Lite0)"),
which ``bench/run_all.py --merge`` copies into bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, OUT, ROOT, load_split, model_path, ort_run, ort_session, top1  # noqa: E402

MODEL = "efficientnet_lite0"
DATA = BENCH / "photos.npz"
RESULT = ROOT / "bench" / "results" / "mobile.md"
SECTION = "## Real mobile networks (EfficientNet-Lite0)"
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
SOURCES = ("mpqc", "compiler", "core", "passes", "runtime")  # the package's source folders
NEAREST = "optimize-rounding"  # the pass whose absence means round-to-nearest weights
EQUALIZE = "equalize"  # cross-layer equalization (docs/EQUALIZATION.md)


def o1_passes(choose: str = "choose-formats", rounding: str | None = None, equalize: str | None = None) -> str:
    """The -O1 npu8 pass list with ``choose`` for choose-formats, ``rounding`` for optimize-rounding
    (None: dropped, round to nearest) and ``equalize`` for the equalize pass (None: dropped)."""
    from mpqc.compiler.pipelines import pipeline_spec
    from mpqc.compiler.targets import get_target
    spec = []
    for p in pipeline_spec(1, get_target("npu8")):
        if p == "choose-formats":  # the levels run equalize only with --equalize: it goes right before
            spec += [equalize, choose] if equalize else [choose]
        elif p == NEAREST:
            spec += [rounding] if rounding else []
        else:
            spec.append(p)
    return ",".join(spec)


W4 = "choose-formats{weight_bits=4,act_bits=8}"
#: number -> (configuration, mpqc CLI arguments after the model)
ROWS = {
    1: ("-O1 npu8, round to nearest, no equalization", lambda: ["--target", "npu8", "--passes", o1_passes()]),
    2: ("-O1 npu8, equalize, round to nearest",
        lambda: ["--target", "npu8", "--passes", o1_passes(equalize=EQUALIZE)]),
    3: ("-O1 npu8, optimize-rounding{inputs=float}, no equalization",
        lambda: ["--target", "npu8", "--passes", o1_passes(rounding=f"{NEAREST}{{inputs=float}}")]),
    4: ("-O1 npu8, optimize-rounding, no equalization",
        lambda: ["--target", "npu8", "--passes", o1_passes(rounding=NEAREST)]),
    5: ("-O1 npu8 --equalize (equalize, optimize-rounding)", lambda: ["-O1", "--target", "npu8", "--equalize"]),
    6: ("w4a8 everywhere, round to nearest", lambda: ["--target", "npu8", "--passes", o1_passes(W4)]),
    7: ("w4a8 everywhere, optimize-rounding", lambda: ["--target", "npu8", "--passes", o1_passes(W4, NEAREST)]),
    8: ("w4a8 everywhere, equalize{bits=4}, optimize-rounding",
        lambda: ["--target", "npu8", "--passes", o1_passes(W4, NEAREST, f"{EQUALIZE}{{bits=4}}")]),
    9: ("-O2 npu8 --max-drop 0.02 --jobs 2 (searched on x_eval)",
        lambda: ["-O2", "--target", "npu8", "--eval", f"{DATA}:eval", "--max-drop", "0.02", "--jobs", "2"]),
    10: ("-O2 npu8 --max-drop 0.02 --equalize --jobs 2",
         lambda: ["-O2", "--target", "npu8", "--eval", f"{DATA}:eval", "--max-drop", "0.02", "--equalize", "--jobs", "2"]),
    11: ("-O2 npu8 --max-drop 0.05 --jobs 2 (searched on x_eval)",
         lambda: ["-O2", "--target", "npu8", "--eval", f"{DATA}:eval", "--max-drop", "0.05", "--jobs", "2"]),
    12: ("-O2 npu8 --max-drop 0.05 --equalize --jobs 2",
         lambda: ["-O2", "--target", "npu8", "--eval", f"{DATA}:eval", "--max-drop", "0.05", "--equalize", "--jobs", "2"]),
    13: ("-O1 npu8 --rounding adaround (AdaRound through the autograd engine)",
         lambda: ["-O1", "--target", "npu8", "--rounding", "adaround"]),
    14: ("-O2 npu8 --max-drop 0.02 --rounding adaround --jobs 2",
         lambda: ["-O2", "--target", "npu8", "--eval", f"{DATA}:eval", "--max-drop", "0.02", "--rounding", "adaround",
                  "--jobs", "2"]),
}


def weight_bytes(model) -> int:
    """Bytes of the Conv/Gemm weights and biases as stored: an initializer behind
    QuantizeLinear/DequantizeLinear at its integer width (a float one behind QuantizeLinear at the
    width of its zero point), anything else at its own dtype's width."""
    import onnx
    from onnx import TensorProto as T
    m = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model) if isinstance(
        model, bytes) else onnx.load(str(model))
    bits = {T.FLOAT: 32, T.INT32: 32, T.INT8: 8, T.UINT8: 8, T.INT4: 4, T.UINT4: 4, T.INT16: 16, T.FLOAT16: 16}
    inits = {t.name: t for t in m.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in m.graph.node if n.op_type == "Constant" and n.attribute}
    inits.update(consts)
    producer = {o: n for n in m.graph.node for o in n.output}

    def stored(name: str) -> float:
        width = None
        while name not in inits:
            n = producer.get(name)
            if n is None or n.op_type not in ("DequantizeLinear", "QuantizeLinear", "Identity", "Transpose"):
                return 0
            if n.op_type == "QuantizeLinear":
                zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
                width = bits[zp.data_type] if zp is not None else 8
            name = n.input[0]
        t = inits[name]
        return int(np.prod(t.dims)) * min(width or 64, bits[t.data_type]) / 8

    return int(sum(stored(i) for n in m.graph.node if n.op_type in ("Conv", "Gemm") for i in n.input[1:3] if i))


def agreements(onnx_model, xt, yt) -> dict:
    """Agreement of a QDQ model under onnxruntime, exact (QDQ fusion off) and default (fused)."""
    out = {}
    for key, exact in (("ort_exact", True), ("ort_default", False)):
        try:
            out[key] = top1(ort_run(ort_session(onnx_model, exact=exact), xt, 16), yt)
        except Exception as e:  # noqa: BLE001 -- e.g. a kernel onnxruntime lacks
            out[key] = f"error: {' '.join(str(e).split())[:120]}"
    return out


def nncf_row(xc, xt, yt) -> dict:
    try:
        import nncf  # optional bench dependency
    except ImportError:
        return {"error": "not installed (pip install nncf)"}
    import onnx
    name = ort_session(model_path(MODEL)).get_inputs()[0].name
    calib = nncf.Dataset([xc[i:i + 1] for i in range(len(xc))], lambda x: {name: x})
    model = onnx.load(str(model_path(MODEL)))
    t = time.perf_counter()
    q = nncf.quantize(model, calib, subset_size=len(xc))
    secs = time.perf_counter() - t
    qb = q.SerializeToString()
    return {"seconds": secs, "weight_bytes": weight_bytes(q), "version": nncf.__version__,
            **agreements(qb, xt, yt)}


def mpqc_row(args: list[str], folder: Path) -> dict:
    """One CLI compile (timed), its bundle under the emulator and its QDQ model under onnxruntime."""
    folder.mkdir(parents=True)
    rep, bundle, onnx_out = folder / "r.json", folder / "b.npz", folder / "m.onnx"
    cmd = [str(ROOT / ".venv" / "bin" / "mpqc"), str(model_path(MODEL)), *args, "--calib", f"{DATA}:calib",
           "--no-cache", "--batch-size", "16", "-q", "--report", str(rep), "--emit-bundle", str(bundle),
           "-o", str(onnx_out)]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    secs = time.perf_counter() - t
    row = {"command": " ".join(["mpqc", MODEL + ".onnx", *args]), "exit": r.returncode, "seconds": secs}
    if r.returncode not in (0, 3):
        return {**row, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}

    def evaluate(path: Path, runtime: str):
        e = subprocess.run([str(ROOT / ".venv" / "bin" / "mpqc"), "eval", str(path), "--data", f"{DATA}:test",
                            "--runtime", runtime, "--json", "--batch-size", "16", "-q"],
                           env=ENV, capture_output=True, text=True)
        return json.loads(e.stdout)["value"] if e.returncode == 0 else \
            f"error: {(e.stderr.strip().splitlines() or ['?'])[-1][:120]}"
    report = json.loads(rep.read_text())
    tot = report["quantization"]["totals"]
    xt, yt = load_split(MODEL, "test")
    mse = subprocess.run([str(ROOT / ".venv" / "bin" / "mpqc"), "eval", str(bundle), "--data", f"{DATA}:test",
                          "--metric", "mse", "--reference", str(model_path(MODEL)), "--json", "--batch-size", "16",
                          "-q"], env=ENV, capture_output=True, text=True)
    row["logit_mse"] = abs(json.loads(mse.stdout)["value"]) if mse.returncode == 0 else None
    row.update(emulator=evaluate(bundle, "emulator"), ort_default=evaluate(onnx_out, "ort"),
               ort_exact=agreements(onnx_out.read_bytes(), xt, yt)["ort_exact"],
               weight_bytes=tot["weight_bytes"]["quantized"], weight_bytes_vs_int8=tot["weight_bytes_vs_int8"],
               mac_cost_vs_int8=tot["mac_cost_vs_int8"], mean_weight_bits=tot["mean_weight_bits"],
               mean_act_bits=tot["mean_act_bits"])
    search = report["passes"].get("assign-bit-widths")
    if search is not None:
        missed = search.get("goal_missed") or {}
        row.update(goal_met=r.returncode == 0, goal=search.get("goal"), evaluations=search.get("evaluations"),
                   eval_value=missed.get("value", search.get("final_value")),
                   missed_from_start="before any layer is reduced" in missed.get("message", ""))
    return row


def source_state() -> tuple[str, str]:
    """(mpqc's commit, "+dirty" when its sources differ from it; a digest of the sources' content)."""
    import hashlib
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout  # noqa: E731
    diff = git("diff", "HEAD", "--", *SOURCES) + git("status", "--porcelain", "--", *SOURCES)
    trees = git("rev-parse", *(f"HEAD:{d}" for d in SOURCES))
    head = git("rev-parse", "--short", "HEAD").strip() or "?"
    return head + ("+dirty" if diff else ""), hashlib.md5((trees + diff).encode()).hexdigest()


def run(rows: list[int], with_nncf: bool, log) -> dict:
    from bench_o1 import quantize_ort
    xc, _ = load_split(MODEL, "calib")
    xt, yt = load_split(MODEL, "test")
    res = {"float": {"ort_exact": top1(ort_run(ort_session(model_path(MODEL)), xt, 16), yt),
                     "weight_bytes": weight_bytes(model_path(MODEL))}}
    res["float"]["ort_default"] = res["float"]["ort_exact"]
    log(f"float: {res['float']}")
    qb, secs = quantize_ort(MODEL, xc, per_channel=True)
    res["ort"] = {"seconds": secs, "weight_bytes": weight_bytes(qb), **agreements(qb, xt, yt)}
    log(f"quantize_static: {res['ort']}")
    if with_nncf:
        res["nncf"] = nncf_row(xc, xt, yt)
        log(f"nncf: {res['nncf']}")
    with tempfile.TemporaryDirectory() as tmp:
        for i in rows:
            res[str(i)] = mpqc_row(ROWS[i][1](), Path(tmp) / str(i))
            log(f"{i}. {ROWS[i][0]}: {res[str(i)]}")
    return res


def _cell(v, fmt="{:.4f}") -> str:
    if v is None:
        return "-"
    return fmt.format(v) if isinstance(v, (int, float)) else str(v)


def table(res: dict, meta: dict) -> str:
    fbytes = res["float"]["weight_bytes"]
    cmd = " ".join(["bench/bench_mobile.py", meta["argv"]]).strip()
    lines = [SECTION, "",
             f"EfficientNet-Lite0, agreement with the float model's top-1 on the 160 test photos; calibration on the "
             f"64 `x_calib` photos. Measured in one run of `{cmd}` on {meta['date']}, "
             f"{meta['machine']}, {meta['cores']} shared cores, one BLAS thread per mpqc process (onnxruntime in "
             f"process at its default threads), mpqc {meta['commit']}, {meta['wall'] / 60:.1f} min in all. "
             "Emulator: `mpqc eval BUNDLE --runtime emulator`; ORT exact: the QDQ model under onnxruntime with QDQ "
             "fusion off (each QuantizeLinear/DequantizeLinear as ONNX defines it); ORT default: its fused int8 "
             "kernels (for mpqc `mpqc eval M.onnx --runtime ort`). Weight bytes: Conv/Gemm weights at their stored "
             "width plus 32-bit biases. MAC cost: bit-weighted MACs against w8a8 (mpqc's report). Seconds: wall "
             "time to quantize (mpqc: the whole `mpqc ... --no-cache` process).", "",
             "| # | configuration | emulator | ORT exact | ORT default | logit MSE | mean bits w/a | weight bytes | "
             "of float | of int8 | MAC cost / w8a8 | seconds | goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def line(num, name, r):
        if "error" in r:
            lines.append(f"| {num} | {name} | {r['error']} | | | | | | | | | {_cell(r.get('seconds'), '{:.1f}')} | |")
            return
        wb = r.get("weight_bytes")
        bits = f"{r['mean_weight_bits']:g}/{r['mean_act_bits']:g}" if "mean_weight_bits" in r else "-"
        goal = "-" if "goal_met" not in r else (
            f"{'met' if r['goal_met'] else 'missed'}{' from the start' if r['missed_from_start'] else ''} "
            f"(exit {r['exit']}): eval {_cell(r['eval_value'])}, goal {_cell(r['goal'])}")
        lines.append(f"| {num} | {name} | {_cell(r.get('emulator'))} | {_cell(r.get('ort_exact'))} | "
                     f"{_cell(r.get('ort_default'))} | {_cell(r.get('logit_mse'), '{:.2g}')} | {bits} | {wb:,.0f} | {wb / fbytes:.3f} | "
                     f"{_cell(r.get('weight_bytes_vs_int8'), '{:.3f}')} | {_cell(r.get('mac_cost_vs_int8'), '{:.3f}')} | "
                     f"{_cell(r.get('seconds'), '{:.1f}')} | {goal} |")
    line("", "float (onnxruntime)", res["float"])
    line("", "onnxruntime quantize_static, QDQ per-channel, MinMax", res["ort"])
    if "nncf" in res:
        n = res["nncf"]
        line("", f"NNCF {n.get('version', '')} nncf.quantize (ONNX backend, defaults)".replace("  ", " "), n)
    for k, r in res.items():
        if k.isdigit():
            line(k, f"mpqc {ROWS[int(k)][0]}", r)
    differ = [k for k, r in res.items() if k.isdigit() and isinstance(r.get("emulator"), float)
              and r["emulator"] != r.get("ort_exact")]
    lines += ["", "Emulator and onnxruntime exact agree on every mpqc row." if not differ else
              f"Emulator and onnxruntime exact differ on row(s) {', '.join(differ)}" + (
                  ": 16-bit activations, whose Convs onnxruntime accumulates in float32, rounding sums above "
                  "2^24 (docs/FIXED_POINT.md)." if all(res[k].get("mean_act_bits", 8) > 8 for k in differ) else ".")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="mpqc rows:\n" + "\n".join(f"  {k}. {v[0]}" for k, v in ROWS.items()))
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="mpqc rows to run (default: all)")
    ap.add_argument("--no-nncf", action="store_true", help="leave out the NNCF row")
    ap.add_argument("--write", action="store_true", help="rewrite bench/results/mobile.md even for a subset")
    args = ap.parse_args(argv)
    rows = [int(s) for s in args.rows.split(",") if s.strip()]
    if not set(rows) <= set(ROWS):
        ap.error(f"--rows: choose from {','.join(map(str, ROWS))}")
    t0, (commit, state) = time.perf_counter(), source_state()
    res = run(rows, not args.no_nncf, lambda s: print(s, flush=True))
    moved = source_state()[1] != state
    meta = {"argv": " ".join(argv if argv is not None else sys.argv[1:]), "date": datetime.date.today().isoformat(),
            "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "commit": commit, "wall": time.perf_counter() - t0, "sources_changed_during_run": moved}
    text = table(res, meta)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mobile.json").write_text(json.dumps({"meta": meta, "rows": res}, indent=1, sort_keys=True) + "\n")
    if moved:
        print("mpqc's sources changed during the run (rows may come from different code): "
              "bench/results/mobile.md not written; run it again", file=sys.stderr)
        return 1
    if args.write or (set(rows) == set(ROWS) and not args.no_nncf):
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
