"""Compile time against --jobs, a Dask cluster and the eval size; simulation and emulator speed.

    .venv/bin/python bench/bench_jobs.py [--models efficientnet_lite0]
        [--runs onnxruntime:1,onnxruntime:2,numpy:2,onnxruntime:2:dask,onnxruntime:2:x2] [--throughput-only]
        [--emulator digits_resnet,digits_vgg,digits_alexnet,efficientnet_lite0] [--nncf]

Part 1: whole ``mpqc -O2`` compiles (own process each, ``--no-cache``, one BLAS thread per
process), one per ``--runs`` entry ``SIM:JOBS[:dask][:x2][:dropD][:layersS-G]``: ``--sim SIM --jobs JOBS``; ``dask``:
``--scheduler local`` (a LocalCluster of JOBS worker processes); ``x2``: the eval split doubled with
its horizontal flips (labels: the float model's top-1 of each image, EfficientNet only); ``dropD``:
``--max-drop D`` instead of the model's (pair an x2 run with an x1 run at the same drop when the
starting network misses the model's goal on the doubled split); ``layersS-G``: -O2's passes with
the search restricted to layers S..G (``layer-influence`` and ``assign-bit-widths{layers=S:G}``). Seconds,
ratio to the first row, and whether every output file (model, report, bundle) has the same bytes
as the same engine's first run on the same data. Part 2 (in this process, one thread everywhere,
batch 16 on the eval split): images per second of mpqc's float runtime and of the fake-quant
simulation the search evaluates (the -O2 starting network, bias-corrected), against
onnxruntime's float session. Part 3 (``--emulator``): the fixed-point emulator's images per second
(-O1 npu8, one thread) against onnxruntime running the float model and quantize_static's
per-channel int8 model. Part 4 (``--nncf``, needs the optional ``nncf``): NNCF's
``quantize_with_accuracy_control`` (ONNX backend) on the same eval split and drop, timed as the
anchor. Writes bench/results/jobs.md and bench/out/jobs.json.
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


def doubled_eval(model: str, folder: Path) -> Path:
    """An .npz with the calib split and the eval split doubled by horizontal flips (labels of the
    flipped photos: the float model's top-1, as for the originals)."""
    xc, yc = load_split(model, "calib")
    xe, ye = load_split(model, "eval")
    flipped = np.ascontiguousarray(xe[..., ::-1])
    yf = np.argmax(ort_run(ort_session(model_path(model)), flipped, 16).reshape(len(flipped), -1), 1)
    path = folder / f"{model}_x2.npz"
    np.savez(path, x_calib=xc, y_calib=yc, x_eval=np.concatenate([xe, flipped]),
             y_eval=np.concatenate([np.asarray(ye).reshape(-1), yf]))
    return path


def compile_time(model: str, jobs: int, out: Path, sim: str = "onnxruntime", *, dask: bool = False,
                 data: Path | None = None, drop: float | None = None, layers: str | None = None) -> dict:
    target, default_drop, bs = CONFIGS[model]
    drop = default_drop if drop is None else drop
    level = ["-O2"]
    if layers is not None:  # -O2's passes with the search range restricted (layer-influence, assign-bit-widths)
        from bench_o2 import o2_passes
        level = ["--passes", o2_passes(None, True, layers=layers)]
    d = data or BENCH / ("photos.npz" if model.startswith("efficientnet") else "digits.npz")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mpqc", str(model_path(model)), *level, "--target", target, "--calib",
           f"{d}:calib", "--eval", f"{d}:eval", "--max-drop", str(drop), "--batch-size", str(bs), "-o",
           str(out / "m.onnx"), "--report", str(out / "r.json"), "--emit-bundle", str(out / "b.npz"),
           "--no-cache", "--jobs", str(jobs), "--sim", sim, "-q"] + (["--scheduler", "local"] if dask else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1"),
                       capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    rep = json.loads((out / "r.json").read_text())
    sec = rep["passes"]["assign-bit-widths"]
    return {"seconds": secs, "md5": {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())},
            "final_value": sec.get("final_value"), "max_drop": drop, "goal_missed": sec.get("goal_missed"), "bits": sec.get("final_bits"),
            "weight_bytes": sec.get("weight_bytes"), "evaluations": sec.get("evaluations"),
            "eval_samples": rep["data"]["eval"]["samples"], "layers": sum(1 for r in sec.get("layers") or [] if r.get("in_range"))}


def emulator_speed(model: str) -> dict:
    """Images/s of the emulator (-O1 npu8) against onnxruntime float and int8, one thread, one batch."""
    from bench_o1 import quantize_ort
    from common import throughput as best_rate
    from mpqc.compiler.driver import compile_model
    from mpqc.compiler.lowering import lower
    from mpqc.runtime.emulator import Emulator
    from threadpoolctl import threadpool_limits
    xc, _ = load_split(model, "calib")
    xt, _ = load_split(model, "test")
    batch = 16 if model.startswith("efficientnet") else 64
    res = compile_model(model_path(model), level=1, target="npu8", calib=(xc, None), batch_size=batch)
    prog = lower(res.graph)
    fast, slow, steps = Emulator(prog), Emulator(prog, int8_kernels=False), Emulator(prog, fuse=False)
    xb = xt[:batch]
    a, b, c = fast.run(xb), slow.run(xb), steps.run(xb)
    identical = all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in a)
    int8, _ = quantize_ort(model, xc, True)
    s_f, s_8 = ort_session(model_path(model), threads=1), ort_session(int8, threads=1)
    with threadpool_limits(1):
        r = {"batch": batch, "emulator": best_rate(lambda: fast.run(xb), batch, repeat=10),
             "emulator (float BLAS only)": best_rate(lambda: slow.run(xb), batch, repeat=10),
             "emulator (steps one by one)": best_rate(lambda: steps.run(xb), batch, repeat=10),
             "onnxruntime float": best_rate(lambda: ort_run(s_f, xb, batch), batch, repeat=10),
             "onnxruntime int8": best_rate(lambda: ort_run(s_8, xb, batch), batch, repeat=10)}
    r["int8 layers"] = sum(1 for g in fast._gemms.values() if g is not None)
    r["fused layers"] = len(fast._fused)
    r["codes"] = len(fast._codes_out)
    r["layers"] = sum(1 for st in prog.steps if st.kind == "layer")
    r["identical"] = identical
    return r


def nncf_anchor(model: str) -> dict:
    """NNCF quantize_with_accuracy_control (ONNX backend) on the eval split, same drop, timed."""
    try:
        import nncf  # optional bench dependency
    except ImportError:
        return {"error": "nncf is not installed (pip install nncf)"}
    import onnx
    target, drop, bs = CONFIGS[model]
    xc, _ = load_split(model, "calib")
    xe, ye = load_split(model, "eval")
    ye = np.asarray(ye).reshape(-1)
    name = ort_session(model_path(model)).get_inputs()[0].name

    def validate(m, items) -> float:
        sess = ort_session(m.SerializeToString(), threads=1)
        hits = [int(np.argmax(sess.run(None, {name: x[None]})[0]) == y) for x, y in items]
        return float(np.mean(hits))
    calib = nncf.Dataset([xc[i:i + 1] for i in range(len(xc))], lambda x: {name: x})
    val = nncf.Dataset(list(zip(xe, ye)), lambda item: {name: item[0][None]})
    t = time.perf_counter()
    q = nncf.quantize_with_accuracy_control(onnx.load(str(model_path(model))), calib, val, validation_fn=validate,
                                            max_drop=drop, drop_type=nncf.DropType.ABSOLUTE,
                                            subset_size=len(xc))
    secs = time.perf_counter() - t
    return {"seconds": secs, "value": validate(q, list(zip(xe, ye))), "version": nncf.__version__}


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


def _label(k: str) -> str:
    sim, j, *mods = k.split(":")
    txt = f"--sim {sim} --jobs {j}"
    if "dask" in mods:
        txt = f"--sim {sim} --scheduler local ({j} Dask workers)"
    if "x2" in mods:
        txt += ", eval x2 (flips)"
    drop = _drop(k)
    if drop is not None:
        txt += f", --max-drop {drop:g}"
    if _layers(k) is not None:
        txt += f", layers {_layers(k)} searched"
    return txt


def _layers(k: str) -> str | None:
    """The ``layersS-G`` modifier of a run: the search range ``S:G`` (None: every layer)."""
    r = _modifier(k, "layers")
    return None if r is None else r.replace("-", ":", 1)


def _modifier(k: str, prefix: str) -> str | None:
    """What follows ``prefix`` in the run's modifier that starts with it (None: no such modifier)."""
    return next((m[len(prefix):] for m in k.split(":")[2:] if m.startswith(prefix)), None)


def _drop(k: str) -> float | None:
    """The ``dropD`` modifier of a run: another --max-drop than the model's (None: the model's)."""
    d = _modifier(k, "drop")
    return None if d is None else float(d)


def _data(k: str) -> str:
    return ("x2" if "x2" in k.split(":")[2:] else "x1") + f"/{_drop(k)}/{_layers(k)}"


def table(res: dict, argv: str = "") -> str:
    lines = [SECTION, "", f"{platform.machine()}, {os.cpu_count()} cores; every row measured in one run of "
             f"`bench/bench_jobs.py {argv}`.", "",
             "| model | compile (-O2, --no-cache) | eval samples | layers searched | seconds | of the first row | "
             "eval value | weight bytes | evaluations | same network as the first row | outputs identical to "
             "the same --sim's first run on the same data |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in res.items():
        c = r.get("compile") or {}
        if c:
            first = next(iter(c.values()))
            for k, v in c.items():
                same = [w for kk, w in c.items() if kk.split(":")[0] == k.split(":")[0] and _data(kk) == _data(k)][0]
                missed = v.get("goal_missed")
                value = (f"{v['final_value']:.4f}" if v.get("final_value") is not None else
                         f"goal missed from the start ({missed['value']:.4f} < {missed['goal']:.4f})" if missed else "-")
                lines.append(f"| {m} | {_label(k)} | {v['eval_samples']} | {v['layers'] or '-'} | {v['seconds']:.1f} | "
                             f"{v['seconds'] / first['seconds']:.2f}x | {value} | {v['weight_bytes'] or '-'} | "
                             f"{v['evaluations'] or '-'} | {'yes' if v['bits'] == first['bits'] else 'no'} | "
                             f"{'yes' if v['md5'] == same['md5'] else '**no**'} |")
        n = r.get("nncf")
        if n and "seconds" in n and c:
            lines.append(f"| {m} | NNCF {n['version']} quantize_with_accuracy_control (ONNX backend, same eval "
                         f"split and drop) | {first['eval_samples']} | - | {n['seconds']:.1f} | "
                         f"{n['seconds'] / first['seconds']:.2f}x | {n['value']:.4f} | - | - | - | - |")
        elif n:
            lines.append(f"| {m} | NNCF: {n.get('error')} | | | | | | | | | |")
    if any(r.get("throughput") for r in res.values()):
        lines += ["", "| model | engine | images/s | of onnxruntime float |", "|---|---|---|---|"]
    for m, r in res.items():
        t = r.get("throughput")
        if t:
            for k in ("mpqc float", "mpqc fake-quant (numpy engine)", "mpqc fake-quant (onnxruntime engine)",
                      "onnxruntime float"):
                lines.append(f"| {m} | {k} (batch {t['batch']}, 1 thread) | {t[k]:.1f} | "
                             f"{t[k] / t['onnxruntime float']:.2f}x |")
    emu = {m: r["emulator"] for m, r in res.items() if r.get("emulator")}
    if emu:
        lines += ["", "Fixed-point emulator (-O1 npu8, integer program lowered, one thread, one batch; images/s). "
                  "`int8 layers`: layers that ran on the 8-bit integer kernels (runtime/intgemm.py); `fused`: "
                  "layers run with their requantization in one pass, and of those, how many hand uint8 codes "
                  "channels last to the next 8-bit convolution; `steps one by one`: the same program with "
                  "`fuse=False`; `identical`: the same integers from all three emulator columns.", "",
                  "| model | batch | emulator | steps one by one | float BLAS only | onnxruntime float | "
                  "onnxruntime int8 (quantize_static per-channel) | emulator / ORT int8 | steps one by one / ORT "
                  "int8 | emulator / ORT float | int8 layers | fused (codes) | identical |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, e in emu.items():
            one = e.get("emulator (steps one by one)")
            lines.append(f"| {m} | {e['batch']} | {e['emulator']:.0f} | {one or 0:.0f} | "
                         f"{e['emulator (float BLAS only)']:.0f} | "
                         f"{e['onnxruntime float']:.0f} | {e['onnxruntime int8']:.0f} | "
                         f"{e['emulator'] / e['onnxruntime int8']:.2f}x | {(one or 0) / e['onnxruntime int8']:.2f}x | "
                         f"{e['emulator'] / e['onnxruntime float']:.2f}x | "
                         f"{e['int8 layers']}/{e['layers']} | {e.get('fused layers', '-')} ({e.get('codes', '-')}) | "
                         f"{'yes' if e['identical'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="efficientnet_lite0")
    ap.add_argument("--runs", default="onnxruntime:1,onnxruntime:2,numpy:2",
                    help="compiles to time, as SIM:JOBS[:dask][:x2][:dropD][:layersS-G] (see the module docstring)")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--no-throughput", action="store_true", help="skip part 2")
    ap.add_argument("--emulator", default="", help="models whose emulator speed to measure (comma-separated)")
    ap.add_argument("--nncf", action="store_true", help="time NNCF's quantize_with_accuracy_control as the anchor")
    args = ap.parse_args(argv)
    res = {}
    for m in [s.strip() for s in args.models.split(",") if s.strip()]:
        res[m] = {"throughput": throughput(m)} if not args.no_throughput else {}
        print(m, res[m].get("throughput"), flush=True)
        if not args.throughput_only:
            res[m]["compile"] = {}
            with tempfile.TemporaryDirectory() as tmp:
                for k in [s.strip() for s in args.runs.split(",")]:
                    sim, j, *mods = k.split(":")
                    if "x2" in mods and not m.startswith("efficientnet"):
                        continue  # flipped digits are other digits: no labels to double with
                    data = doubled_eval(m, Path(tmp)) if "x2" in mods else None
                    res[m]["compile"][k] = compile_time(m, int(j), Path(tmp) / k.replace(":", "-"), sim,
                                                        dask="dask" in mods, data=data, drop=_drop(k),
                                                        layers=_layers(k))
                    print(m, k, f"{res[m]['compile'][k]['seconds']:.1f} s", flush=True)
        if args.nncf:
            res[m]["nncf"] = nncf_anchor(m)
            print(m, "nncf", res[m]["nncf"], flush=True)
    for m in [s.strip() for s in (args.emulator or "").split(",") if s.strip()]:
        res.setdefault(m, {})["emulator"] = emulator_speed(m)
        print(m, "emulator", res[m]["emulator"], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "jobs.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    text = table(res, " ".join(argv if argv is not None else sys.argv[1:]))
    RESULT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
