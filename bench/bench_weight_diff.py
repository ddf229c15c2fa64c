"""FIG. 16-17 of US 12,393,828 B2 on the digits models: accuracy against the number of layers moved to the
lower width, for four orderings of the layers.

For each model and lower width A (weights B=8 -> A bits, per-tensor power-of-two formats,
activations 8 bits), the layers are ordered by

* ``weight-diff``: the weight-difference statistic (mean square of W[k] - W[0] over K SGD
  cycles on ``digits.npz:train``; US 12,393,828 B2, FIG. 8-10; ``compiler.weight_diff``),
* ``weight-range``: max(W) - min(W) ascending (FIG. 17 case 1701),
* ``isolated``: accuracy drop with only that layer reduced, on ``eval`` (FIG. 17 case 1702, the
  "per-layer accuracy"; US 2021/0201141 A1 [0167]; ``compiler.influence``),
* ``chained``: US 2021/0201141 A1's chained degree of influence on ``eval`` (``compiler.influence``),

and the first c layers of each ordering go to A bits, c = 0..N. Accuracy is measured on the
400 ``test`` digits (never used to rank). Each ranking is timed. The weight-diff strategies
are then run on the same ranking: ``weight-diff-bsearch`` (max loss 1 point against the all-8-bit
network on ``eval``) and ``weight-diff-topk`` (half of the layers).

    .venv/bin/python bench/bench_weight_diff.py [--cycles 50] [--widths 3,2] [--write]

``--write`` replaces the section "## Weight-difference ranking (US 12,393,828 B2, FIG. 16-17)" of
bench/RESULTS.md; the JSON lands in bench/out/weight_diff.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
SECTION = "## Weight-difference ranking (US 12,393,828 B2, FIG. 16-17)"
ORDERINGS = ("weight-diff", "weight-range", "isolated", "chained")


def bench_target(a_bits: int):
    from mpqc.compiler.targets import Target
    return Target(f"bench-w8w{a_bits}", f"weights 8 -> {a_bits} bits per tensor, activations 8 bits",
                  weight_bits=(8, a_bits), act_bits=(8,), per_channel=False, min_bits=a_bits,
                  default_bits=(8, 8), ladder=((8, 8), (a_bits, 8)))


def prepare(model: str, a_bits: int, data):
    from mpqc.compiler.data import Dataset
    from mpqc.compiler.frontend import load_graph
    from mpqc.compiler.passes import PassContext, PassManager
    from mpqc.compiler.pipelines import make_pass
    from mpqc.compiler.pipelines import build_pipeline
    g = load_graph(BENCH / f"{model}.onnx")
    PassManager(build_pipeline(0)).run(g, PassContext())
    ds = {s: Dataset(data[f"x_{s}"], data[f"y_{s}"], f"digits.npz:{s}") for s in ("calib", "eval", "test", "train")}
    ctx = PassContext(target=bench_target(a_bits), calib=ds["calib"], eval=ds["eval"], train=ds["train"], metric="top1")
    make_pass("choose-formats", {"start": "ladder"}).run(g, ctx)
    return g, ctx, ds


def order_by(sctx, start, scores):
    idx = {id(n): i for i, n in enumerate(sctx.layers)}
    return sorted(scores, key=lambda n: (scores[n], -sctx.bytes_saved(start, n), idx[id(n)]))


def run_model(model: str, a_bits: int, data, cycles: int, log) -> dict:
    from mpqc.compiler.bitsearch import SearchContext, search_context
    from mpqc.compiler.options import SearchOptions
    from mpqc.compiler.strategies import get_strategy
    from mpqc.compiler.quant import config_from_ir
    from mpqc.compiler.weight_diff import weight_difference
    g, ctx, ds = prepare(model, a_bits, data)
    sctx = search_context(g, ctx, split="eval", metric="top1")
    start = config_from_ir(sctx.plan)
    layers = sctx.layers
    test = SearchContext(g, sctx.plan, sctx.table, sctx.sim, sctx.target, ds["test"], "top1", None,
                         float("nan"), 0.0, batch_size=128)
    rankings, seconds, scores = {}, {}, {}
    t = time.perf_counter()
    wd = weight_difference(g, ds["train"].x, ds["train"].y, cycles=cycles, seed=0)
    seconds["weight-diff"] = time.perf_counter() - t
    scores["weight-diff"] = {n.name: wd.values[n] for n in layers}
    rankings["weight-diff"] = list(wd.ranking)
    t = time.perf_counter()
    rng = {n: float(np.ptp(n.weight.const)) for n in layers}
    rankings["weight-range"] = order_by(sctx, start, rng)
    seconds["weight-range"] = time.perf_counter() - t
    scores["weight-range"] = {n.name: v for n, v in rng.items()}
    for variant in ("isolated", "chained"):
        t = time.perf_counter()
        res = sctx.influence(start, variant)
        seconds[variant] = time.perf_counter() - t
        sc = {n: float(res.influence[n]) for n in layers}
        rankings[variant] = order_by(sctx, start, sc)
        scores[variant] = {n.name: v for n, v in sc.items()}
    curves = {}
    for name in ORDERINGS:
        acc = []
        for c in range(len(layers) + 1):
            cfg = start.copy()
            for n in rankings[name][:c]:
                cfg.bits[n] = sctx.lower(start, n)
            acc.append(test.evaluate(cfg))
        curves[name] = acc
        log(f"{model} A={a_bits} {name:>12}: " + " ".join(f"{a:.3f}" for a in acc))
    float_test = float(np.mean(np.argmax(_float_out(g, ds["test"].x), 1) == ds["test"].y))
    # the strategies on the same ranking (computed once, given to both)
    strat = {}
    for sname, opts in (("weight-diff-bsearch", {"max_loss": 0.01}), ("weight-diff-topk", {"count": len(layers) // 2})):
        s2 = search_context(g, ctx, split="eval", metric="top1", options=SearchOptions(weight_diff=wd, **opts))
        cfg = get_strategy(sname)(s2, start)
        chosen = [n.name for n in layers if cfg.bits[n] != start.bits[n]]
        strat[sname] = {"options": opts, "reduced": chosen, "count": len(chosen), "eval": s2.evaluate(cfg),
                        "test": test.evaluate(cfg), "evaluations": s2.evaluations,
                        "trace": [(st.action, st.extra.get("count"), round(st.value, 4), st.accepted)
                                  for st in s2.trace]}
        log(f"{model} A={a_bits} {sname}: reduced {len(chosen)} {chosen} eval {strat[sname]['eval']:.4f} "
            f"test {strat[sname]['test']:.4f} ({s2.evaluations} evaluations)")
    return {"model": model, "a_bits": a_bits, "layers": [n.name for n in layers], "cycles": cycles,
            "float_test": float_test, "rankings": {k: [n.name for n in v] for k, v in rankings.items()},
            "scores": scores, "seconds": seconds, "curves": curves, "strategies": strat,
            "weight_diff": wd.to_json()}


def _float_out(g, x):
    from mpqc.runtime.executor import run_batched
    return run_batched(g, x, batch_size=128)[0]


def markdown(results: list[dict], cycles: int, wall: float) -> str:
    lines = [SECTION, "",
             "Accuracy on the 400 `test` digits against the number of layers moved from 8-bit to A-bit weights "
             "(per-tensor power-of-two formats, activations 8 bits), the layers taken in the order each criterion "
             "gives (lowest first). `weight-diff`: mean square of W[k] - W[0] over "
             f"{cycles} SGD cycles (batch 32, lr 0.01, momentum 0.9) on `train` from the trained weights; "
             "`weight-range`: max - min of the weights (FIG. 17, 1701); `isolated`: accuracy drop on `eval` with only "
             "that layer reduced (FIG. 17, 1702, \"per-layer accuracy\"); `chained`: US 2021/0201141 A1's chained influence on "
             "`eval`. Ties: more bytes saved first, then graph order. Time: seconds to compute the ranking "
             "(2 shared CPU cores). Reproduce: `.venv/bin/python bench/bench_weight_diff.py --write`.", ""]
    lines += ["Summary: the most layers each ordering moves to A bits while the test accuracy stays within 1 point "
              "of the all-8-bit network (the first count that breaks it ends the walk), the mean accuracy over all "
              "counts (the area under the FIG. 16 curve), and the seconds the ranking took.", "",
              "| model | A | " + " | ".join(ORDERINGS) + " |", "|---|---|" + "---|" * len(ORDERINGS)]
    for r in results:
        cells = []
        for name in ORDERINGS:
            acc = r["curves"][name]
            k = 0
            while k + 1 < len(acc) and acc[0] - acc[k + 1] <= 0.01 + 1e-9:
                k += 1
            cells.append(f"{k} layers, mean {np.mean(acc):.3f}, {r['seconds'][name]:.1f} s")
        lines.append(f"| {r['model']} | {r['a_bits']} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in results:
        n = len(r["layers"])
        lines.append(f"### {r['model']}, 8 -> {r['a_bits']} bits ({n} layers, float test accuracy "
                     f"{r['float_test']:.4f})")
        lines.append("")
        head = "| ordering | time (s) | " + " | ".join(str(c) for c in range(n + 1)) + " | mean |"
        lines.append(head)
        lines.append("|" + "---|" * (n + 4))
        for name in ORDERINGS:
            acc = r["curves"][name]
            lines.append(f"| {name} | {r['seconds'][name]:.2f} | " + " | ".join(f"{a:.3f}" for a in acc)
                         + f" | {np.mean(acc):.3f} |")
        lines.append("")
        lines.append("Order (lowest first): " + "; ".join(
            f"{k}: {', '.join(_short(x) for x in r['rankings'][k])}" for k in ORDERINGS))
        lines.append("")
        for sname, s in r["strategies"].items():
            lines.append(f"- `{sname}` ({', '.join(f'{k}={v}' for k, v in s['options'].items())}): "
                         f"{s['count']} layers to {r['a_bits']} bits, eval {s['eval']:.4f}, test {s['test']:.4f}, "
                         f"{s['evaluations']} evaluations; trace (action, count, eval, accepted): "
                         + ", ".join(str(tuple(t)) for t in s["trace"]))
        lines.append("")
    lines.append(f"Total wall time {wall:.0f} s.")
    lines.append("")
    return "\n".join(lines)


def _short(name: str) -> str:
    return name.replace("_output_0", "").replace("/Conv", "").replace("/layers/layers.", "L").strip("/")


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import write_section  # noqa: E402 (same folder)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--widths", default="3,2")
    ap.add_argument("--models", default="digits_resnet,digits_vgg")
    ap.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    ap.add_argument("--from-json", action="store_true", help="re-render bench/out/weight_diff.json, run nothing")
    args = ap.parse_args(argv)
    out = ROOT / "bench" / "out"
    if args.from_json:
        saved = json.loads((out / "weight_diff.json").read_text())
        results, wall = saved["results"], saved["wall"]
    else:
        data = dict(np.load(BENCH / "digits.npz"))
        t0 = time.perf_counter()
        results = []
        for model in args.models.split(","):
            for a in (int(w) for w in args.widths.split(",")):
                results.append(run_model(model, a, data, args.cycles, lambda s: print(s, flush=True)))
        wall = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        (out / "weight_diff.json").write_text(json.dumps({"results": results, "wall": wall}, indent=1,
                                                         default=float))
    md = markdown(results, results[0]["cycles"], wall)
    print(md)
    if args.write:
        write_section(SECTION, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
