"""Binary-decomposed networks (bdcnn target): Figure-3-like curves, speed, sizes.

For each model and each k in --bases: accuracy (digits: top-1 on the test split;
EfficientNet-Lite0: agreement with the float model) and popcount runtime against Q fixed
for every layer (--qs) and against Algorithm 1 at several D (--drops, relative), with the
predicted and the measured accuracy; the speed of the popcount runtime against the int8
emulator (-O1 npu8) and onnxruntime float / int8 (the -O1 QDQ model with onnxruntime's
fused int8 kernels), whole network and per binary layer; the distance from the CPU's
popcount limit (one 64-bit POPCNT per cycle and core, at the clock in /proc/cpuinfo);
sizes against float and int8. Accuracies are computed with onnxruntime on the exported
QDQ model (equal to the popcount runtime within float tolerance; checked on a batch).

    .venv/bin/python bench/bench_bdcnn.py [--models digits_alexnet,efficientnet_lite0] [--bases 1,2,3]
        [--qs 2,3,4,5,6,8] [--drops 0.01,0.05,0.1] [--eval-n N] [--test-n N] [--time-n N]

Writes bench/results/bdcnn.md (a section for bench/RESULTS.md) and bench/out/bdcnn_<model>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, load_split, model_path, top1  # noqa: E402

SECTION = "## Binary-decomposed networks (bdcnn)"


def ort_sess(model_bytes, threads=1):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["WeightBiasQuantization"])


def ort_runner(graph, x, batch=32):
    from mpqc.compiler.export import to_onnx
    s = ort_sess(to_onnx(graph, check=False).SerializeToString())
    n = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {n: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def best_time(fn, repeat=3):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cpu_hz():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) * 1e6
    except OSError:
        pass
    return 2.0e9


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Popcount limit of one core: the kernels' vectorized loop is VPOPCNTQ on 256-bit registers
# (LLVM prefers 256-bit vectors on this CPU: 4 words per instruction), assumed 1 per cycle
# (one port), so 4 AND+popcount word operations = 256 binary ops per cycle; scalar POPCNT
# (no AVX-512 VPOPCNTDQ) is 1 word per cycle.
def words_per_cycle():
    return 4 if "avx512_vpopcntdq" in cpu_flags() else 1


def kernel_ceilings(repeat=5):
    """Throughput of the two cores on this CPU, one thread, measured now: the popcount core (_bgemm: 4
    positions x 36 words x 256 (base, filter) columns, one plane) in AND+popcount word ops/s, and the int8
    emulator's GEMM (onnxruntime MatMulInteger, uint8 x int8, 1024 x 576 x 64) and float32 BLAS in
    MAC/s. A binary MAC at k bases and Q planes costs k*Q/64 word ops, so the popcount core beats the int8
    GEMM only while k*Q < 64 * words/s / MAC/s (``break_even_kq``), whatever the overheads."""
    from mpqc.runtime.intgemm import IntGemm, u8s8_exact
    from mpqc.runtime.popcount import _bgemm
    r = np.random.default_rng(0)
    A = r.integers(0, 2**63, (4, 1, 36)).astype(np.uint64)
    Wt = r.integers(0, 2**63, (36, 256)).astype(np.uint64)
    tot = np.zeros((4, 256), np.int64)

    def many(fn, n):
        return lambda: [fn() for _ in range(n)]
    words = 4 * 36 * 256 * 200 / best_time(many(lambda: _bgemm(A, Wt, 1, tot), 200), repeat)
    R, K, M = 1024, 576, 64
    g = IntGemm(r.integers(-128, 128, (K, M)).astype(np.int8))
    a = r.integers(0, 256, (R, K)).astype(np.uint8)
    int8 = R * K * M * 10 / best_time(many(lambda: g(a, 0, 255), 10), repeat)
    af, wf = a.astype(np.float32), g.w.astype(np.float32)
    f32 = R * K * M * 10 / best_time(many(lambda: af @ wf, 10), repeat)
    return {"popcount_words_per_s": words, "int8_gemm_macs_per_s": int8, "sgemm_macs_per_s": f32,
            "int8_kernel": "uint8 x int8, exact here (VNNI)" if u8s8_exact() else "uint8 x uint8",
            "break_even_kq": 64 * words / int8, "break_even_kq_sgemm": 64 * words / f32}


def word_ops(rt, positions, n):
    """AND+popcount word operations of the binary layers for ``n`` samples (padding words included)."""
    tot, paths = {}, {}
    for s, ex in zip(rt.p.steps, rt._exec):
        if s.kind != "binary":
            continue
        tot[s.node] = n * ex.layer.word_ops(positions.get(s.node, 1), ex.act.Q)
        paths[s.node] = ex.layer.last_path
    return tot, paths


def timed_emulator(em):
    """Wrap ``em._exec`` so that the seconds of each step accumulate per node name."""
    em.timings = {}
    orig = em._exec

    def ex(i, s, env):
        t = time.perf_counter()
        r = orig(i, s, env)
        em.timings[i] = em.timings.get(i, 0.0) + time.perf_counter() - t
        return r
    em._exec = ex
    return em


def emulator_layer_times(em):
    """Per Conv/Gemm node: its integer product-sum step plus the requantization right after it."""
    steps = em.p.steps
    out = {}
    for i, st in enumerate(steps):
        if st.kind == "layer":
            t = em.timings.get(i, 0.0)
            if i + 1 < len(steps) and steps[i + 1].kind == "requant":
                t += em.timings.get(i + 1, 0.0)
            out[st.node] = t
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits_alexnet")
    ap.add_argument("--bases", default="1,2,3")
    ap.add_argument("--qs", default="2,3,4,5,6,8")
    ap.add_argument("--drops", default="0.01,0.05,0.1")
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--test-n", type=int, default=400)
    ap.add_argument("--time-n", type=int, default=64)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5, help="timing repeats (best of)")
    ap.add_argument("--fit", default="outputs", help="comma-separated --fit modes to compare (outputs, "
                    "outputs-float, weights; default outputs)")
    ap.add_argument("--tag", default="", help="write bench/out/bdcnn_<model><tag>.json")
    ap.add_argument("--md", default=None, help="markdown output (default bench/results/bdcnn.md)")
    ap.add_argument("--search-drop", type=float, default=None,
                    help="relative drop of the first search (default: the first of --drops)")
    args = ap.parse_args()
    from mpqc.compiler.bdcnn import compile_bdcnn, ort_agreement
    from mpqc.compiler.driver import compile_model
    from mpqc.compiler.export import to_onnx
    from mpqc.compiler.frontend import load_graph
    from mpqc.compiler.lowering import load_program
    from mpqc.compiler.passes import PassContext, PassManager
    from mpqc.compiler.pipelines import build_pipeline
    from mpqc.compiler.qsearch import algorithm1
    from mpqc.runtime.bdcnn import BdcnnRuntime
    from mpqc.runtime.emulator import Emulator

    cmd = f"`bench/bench_bdcnn.py --models {args.models} --bases {args.bases} --qs {args.qs} " \
          f"--drops {args.drops} --eval-n {args.eval_n} --test-n {args.test_n} --restarts {args.restarts} " \
          f"--iterations {args.iterations} --time-n {args.time_n} --repeat {args.repeat} --fit {args.fit}" + \
        (f" --search-drop {args.search_drop}" if args.search_drop is not None else "") + "`"
    lines = [SECTION, "", f"One thread each (OPENBLAS_NUM_THREADS=1, "
             f"onnxruntime intra-op 1). CPU: {cpu_model()} at {cpu_hz() / 1e9:.2f} GHz; timings taken on a "
             f"**shared 2-core machine** (other jobs running: best of repeats, expect +-20% noise). Popcount "
             f"limit = {words_per_cycle()} AND+popcount word ops per cycle ({words_per_cycle() * 64} binary "
             f"ops/cycle: 256-bit VPOPCNTQ, 1/cycle, which is what LLVM emits for the kernels here).", ""]
    for model in args.models.split(","):
        eff = model.startswith("efficientnet")
        g = load_graph(model_path(model))
        PassManager(build_pipeline(0)).run(g, PassContext())
        xc, _ = load_split(model, "calib")
        xe, ye = load_split(model, "eval")
        xt, yt = load_split(model, "test")
        xe, ye, xt, yt = xe[:args.eval_n], ye[:args.eval_n], xt[:args.test_n], yt[:args.test_n]
        ref_t = ort_runner(g, xt)
        score = (lambda out: top1(out, np.argmax(ref_t.reshape(len(ref_t), -1), 1))) if eff else \
            (lambda out: top1(out, yt))
        float_acc = score(ref_t)
        xs = xt[:args.time_n]
        t_float = best_time(lambda: ort_sess(to_onnx(g).SerializeToString()).run(None, {g.inputs[0].name: xs}))
        # int8 references: -O1 npu8 (fixed-point emulator) and its QDQ model in onnxruntime (fused int8)
        c1 = compile_model(g.copy(), level=1, target="npu8", calib=xc)
        prog8 = load_program(c1.graph)
        em = Emulator(prog8)
        t_emu = best_time(lambda: em.run(xs), repeat=args.repeat)
        timed_emulator(em)
        emu_layer = {}
        for _ in range(args.repeat):  # per layer: best of the repeats
            em.timings = {}
            em.run(xs)
            emu_layer = {n: min(t, emu_layer.get(n, t)) for n, t in emulator_layer_times(em).items()}
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        s8 = ort.InferenceSession(c1.onnx_bytes(), so, providers=["CPUExecutionProvider"])
        t_ort8 = best_time(lambda: s8.run(None, {g.inputs[0].name: xs}))
        rows, speed, sizes = [], [], []
        ceil = kernel_ceilings()
        ceil_line = [f"Cores, measured in this run (one thread): the popcount core (_bgemm) "
                     f"{ceil['popcount_words_per_s'] / 1e9:.2f} G AND+popcount word ops/s "
                     f"({ceil['popcount_words_per_s'] * 64 / 1e9:.0f} G binary MACs/s; "
                     f"{ceil['popcount_words_per_s'] / cpu_hz() / words_per_cycle() * 100:.0f}% of the limit above); the "
                     f"int8 emulator's GEMM (onnxruntime MatMulInteger, {ceil['int8_kernel']}) "
                     f"{ceil['int8_gemm_macs_per_s'] / 1e9:.0f} G MACs/s; float32 BLAS {ceil['sgemm_macs_per_s'] / 1e9:.0f} "
                     f"G MACs/s. A decomposed MAC costs k*Q binary MACs, so even with no other work the popcount "
                     f"core beats the int8 GEMM only below **k*Q = {ceil['break_even_kq']:.1f}** (float32 BLAS: "
                     f"below k*Q = {ceil['break_even_kq_sgemm']:.1f}); above it, a layer can only win where the emulator "
                     f"spends its time outside the GEMM (im2col, requantization, depthwise layers)."]
        out_json = {"model": model, "float": float_acc, "configs": [], "ceilings": ceil}
        for fit, k in [(f, int(v)) for f in args.fit.split(",") for v in args.bases.split(",")]:
            kf = f"{k} ({fit})"
            t0 = time.perf_counter()
            sd = args.search_drop if args.search_drop is not None else float(args.drops.split(",")[0])
            base = compile_bdcnn(g, xc, xe, None if eff else ye, max_drop=sd, bases=k,
                                 restarts=args.restarts, iterations=args.iterations, runner=ort_runner,
                                 measure=False, fit=fit)
            t_compile = time.perf_counter() - t0
            sz = base.report["sizes"]
            sizes.append((kf, sz))
            srch = base.search
            configs = [(f"Q={q}", None, {n: q for n in base.report["q"]}) for q in [int(v) for v in args.qs.split(",")]]
            for dd in [float(v) for v in args.drops.split(",")]:
                a1 = algorithm1(srch.A, srch.R, srch.R * dd)
                configs.append((f"Alg.1 D={dd:g}", a1.predicted, dict(zip(base.report["q"], a1.q))))
            for label, pred, qs in configs:
                res = compile_bdcnn(g, xc, None, None, bases=k, restarts=args.restarts, iterations=args.iterations,
                                    reuse=base,
                                    q_fixed=qs, measure=False)
                acc = score(ort_runner(res.graph, xt))
                rt = BdcnnRuntime(res.program)
                t_pop = best_time(lambda: rt.run(xs), repeat=args.repeat)
                y_pop = rt.run(xs[:8])[0]
                y_ort = ort_runner(res.graph, xs[:8])
                dev = float(np.abs(y_pop - y_ort).max() / max(1e-12, np.abs(y_ort).max()))
                agr = ort_agreement(res, xs[:2])  # teacher-forced per layer + code flips end to end
                layer_t = {n: float("inf") for n in qs}
                for _ in range(args.repeat):  # per layer: best of the repeats
                    rt.timings.clear()
                    rt.run(xs, time_steps=True)
                    layer_t = {n: min(layer_t[n], rt.timings[n]) for n in qs}
                # words per layer: output positions from the QDQ float graph shapes
                P = {}
                from mpqc.runtime.executor import Executor
                ex = Executor(res.decomposed)
                outs = ex.run({res.decomposed.inputs[0]: xs[:1]},
                              keep=[res.decomposed.node_by_name(n).outputs[0] for n in qs])
                for n in qs:
                    v = res.decomposed.node_by_name(n).outputs[0]
                    a = [val for key, val in outs.items() if key is v][0]
                    P[n] = int(np.prod(a.shape[2:])) if a.ndim == 4 else 1
                ops, paths = word_ops(rt, P, len(xs))
                limit = cpu_hz() * words_per_cycle()
                util = sum(ops.values()) / max(1e-12, sum(layer_t.values())) / limit
                qv = "/".join(str(qs[n]) for n in qs)
                rows.append((kf, label, qv, pred, acc, t_pop, dev, util, agr))
                out_json["configs"].append({"k": k, "fit": fit, "config": label, "q": qs, "predicted": pred, "measured": acc,
                                            "popcount_s": t_pop, "ort_vs_popcount_rel": dev, "ort_agreement": agr,
                                            "popcount_utilisation": util, "layer_s": layer_t, "word_ops": ops,
                                            "paths": paths, "emulator_layer_s": emu_layer})
                if label.startswith("Q=") and int(label[2:]) * k <= 6 or label.startswith("Alg.1"):
                    speed.append((kf, k, label, qs, layer_t, ops, paths))
            out_json.setdefault("compile_s", {})[kf] = t_compile
            out_json.setdefault("fit_layers", {})[kf] = base.report["fit"]["layers"]
            print(model, "k", kf, "compiled in", round(t_compile, 1), "s", flush=True)
        # emulator per-layer is not timed per step: whole network only
        lines += [f"### {model}", "", f"Command: {cmd}", "",
                  f"float accuracy {float_acc:.4f} on {len(xt)} test samples ({'agreement' if eff else 'top-1'}); "
                  f"whole network on {len(xs)} samples: onnxruntime float {t_float * 1e3:.1f} ms, onnxruntime int8 "
                  f"(-O1 QDQ, fused) {t_ort8 * 1e3:.1f} ms, int8 emulator {t_emu * 1e3:.1f} ms.", "", *ceil_line, "",
                  "| k | Q | Q per layer | predicted | measured | popcount runtime ms | speed vs emulator | "
                  "speed vs ORT float | ORT/popcount rel diff | per layer (same input) | codes flipped | "
                  "popcount limit used |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, label, qv, pred, acc, tp, dev, util, agr in rows:
            lines.append(f"| {k} | {label} | {qv} | {'' if pred is None else f'{pred:.4f}'} | {acc:.4f} | "
                         f"{tp * 1e3:.1f} | {t_emu / tp:.2f}x | {t_float / tp:.2f}x | {dev:.1e} | "
                         f"{agr['layer_rel']:.1e} | {agr['code_flips'] / max(1, agr['codes']):.1e} | {util * 100:.1f}% |")
        lines += ["", "Sizes of the decomposed layers (M bit-packed in uint64 words + 8-bit c):", "",
                  "| k | bytes | float bytes | int8 bytes | vs float | vs int8 |", "|---|---|---|---|---|---|"]
        for k, sz in sizes:
            lines.append(f"| {k} | {sz['bytes']} | {sz['float_bytes']} | {sz['int8_bytes']} | "
                         f"{sz['vs_float']:.3f} | {sz['vs_int8']:.3f} |")
        lim = cpu_hz() * words_per_cycle()
        lines += ["", f"Per binary layer on {len(xs)} samples: popcount runtime ms (quantization sub-layer + "
                  "AND/popcount + float epilogue) / int8 emulator ms (integer product-sum + requantization) = speed "
                  "of popcount vs emulator; kernel path (pixels: 1x1 layers, the popcount core along the positions; "
                  "tap: per-pixel pre-packed words per tap; window: per-row segments into one dense window; "
                  "window-pixels: each position's whole window packed, the core along the positions; direct: "
                  "int16 additions/subtractions of each tap's run of q, depthwise); share of the popcount "
                  "limit (word ops / time / limit; direct layers: none).", ""]
        names = list(speed[0][3]) if speed else []
        wide = len(names) <= 10
        if wide:
            lines += ["| k | Q | k*Q<=6 | " + " | ".join(names) + " | conv layers total |",
                      "|---|---|---|" + "---|" * len(names) + "---|"]
        else:
            lines += ["| k | Q | k*Q<=6 | pixels layers | tap layers | window layers | window-pixels layers | "
                      "direct layers | Gemm | conv layers total |", "|---|---|---|---|---|---|---|---|---|---|"]
        for kf, k, label, qs, lt, ops, paths in speed:
            cells = []
            for n in names:
                te = emu_layer.get(n, float("nan"))
                u = "" if paths[n] == "direct" else f", {ops[n] / max(lt[n], 1e-12) / lim * 100:.0f}%"
                cells.append(f"{lt[n] * 1e3:.2f}/{te * 1e3:.2f} = **{te / lt[n]:.2f}x** ({paths[n]}{u})")

            def tot(sel):
                ns = [n for n in names if n in emu_layer and sel(n)]
                cp, ce = sum(lt[n] for n in ns), sum(emu_layer[n] for n in ns)
                wo = sum(ops[n] for n in ns if paths[n] != "direct")
                tw = sum(lt[n] for n in ns if paths[n] != "direct")
                u = f", {wo / max(tw, 1e-12) / lim * 100:.0f}%" if wo else ""
                return f"{cp * 1e3:.2f}/{ce * 1e3:.2f} = **{ce / max(cp, 1e-12):.2f}x** ({len(ns)} layers{u})"
            okq = all(k * qs[n] <= 6 for n in names)
            isconv = lambda n: not n.endswith("Gemm") and "gemm" not in n.lower() and "MatMul" not in n
            if not wide:
                cells = [tot(lambda n, pth=pth: isconv(n) and paths[n] == pth) for pth in ("pixels", "tap", "window", "window-pixels", "direct")]
                cells.append(tot(lambda n: not isconv(n)))
            lines.append(f"| {kf} | {label} | {'yes' if okq else 'no'} | " + " | ".join(cells) +
                         f" | {tot(isconv)} |")
        lines.append("")
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"bdcnn_{model}{args.tag}.json").write_text(json.dumps(out_json, indent=1, default=float))
    text = "\n".join(lines) + "\n"
    print(text)
    dst = Path(args.md) if args.md else ROOT / "bench" / "results" / "bdcnn.md"
    dst.parent.mkdir(parents=True, exist_ok=True)
    # keep the sections of the models not rerun (one run per model is allowed)
    if dst.exists():
        old = dst.read_text().split("\n### ")
        keep = [sec for sec in old[1:] if sec.split("\n", 1)[0].strip() not in args.models.split(",")]
        if keep:
            text = text.rstrip("\n") + "\n\n### " + "\n### ".join(keep).rstrip("\n") + "\n"
    dst.write_text(text)


if __name__ == "__main__":
    main()
