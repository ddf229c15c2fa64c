"""Compile time against --jobs, and the simulation engine's throughput against onnxruntime.

    .venv/bin/python bench/bench_jobs.py [--models efficientnet_lite0] [--runs onnxruntime:1,onnxruntime:2,numpy:2] [--throughput-only]

Part 1: whole ``mpqc -O2`` compiles (own process each, ``--no-cache``, one BLAS thread per
process) at each ``--jobs``; seconds, speed-up over ``--jobs 1``, and whether every output file
(model, report, bundle) has the same bytes. Part 2 (in this process, one thread everywhere,
batch 16 on the eval split): images per second of mpqc's float runtime and of the fake-quant
simulation the search evaluates (the -O2 starting network, bias-corrected), against
onnxruntime's float session. Writes bench/results/jobs.md and bench/out/jobs.json.
"""
from __future__ import annotations

import argparse
import hashlib
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
from common import BENCH, OUT, ROOT, load_split, model_path, ort_run, ort_session  # noqa: E402

RESULT = ROOT / "bench" / "results" / "jobs.md"
SECTION = "## Parallel compiles and simulation speed"
CONFIGS = {"digits_resnet": ("npu4", 0.01, 64), "efficientnet_lite0": ("npu8", 0.1, 16)}


def compile_time(model: str, jobs: int, out: Path, sim: str = "onnxruntime") -> dict:
    target, drop, bs = CONFIGS[model]
    d = BENCH / ("photos.npz" if model.startswith("efficientnet") else "digits.npz")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mpqc", str(model_path(model)), "-O2", "--target", target, "--calib",
           f"{d}:calib", "--eval", f"{d}:eval", "--max-drop", str(drop), "--batch-size", str(bs), "-o",
           str(out / "m.onnx"), "--report", str(out / "r.json"), "--emit-bundle", str(out / "b.npz"),
           "--no-cache", "--jobs", str(jobs), "--sim", sim, "-q"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1"),
                       capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    rep = json.loads((out / "r.json").read_text())
    sec = rep["passes"]["assign-bit-widths"]
    return {"seconds": secs, "md5": {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())},
            "final_value": sec.get("final_value"), "bits": sec.get("final_bits"),
            "weight_bytes": sec.get("weight_bytes"), "evaluations": sec.get("evaluations")}


def throughput(model: str, n: int = 32) -> dict:
    from mpqc.compiler.bitsearch import search_context
    from mpqc.compiler.data import Dataset
    from mpqc.compiler.frontend import load_graph
    from mpqc.compiler.passes import PassContext, PassManager
    from mpqc.compiler.pipelines import build_pipeline
    from mpqc.compiler.quant import config_from_ir
    from mpqc.compiler.targets import get_target
    from mpqc.runtime.executor import run_batched
    from threadpoolctl import threadpool_limits
    target, _, bs = CONFIGS[model]
    xc, _ = load_split(model, "calib")
    xe, _ = load_split(model, "eval")
    xe = xe[:n]
    g = load_graph(model_path(model))
    ctx = PassContext(target=get_target(target), batch_size=bs)
    ctx.calib, ctx.eval = Dataset(xc, None, "calib"), Dataset(xe, None, "eval")
    pipe = build_pipeline(2, get_target(target))
    PassManager(pipe[:[p.name for p in pipe].index("layer-influence")]).run(g, ctx)
    sctx = search_context(g, ctx, metric="agreement", bias_correction=True)
    cfg = config_from_ir(sctx.plan)
    sess = ort_session(model_path(model), threads=1)
    sim_ort = sctx.sim
    import copy
    sim_np = copy.copy(sctx.sim)
    sim_np.engine = "numpy"

    def best(fn, repeat=3):
        fn()
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return n / min(ts)
    with threadpool_limits(1):
        return {"images": n, "batch": bs,
                "mpqc float": best(lambda: run_batched(g, xe, batch_size=bs)),
                "mpqc fake-quant (numpy engine)": best(lambda: sim_np.run(cfg, xe, batch_size=bs)),
                "mpqc fake-quant (onnxruntime engine)": best(lambda: sim_ort.run(cfg, xe, batch_size=bs)),
                "onnxruntime float": best(lambda: ort_run(sess, xe, bs))}


def table(res: dict) -> str:
    lines = [SECTION, "", f"{platform.machine()}, {os.cpu_count()} cores; every row measured in one run of "
             f"`bench/bench_jobs.py --models {','.join(res)}`.", "",
             "| model | compile (-O2, --no-cache) | seconds | of the first row | eval value | weight bytes | "
             "evaluations | same network as the first row | outputs identical to the same --sim at the lowest --jobs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in res.items():
        c = r.get("compile") or {}
        if c:
            first = next(iter(c.values()))
            for k, v in c.items():
                sim, j = k.split(":")
                same = [w for kk, w in c.items() if kk.split(":")[0] == sim][0]
                lines.append(f"| {m} | --sim {sim} --jobs {j} | {v['seconds']:.1f} | {v['seconds'] / first['seconds']:.2f}x | "
                             f"{v['final_value']:.4f} | {v['weight_bytes']} | {v['evaluations']} | "
                             f"{'yes' if v['bits'] == first['bits'] else 'no'} | "
                             f"{'yes' if v['md5'] == same['md5'] else '**no**'} |")
    lines += ["", "| model | engine | images/s | of onnxruntime float |", "|---|---|---|---|"]
    for m, r in res.items():
        t = r.get("throughput")
        if t:
            for k in ("mpqc float", "mpqc fake-quant (numpy engine)", "mpqc fake-quant (onnxruntime engine)",
                      "onnxruntime float"):
                lines.append(f"| {m} | {k} (batch {t['batch']}, 1 thread) | {t[k]:.1f} | "
                             f"{t[k] / t['onnxruntime float']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="efficientnet_lite0")
    ap.add_argument("--runs", default="onnxruntime:1,onnxruntime:2,numpy:2",
                    help="compiles to time, as SIM:JOBS (--sim and --jobs)")
    ap.add_argument("--throughput-only", action="store_true")
    args = ap.parse_args(argv)
    res = {}
    for m in [s.strip() for s in args.models.split(",") if s.strip()]:
        res[m] = {"throughput": throughput(m)}
        print(m, res[m]["throughput"], flush=True)
        if not args.throughput_only:
            res[m]["compile"] = {}
            with tempfile.TemporaryDirectory() as tmp:
                for k in [s.strip() for s in args.runs.split(",")]:
                    sim, j = k.split(":")
                    res[m]["compile"][k] = compile_time(m, int(j), Path(tmp) / f"{sim}-j{j}", sim)
                    print(m, k, f"{res[m]['compile'][k]['seconds']:.1f} s", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "jobs.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
