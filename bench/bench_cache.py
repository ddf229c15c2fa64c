"""The result cache (``--cache-dir``) on the bench models: a cold compile, the same compile again
with a warm cache, and a compile that changes only ``--max-drop``; seconds, the ratio to the cold
compile, whether the outputs are byte-identical, and what came from the cache.

    .venv/bin/python bench/bench_cache.py [--models digits_resnet,efficientnet_lite0] [--no-cache-baseline]
        [--report-only]

Each compile is the ``mpqc`` command in its own process (one BLAS thread, as in the tests), writing
the QDQ model, the JSON report and the target bundle; the cache folder starts empty. Writes
bench/results/cache.md (merged into RESULTS.md by ``bench/run_all.py --merge``) and
bench/out/cache.json. EfficientNet-Lite0's cold -O2 compile takes about 25 minutes here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, OUT, ROOT, model_path  # noqa: E402

RESULT = ROOT / "bench" / "results" / "cache.md"
SECTION = "## Result cache"
CONFIGS = {  # level, target, goal of the first compile, the changed goal, extra flags
    "digits_resnet": ("2", "npu4", 0.01, 0.05, []),
    "digits_vgg": ("2", "npu4", 0.01, 0.05, []),
    "digits_alexnet": ("2", "npu4", 0.01, 0.05, []),
    "efficientnet_lite0": ("2", "npu8", 0.1, 0.2, ["--batch-size", "16"]),
}


def data(model: str) -> Path:
    return BENCH / ("photos.npz" if model.startswith("efficientnet") else "digits.npz")


def compile_once(model: str, out: Path, cache: Path | None, max_drop: float) -> dict:
    level, target, _, _, extra = CONFIGS[model]
    out.mkdir(parents=True, exist_ok=True)
    d = data(model)
    cmd = [sys.executable, "-m", "mpqc", str(model_path(model)), f"-O{level}", "--target", target,
           "--calib", f"{d}:calib", "--eval", f"{d}:eval", "--max-drop", str(max_drop), *extra,
           "-o", str(out / "m.onnx"), "--report", str(out / "r.json"), "--emit-bundle", str(out / "b.npz"),
           "--json", "-q"] + (["--no-cache"] if cache is None else ["--cache-dir", str(cache)])
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    s = json.loads(r.stdout)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
    acc = s.get("accuracy") or {}
    return {"seconds": secs, "md5": md5, "cache": s.get("cache"), "accuracy": acc.get("quantized (emulator)"),
            "weight_ratio_int8": (s.get("search") or {}).get("weight_ratio_int8"), "max_drop": max_drop}


def kinds(cache: dict | None, what: str) -> str:
    if not cache:
        return "-"
    items = [f"{v[what]} {k}" for k, v in cache["kinds"].items() if v[what]]
    return ", ".join(items) or "nothing"


def run_model(model: str, baseline: bool) -> dict:
    _, _, goal, goal2, _ = CONFIGS[model]
    tmp = Path(tempfile.mkdtemp(prefix=f"mpqc-bench-cache-{model}-"))
    cache = tmp / "cache"
    rows = {}
    try:
        if baseline:
            rows["no cache"] = compile_once(model, tmp / "nocache", None, goal)
        rows["cold cache"] = compile_once(model, tmp / "cold", cache, goal)
        rows["warm cache"] = compile_once(model, tmp / "warm", cache, goal)
        rows[f"warm cache, --max-drop {goal2}"] = compile_once(model, tmp / "drop", cache, goal2)
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "cache_bytes": size}


def table(results: dict) -> str:
    lines = [SECTION, "",
             "Seconds of whole `mpqc` compiles (own process each, one BLAS thread; QDQ model, JSON report and "
             "bundle written) with an empty cache folder, then the same compile again, then one that changes only "
             "`--max-drop`. `identical`: every output file has the cold compile's bytes. Reused / computed: "
             "cache entries by kind. Ratios are within one run of this script on "
             f"{platform.machine()} ({os.cpu_count()} cores). Reproduce: `.venv/bin/python bench/bench_cache.py "
             f"--models {','.join(results)}`.", "",
             "| model | compile | seconds | of cold | identical | emulator on eval | reused | computed |",
             "|---|---|---|---|---|---|---|---|"]
    for model, res in results.items():
        rows = res["rows"]
        cold = rows["cold cache"]
        for name, r in rows.items():
            same = "-" if "max-drop" in name else ("yes" if r["md5"] == cold["md5"] else "**no**")
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
            lines.append(f"| {model} | {name} | {r['seconds']:.1f} | {r['seconds'] / cold['seconds']:.1%} | {same} "
                         f"| {acc} | {kinds(r['cache'], 'hits')} | {kinds(r['cache'], 'misses')} |")
        lines.append(f"| {model} | (cache folder after the three compiles) | | | | | {res['cache_bytes'] / 1e6:.1f} MB | |")
    lines += ["", "`emulator on eval`: the compiled network in the fixed-point emulator on the eval split (the search's "
              "own data). The `--max-drop` row is a different network by design; it reuses the calibration "
              "statistics, the layer input means, the float references and the starting network's influence "
              "sweeps, and computes only the evaluations and sweeps the new goal reaches.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits_resnet,efficientnet_lite0")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table from bench/out/cache.json")
    ap.add_argument("--no-cache-baseline", action="store_true",
                    help="also time the compile with --no-cache (the cold compile's overhead of writing entries)")
    args = ap.parse_args(argv)
    results = {}
    OUT.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((OUT / "cache.json").read_text())
    for m in [] if args.report_only else [s.strip() for s in args.models.split(",") if s.strip()]:
        if m not in CONFIGS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(CONFIGS)}")
        print(f"== {m}", flush=True)
        results[m] = run_model(m, args.no_cache_baseline)
        for name, r in results[m]["rows"].items():
            print(f"   {name}: {r['seconds']:.1f} s", flush=True)
    if not args.report_only:
        (OUT / "cache.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    text = table(results)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
