"""-O1 fixed point against onnxruntime's quantize_static, on the four bench models, in one run.

For each model: the float model under onnxruntime; ``mpqc -O1 --target npu8`` (and, for
EfficientNet-Lite0, ``--target ort-int8``) calibrated on ``x_calib``; onnxruntime's
``quantize_static`` (QDQ, MinMax on ``x_calib``, its default int8 activations and weights)
per tensor and per channel. Reported: test accuracy (EfficientNet: agreement with float on the
160 test photos), seconds to quantize, model bytes; for mpqc's models the emulator against
onnxruntime running the exported QDQ model -- exactly as ONNX defines it (QDQ fusion off) and
with onnxruntime's default fused int8 kernels -- as top-1 equality and largest logit
difference in LSB of the output format; throughput of the emulator against onnxruntime float
and int8 on the same batch.

    .venv/bin/python bench/bench_o1.py [--models digits_resnet,...] [--write] [--from-json]

``--write`` replaces the section "## -O1 fixed point" of bench/RESULTS.md; the JSON lands in
bench/out/o1.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ALL_MODELS, OUT, agreement_stats, load_split, model_path, ort_run, ort_session,  # noqa: E402
                    throughput, top1, write_section)

SECTION = "## -O1 fixed point"


def quantize_ort(name: str, xcalib: np.ndarray, per_channel: bool) -> tuple[bytes, float]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": xcalib[i:i + 16]} for i in range(0, len(xcalib), 16)])

        def get_next(self):
            return next(self.it, None)

    import logging
    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "q.onnx"
        t = time.perf_counter()
        quantize_static(str(model_path(name)), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel)
        dt = time.perf_counter() - t
        return out.read_bytes(), dt


def bench_model(name: str, targets: list[str], log) -> dict:
    from mpqc.compiler.bundle import bundle_bytes
    from mpqc.compiler.driver import compile_model
    from mpqc.compiler.lowering import lower, run_emulator
    from mpqc.runtime.emulator import Emulator
    xc, _ = load_split(name, "calib")
    xt, yt = load_split(name, "test")
    batch = 16 if name.startswith("efficientnet") else 64
    fsess = ort_session(str(model_path(name)))
    acc_float = top1(ort_run(fsess, xt, batch), yt)
    log(f"{name}: float {acc_float:.4f}")
    rows = {"float": {"accuracy": acc_float, "model_bytes": os.path.getsize(model_path(name))}}
    progs = {}
    for spec in targets:
        # "npu8:a16": 16-bit activations (isolates the weights' share of the loss);
        # "npu8:s0": n from the range alone, no MSE search (what the MSE choice buys)
        tgt, *mods = spec.split(":")
        opts = {"a": "act_bits", "s": "search"}
        cf = {opts[m[0]]: m[1:] for m in mods}
        act_bits = cf.get("act_bits")
        passes = None
        if cf:
            from mpqc.compiler.pipelines import CANONICALIZE
            o = ",".join(f"{k}={v}" for k, v in cf.items())
            passes = ",".join(CANONICALIZE + [f"choose-formats{{{o}}}", "insert-qdq"])
        t = time.perf_counter()
        res = compile_model(model_path(name), level=1, target=tgt, calib=(xc, None), batch_size=batch,
                            passes=passes)
        onnx_bytes = res.onnx_bytes()
        dt = time.perf_counter() - t
        npz, _ = bundle_bytes(res.graph, res.report)
        lsb = float(np.max(res.graph.outputs[0].qformat.scale()))
        t = time.perf_counter()
        emu = run_emulator(res.graph, xt, batch_size=batch)
        t_emu = time.perf_counter() - t
        exact = ort_run(ort_session(onnx_bytes, exact=True), xt, batch)
        fused = ort_run(ort_session(onnx_bytes), xt, batch)
        tot = res.report["quantization"]["totals"]
        notes = ([f"activations {act_bits} bits"] if act_bits else []) + (
            ["n from the range, no MSE search"] if cf.get("search") == "0" else [])
        key = f"mpqc -O1 {tgt}" + (f" ({', '.join(notes)})" if notes else "")
        rows[key] = {
            "accuracy": top1(emu, yt), "accuracy_ort_exact": top1(exact, yt), "accuracy_ort_default": top1(fused, yt),
            "quantize_seconds": dt, "model_bytes": len(onnx_bytes), "bundle_bytes": len(npz),
            "weight_bytes": tot["weight_bytes"]["quantized"], "output_lsb": lsb, "emulator_seconds": t_emu,
            "vs_ort_exact": agreement_stats(emu, exact, lsb), "vs_ort_default": agreement_stats(emu, fused, lsb)}
        if not cf:
            progs.setdefault(tgt, (lower(res.graph), onnx_bytes))
        r = rows[key]
        log(f"  mpqc {tgt}: acc {r['accuracy']:.4f} (ORT exact {r['accuracy_ort_exact']:.4f}, default "
            f"{r['accuracy_ort_default']:.4f}), {dt:.1f}s, vs ORT exact {r['vs_ort_exact']}, "
            f"vs default {r['vs_ort_default']}")
    int8 = None
    for pc in (False, True):
        qb, dt = quantize_ort(name, xc, pc)
        out = ort_run(ort_session(qb), xt, batch)
        key = f"ORT quantize_static {'per-channel' if pc else 'per-tensor'}"
        rows[key] = {"accuracy": top1(out, yt), "accuracy_ort_exact": top1(ort_run(ort_session(qb, exact=True), xt,
                                                                                      batch), yt),
                     "quantize_seconds": dt, "model_bytes": len(qb)}
        log(f"  {key}: acc {rows[key]['accuracy']:.4f}, {dt:.1f}s")
        if pc:
            int8 = qb
    # throughput on one batch
    xb = xt[:batch]
    prog, onnx_bytes = progs["npu8"]
    emu = Emulator(prog)
    s_float, s_int8, s_qdq = ort_session(str(model_path(name))), ort_session(int8), ort_session(onnx_bytes)
    tp = {"batch": batch,
          "emulator": throughput(lambda: emu.run(xb), batch),
          "ort_float": throughput(lambda: ort_run(s_float, xb, batch), batch),
          "ort_int8_quantize_static": throughput(lambda: ort_run(s_int8, xb, batch), batch),
          "ort_mpqc_qdq": throughput(lambda: ort_run(s_qdq, xb, batch), batch)}
    log(f"  throughput (img/s): {tp}")
    return {"model": name, "rows": rows, "throughput": tp}


def findings(results: list[dict]) -> list[str]:
    """Sentences derived from the numbers (so a rerun cannot leave them stale)."""
    out = []
    npu = [(r["model"], r["rows"]["mpqc -O1 npu8"]) for r in results if "mpqc -O1 npu8" in r["rows"]]
    exact = [m for m, row in npu if row["vs_ort_exact"]["max_lsb"] == 0
             and row["vs_ort_exact"]["top1_equal"] == row["vs_ort_exact"]["samples"]]
    within = [m for m, row in npu if row["vs_ort_exact"]["max_lsb"] <= 1
              and row["vs_ort_exact"]["top1_equal"] == row["vs_ort_exact"]["samples"]]
    out.append(f"* `-O1 npu8`, emulator vs onnxruntime exact: bit-identical logits on {len(exact)} of {len(npu)} "
               f"models ({', '.join(exact) or 'none'}); same top-1 and within 1 LSB on {len(within)} of {len(npu)}.")
    fused = [(m, row["vs_ort_default"]["max_lsb"]) for m, row in npu if row["vs_ort_default"]["max_lsb"] > 0]
    if fused:
        out.append("* onnxruntime's default fused kernels differ on " + ", ".join(f"{m} ({d:.0f} LSB)" for m, d in fused)
                   + ": its u8s8 `QLinearConv` saturates 16-bit pair sums on AVX2 CPUs without VNNI "
                     "(docs/FIXED_POINT.md §6); the unfused execution is exact.")
    digits = [(r["model"], r["rows"]["float"]["accuracy"], r["rows"]["mpqc -O1 npu8"]["accuracy"]) for r in results
              if r["model"].startswith("digits") and "mpqc -O1 npu8" in r["rows"]]
    if digits:
        worst = max(f - q for _, f, q in digits)
        out.append(f"* digits models at `-O1 npu8`: largest test accuracy drop against float {worst * 100:.2f} points "
                   f"({'within' if worst <= 0.005 else 'outside'} the 0.5-point goal).")
    out.append("* EfficientNet-Lite0: what the rows say about the gap is discussed in docs/FIXED_POINT.md §9.")
    return out


def markdown(results: list[dict], wall: float) -> str:
    lines = [SECTION, "",
             "Test accuracy (EfficientNet-Lite0: agreement with the float model on the 160 test photos), "
             "calibration on `x_calib`. mpqc accuracy is the emulator's; `ORT exact` runs the exported QDQ "
             "model with onnxruntime's QDQ fusion off (each QuantizeLinear/DequantizeLinear and float op as "
             "ONNX defines it), `ORT default` with its fused int8 kernels. ORT quantize_static: QDQ, MinMax, "
             "its default int8 activations (asymmetric) and weights (symmetric). Seconds: wall time to "
             "quantize (mpqc: import, canonicalize, calibrate with its numpy runtime, formats, QDQ, export). "
             "Bytes: the .onnx file. Emulator vs ORT: samples with the same top-1, and the largest logit "
             "difference in LSB of the output format (elements that differ). "
             f"2 shared CPU cores ({platform.processor() or platform.machine()}, AVX2 without VNNI); "
             f"{wall / 60:.1f} min for all models. Reproduce: `.venv/bin/python bench/bench_o1.py --write`.", "",
             "| model | configuration | accuracy | ORT exact | ORT default | seconds | model bytes | "
             "emulator = ORT exact | emulator = ORT default |",
             "|---|---|---|---|---|---|---|---|---|"]
    def order(key):  # float, then mpqc's configurations, then onnxruntime's
        return (0 if key == "float" else 1 if key.startswith("mpqc") else 2, key != "mpqc -O1 npu8", key)

    for r in results:
        for key, row in sorted(r["rows"].items(), key=lambda kv: order(kv[0])):
            def ag(k):
                a = row.get(k)
                if a is None:
                    return ""
                return (f"{a['top1_equal']}/{a['samples']}, {a['max_lsb']:.0f} LSB "
                        f"({a['elements_differing']}/{a['elements']})")
            acc = row["accuracy"]
            exact = row.get("accuracy_ort_exact", acc)
            default = row.get("accuracy_ort_default", acc)  # quantize_static rows: measured with the default
            secs = f"{row['quantize_seconds']:.1f}" if "quantize_seconds" in row else "-"
            lines.append(f"| {r['model']} | {key} | {acc:.4f} | {exact:.4f} | {default:.4f} | {secs} | "
                         f"{row['model_bytes']:,} | {ag('vs_ort_exact')} | {ag('vs_ort_default')} |")
    lines += ["", *findings(results)]
    lines += ["", "Throughput on one batch (images/s, best of 3 after a warm-up): the emulator (numpy BLAS + "
              "numba epilogues, integer program already lowered) against onnxruntime running the float model, "
              "quantize_static's per-channel int8 model and mpqc's QDQ model.", "",
              "| model | batch | emulator | ORT float | ORT int8 (quantize_static) | ORT mpqc QDQ | "
              "emulator / ORT float |", "|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["throughput"]
        lines.append(f"| {r['model']} | {t['batch']} | {t['emulator']:.0f} | {t['ort_float']:.0f} | "
                     f"{t['ort_int8_quantize_static']:.0f} | {t['ort_mpqc_qdq']:.0f} | "
                     f"{t['emulator'] / t['ort_float']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(ALL_MODELS))
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument("--from-json", action="store_true", help="only rebuild the table from bench/out/o1.json")
    args = ap.parse_args(argv)
    if args.from_json:
        old = json.loads((OUT / "o1.json").read_text())
        md = markdown(old["results"], sum(old["wall_seconds"].values()))
        print(md)
        if args.write:
            write_section(SECTION, md)
        return 0
    t0 = time.perf_counter()
    results = {}
    prev = OUT / "o1.json"
    if prev.exists():  # a run on some models keeps the others' last results
        old = json.loads(prev.read_text())
        results = {r["model"]: r for r in old.get("results", [])}
        wall = old.get("wall_seconds", {})
    else:
        wall = {}
    for name in args.models.split(","):
        t = time.perf_counter()
        targets = (["npu8", "ort-int8", "npu8:a16", "npu8:s0"] if name.startswith("efficientnet")
                   else ["npu8"])
        results[name] = bench_model(name, targets, lambda s: print(s, flush=True))
        wall[name] = time.perf_counter() - t
    ordered = [results[m] for m in ALL_MODELS if m in results]
    md = markdown(ordered, sum(wall.get(m, 0.0) for m in results))
    print(md)
    OUT.mkdir(parents=True, exist_ok=True)
    prev.write_text(json.dumps({"results": ordered, "wall_seconds": wall}, indent=1, sort_keys=True) + "\n")
    if args.write:
        write_section(SECTION, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
