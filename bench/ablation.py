"""What the influence ranking is worth: the same search with other layer orders, at equal size.

For digits_resnet and digits_vgg on npu4 (ladder w8a8 -> w4a8 -> w4a4 -> w2a4, bias correction
as in -O2), each ordering walks the whole ladder one layer-rung per step (min-influence with
``repeat``: every layer once, then again on the next rung) without stopping, and every step's
network is scored on the eval split (the search's data) and on the test split:

* ``influence``: the chained degree of influence (US 2021/0201141 A1), measured again for each rung;
* ``influence-update``: influences re-measured after every step (the -O2 default strategy);
* both again with the influences measured in a continuous signal against the float network's
  outputs (``--rank-signal kl`` and ``mse``) instead of the eval split's top-1, the goal unchanged;
* ``weight-range``: layers with the smallest weight range first (no data needed);
* ``random``: a seeded random permutation (5 seeds).

Reported: (a) with the patent's stopping rule and the -O2 goal (eval >= float * 0.99), the
network NN* each ordering stops at: its size and test accuracy; (b) at equal size -- the size
the influence ranking's NN* reached -- the eval and test accuracy of the first network of each
walk that is at most that size.

    .venv/bin/python bench/ablation.py [--models digits_resnet,digits_vgg] [--seeds 5] [--report-only] [--write]

``--efficientnet``: EfficientNet-Lite0 ``-O2 --target npu8 --max-drop 0.1`` (96 eval photos; the
search's metric is top-1 against the float model's labels) compiled with the influences in each
signal, and in KL on a 32-photo ranking subset (``--ranking-subset 32``): compile seconds, weight
bytes, eval value, agreement on the 160 test photos under the emulator, sweeps and the sample-runs
the subset skipped (all in one run, ``--jobs 1``).

``--write`` replaces the section "## Influence ranking ablation" of bench/RESULTS.md; the
walks land in bench/out/ablation.json (EfficientNet: bench/out/ablation_effnet.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, OUT, model_path, write_section  # noqa: E402

SECTION = "## Influence ranking ablation"
MAX_DROP = 0.01


def prepare(model: str):
    from mpqc.compiler.driver import compile_model
    from mpqc.compiler.pipelines import CANONICALIZE
    data = str(BENCH / "digits.npz")
    res = compile_model(str(model_path(model)), target="npu4", calib=data + ":calib", eval=data + ":eval",
                        passes=",".join(CANONICALIZE + ["choose-formats{start=ladder}"]))
    return res.graph, res.context


def walk(graph, ctx, strategy: str, rank: str, seed: int = 0, signal: str = "metric") -> dict:
    """Every step of ``strategy`` with ``rank`` (influences in ``signal``) when the goal never stops it."""
    from mpqc.compiler.bitsearch import search_context
    from mpqc.compiler.options import SearchOptions
    from mpqc.compiler.strategies import get_strategy
    from mpqc.compiler.quant import BitConfig, config_from_ir
    ctx.seed = seed
    sctx = search_context(graph, ctx, target_score=-1.0, bias_correction=True,
                          options=SearchOptions(rank=rank, repeat=True, variant="chained", signal=signal))
    t = time.perf_counter()
    start = config_from_ir(sctx.plan)
    get_strategy(strategy)(sctx, start)
    secs = time.perf_counter() - t
    d = np.load(BENCH / "digits.npz")
    xt, yt = d["x_test"], d["y_test"]
    steps = []
    for st in sctx.trace:
        if st.action not in ("start", "reduce"):
            continue
        cfg = BitConfig({n: tuple(st.bits[n.name]) for n in sctx.layers}, start.input_bits)
        out = sctx.sim.run(cfg, xt, batch_size=ctx.batch_size)[0]
        steps.append({"layers": st.layers, "eval": st.value, "bytes": st.weight_bytes,
                      "test": float(np.mean(np.argmax(out, 1) == yt)), "bits": st.bits})
    return {"strategy": strategy, "rank": rank, "seed": seed, "signal": signal, "float_eval": sctx.float_value,
            "goal": sctx.float_value * (1 - MAX_DROP), "steps": steps, "seconds": secs,
            "evaluations": sctx.evaluations, "influence_sweeps": sctx.influence_sweeps}


def stop_point(w: dict) -> dict:
    """NN* under the patent's rule: the last step before the first one below the goal."""
    prev = w["steps"][0]
    for s in w["steps"][1:]:
        if s["eval"] < w["goal"] - 1e-12:
            return prev
        prev = s
        if abs(s["eval"] - w["goal"]) <= 1e-12:
            return s
    return prev


def at_size(w: dict, size: float) -> dict:
    for s in w["steps"]:
        if s["bytes"] <= size + 1e-9:
            return s
    return w["steps"][-1]


def run(models: list[str], seeds: int) -> list[dict]:
    out = []
    for m in models:
        g, ctx = prepare(m)
        walks = [walk(g, ctx, "min-influence", "influence"), walk(g, ctx, "influence-update", "influence")]
        walks += [walk(g, ctx, strategy, "influence", signal=sig) for sig in ("kl", "mse")
                  for strategy in ("min-influence", "influence-update")]
        walks.append(walk(g, ctx, "min-influence", "weight-range"))
        walks += [walk(g, ctx, "min-influence", "random", seed=s) for s in range(seeds)]
        for w in walks:
            print(m, w["strategy"], w["rank"], w["signal"], w["seed"], f"{w['seconds']:.0f}s", len(w["steps"]),
                  flush=True)
        out.append({"model": m, "walks": walks})
    return out


def label(w: dict) -> str:
    sig = w.get("signal", "metric")
    on = "" if sig == "metric" else f" in {'KL divergence' if sig == 'kl' else 'output MSE'} (--rank-signal {sig})"
    if w["strategy"] == "influence-update":
        return f"influence{on}, updated every step (influence-update)"
    if w["rank"] == "influence":
        return f"influence{on} (min-influence)"
    return {"influence": "influence (min-influence)", "weight-range": "weight range (min-influence order)",
            "random": "random order (min-influence order)"}[w["rank"]]


def markdown(results: list[dict], cmd: str) -> str:
    lines = [SECTION, "",
             "The same search (min-influence, walking the npu4 ladder w8a8 -> w4a8 -> w4a4 -> w2a4 one layer-rung per "
             "step, bias correction as in -O2) with several layer orders, scored on the eval split (300, the search's "
             "data) and the test split (400, fake-quantized). (a) With the -O2 goal (eval >= 0.99 x float) and the "
             "patent's stopping rule: where each order stops. (b) At equal size: the first network of each walk "
             "that is no larger than what the influence order stopped at. Random: 5 seeds, mean [min, max]. "
             "The --rank-signal rows measure the same chained influence in a continuous signal against the float "
             "network's outputs (KL divergence of the softmax, or the outputs' MSE) instead of the eval split's "
             "top-1; the goal and every step's verdict stay on top-1.", "",
             f"Reproduce: `{cmd}`", ""]
    for r in results:
        ws = r["walks"]
        ref = stop_point(ws[0])
        size = ref["bytes"]
        int8 = ws[0]["steps"][0]["bytes"]
        lines += [f"**{r['model']}** (float eval {ws[0]['float_eval']:.4f}, goal {ws[0]['goal']:.4f}; "
                  f"start w8a8 = {int8:,.0f} bytes)", "",
                  "| order | (a) stops at bytes | (a) % of int8 | (a) test | (b) eval at ≤ "
                  f"{size:,.0f} B | (b) test at ≤ {size:,.0f} B |", "|---|---|---|---|---|---|"]
        groups: dict[str, list] = {}
        for w in ws:
            groups.setdefault(label(w), []).append(w)
        for lab, g in groups.items():
            a = [stop_point(w) for w in g]
            b = [at_size(w, size) for w in g]
            def fmt(vals, f):
                if len(vals) == 1:
                    return f(vals[0])
                return f"{f(float(np.mean(vals)))} [{f(min(vals))}, {f(max(vals))}]"
            lines.append(f"| {lab} | {fmt([x['bytes'] for x in a], lambda v: f'{v:,.0f}')} | "
                         f"{fmt([x['bytes'] / int8 for x in a], lambda v: f'{v:.1%}')} | "
                         f"{fmt([x['test'] for x in a], lambda v: f'{v:.4f}')} | "
                         f"{fmt([x['eval'] for x in b], lambda v: f'{v:.4f}')} | "
                         f"{fmt([x['test'] for x in b], lambda v: f'{v:.4f}')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


EFFNET_ROWS = (("metric", None), ("kl", None), ("mse", None), ("kl", 32))


def effnet(rows=EFFNET_ROWS) -> list[dict]:
    from bench_o2 import float_outputs, test_value
    from mpqc.compiler.driver import compile_model
    model, batch = "efficientnet_lite0", 16
    data = str(BENCH / "photos.npz")
    ft = float_outputs(model, batch)
    out = []
    for signal, subset in rows:
        t = time.perf_counter()
        res = compile_model(str(model_path(model)), level=2, target="npu8", calib=data + ":calib",
                            eval=data + ":eval", batch_size=batch, jobs=1,
                            options={"max_drop": 0.1, "rank_signal": signal, "ranking_subset": subset})
        secs = time.perf_counter() - t
        sec = res.report["passes"]["assign-bit-widths"]
        row = {"signal": signal, "subset": subset, "seconds": secs, "weight_bytes": sec["weight_bytes"],
               "weight_ratio_int8": sec["weight_ratio_int8"], "eval": sec["final_value"], "goal": sec["goal"],
               "float_eval": sec["float_value"], "strategy": sec["strategy"], "steps": len(sec["trace"]) - 1,
               "evaluations": sec["evaluations"], "ranking": sec["ranking"],
               **test_value(model, res.graph, ft, batch)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def effnet_markdown(rows: list[dict]) -> str:
    lines = ["**efficientnet_lite0** `-O2 --target npu8 --max-drop 0.1 --jobs 1` (96 eval photos, top-1 against "
             f"the float model's labels: float {rows[0]['float_eval']:.4f}, goal {rows[0]['goal']:.4f}; strategy "
             f"{rows[0]['strategy']}); test: agreement with float on the 160 test photos under the emulator. "
             "Reproduce: `.venv/bin/python bench/ablation.py --efficientnet`", "",
             "| influences in | ranking samples | compile s | weight bytes | % of int8 | eval | test agreement | "
             "steps | sample-runs of the sweeps (skipped) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rk = r["ranking"]
        lines.append(f"| {r['signal']} | {rk['samples']} of {rk['of']} | {r['seconds']:.0f} | {r['weight_bytes']:,.0f} | "
                     f"{r['weight_ratio_int8']:.1%} | {r['eval']:.4f} | {r['test_agreement']:.4f} | {r['steps']} | "
                     f"{rk['sample_runs']:,} ({rk['sample_runs_skipped']:,}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits_resnet,digits_vgg")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--report-only", action="store_true", help="rebuild the tables from bench/out/ablation.json")
    ap.add_argument("--efficientnet", action="store_true", help="also the EfficientNet-Lite0 signal table")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from mpqc.core.progress import set_quiet
    set_quiet(True)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((OUT / "ablation.json").read_text())
    else:
        results = run(args.models.split(","), args.seeds)
        (OUT / "ablation.json").write_text(json.dumps(results, indent=1))
    eff = OUT / "ablation_effnet.json"
    if args.efficientnet and not args.report_only:
        eff.write_text(json.dumps(effnet(), indent=1))
    argv = [a for a in sys.argv[1:] if a not in ("--report-only", "--write", "--efficientnet")]
    md = markdown(results, (".venv/bin/python bench/ablation.py " + " ".join(argv)).strip())
    if args.efficientnet:
        md += "\n" + effnet_markdown(json.loads(eff.read_text()))
    print(md)
    if args.write:
        write_section(SECTION, md)


if __name__ == "__main__":
    main()
