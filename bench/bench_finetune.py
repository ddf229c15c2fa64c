"""Fine-tuning with fake quantization (the ``finetune`` pass) on configurations that lost accuracy.

For each case the model is canonicalized, every layer is given the case's widths
(``choose-formats``), and the ``finetune`` pass trains on ``digits.npz:train`` (fake
quantization, clipped straight-through estimator) and re-chooses weight formats. Accuracy of
the fake-quantized network (the IR's formats, ``runtime.fakequant.ir_node_fn``) is measured on
the 400 ``test`` digits before and after, besides the ``eval`` numbers the pass reports.

    .venv/bin/python bench/bench_finetune.py [--epochs 3] [--write]

``--write`` replaces the section "## Fine-tuning" of bench/RESULTS.md.
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
SECTION = "## Fine-tuning"

# (model, target, weight bits, activation bits, what); weight bits None: the 8 lowest layers of the
# weight-difference ranking at 3 bits, the rest at 8 (assign-bit-widths{strategy=weight-diff-topk,count=8})
CASES = [
    ("digits_vgg", "pt3", 3, 8, "3-bit per-tensor weights, 8-bit activations"),
    ("digits_resnet", "pt3", 3, 8, "3-bit per-tensor weights, 8-bit activations"),
    ("digits_vgg", "npu4", 2, 4, "npu4 w2a4 (2-bit per-channel weights, 4-bit activations)"),
    ("digits_resnet", "npu4", 4, 4, "npu4 w4a4 (4-bit per-channel weights, 4-bit activations)"),
    ("digits_resnet", "pt3", None, 8, "weight-diff-topk: the 8 lowest-statistic layers at 3 bits (per tensor), "
                                      "2 at 8"),
]


def target(name: str):
    from mpqc.compiler.targets import Target, get_target
    if name == "pt3":
        return Target("bench-pt3", "weights 8/3 bits per tensor, activations 8 bits", weight_bits=(8, 3),
                      act_bits=(8,), per_channel=False, min_bits=3, default_bits=(8, 8), ladder=((8, 8), (3, 8)))
    return get_target(name)


def test_accuracy(g, x, y) -> float:
    from mpqc.runtime.executor import run_batched
    from mpqc.runtime.fakequant import ir_node_fn
    return float(np.mean(np.argmax(run_batched(g, x, batch_size=128, node_fn=ir_node_fn(g))[0], 1) == y))


def run_case(model, tname, wb, ab, what, data, epochs, lr) -> dict:
    from mpqc.compiler.data import Dataset
    from mpqc.compiler.frontend import load_graph
    from mpqc.compiler.passes import PassContext, PassManager
    from mpqc.compiler.pipelines import make_pass
    from mpqc.compiler.pipelines import build_pipeline
    from mpqc.runtime.executor import run_batched
    g = load_graph(BENCH / f"{model}.onnx")
    PassManager(build_pipeline(0)).run(g, PassContext())
    ds = {s: Dataset(data[f"x_{s}"], data[f"y_{s}"], f"digits.npz:{s}") for s in ("calib", "eval", "test", "train")}
    float_test = float(np.mean(np.argmax(run_batched(g, ds["test"].x, batch_size=128)[0], 1) == ds["test"].y))
    ctx = PassContext(target=target(tname), calib=ds["calib"], eval=ds["eval"], train=ds["train"], seed=0)
    if wb is None:
        make_pass("choose-formats", {"start": "ladder"}).run(g, ctx)
        make_pass("assign-bit-widths", {"strategy": "weight-diff-topk", "count": "8", "cycles": "50",
                                        "report_variants": "false"}).run(g, ctx)
    else:
        make_pass("choose-formats", {"weight_bits": str(wb), "act_bits": str(ab)}).run(g, ctx)
    before = test_accuracy(g, ds["test"].x, ds["test"].y)
    t = time.perf_counter()
    res = make_pass("finetune", {"epochs": str(epochs), "lr": str(lr)}).run(g, ctx)
    sec = time.perf_counter() - t
    after = test_accuracy(g, ds["test"].x, ds["test"].y)
    rep = ctx.report["passes"]["finetune"]
    return {"model": model, "target": tname, "bits": {n.name: [n.qconfig.weight_bits, n.qconfig.act_bits]
                                                      for n in g.layers()}, "what": what, "float_test": float_test,
            "test_before": before, "test_after": after, "eval_before": rep["before"], "eval_after": rep["after"],
            "formats": rep["formats"], "reverted": rep["reverted"], "modified": res.modified, "seconds": sec,
            "epochs": epochs, "lr": lr, "loss": rep["train"]["loss"], "steps": rep["train"]["steps"]}


def markdown(rows, epochs, lr) -> str:
    lines = [SECTION, "",
             f"The `finetune` pass ({epochs} epochs on the 1097 `train` digits, SGD momentum 0.9, lr {lr} cosine, "
             "batch 32, seed 0) with fake quantization at the IR's formats and the clipped straight-through "
             "estimator, on low-width configurations: uniform ones, and a mixed one chosen by `weight-diff-topk` "
             "(digits_resnet's FIG. 16 curve at 8 layers). Accuracy of the fake-quantized network (IR formats) "
             "on the 400 `test` digits; `eval` is what the pass measures to keep or revert. Weight formats: "
             "`re-chosen` for the new weights, or `trained` (the formats the training used) when re-choosing "
             "evaluates worse. Reproduce: `.venv/bin/python bench/bench_finetune.py --write`.", "",
             "| model | configuration | float test | test before | test after | eval before | eval after | "
             "formats | time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['what']} | {r['float_test']:.4f} | {r['test_before']:.4f} | "
                     f"{r['test_after']:.4f} | {r['eval_before']:.4f} | {r['eval_after']:.4f} | {r['formats']}"
                     f"{' (reverted)' if r['reverted'] else ''} | {r['seconds']:.0f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    from common import write_section  # noqa: E402 (same folder)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--cases", default=None, help="comma-separated indices into CASES")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--from-json", action="store_true", help="re-render bench/out/finetune.json, run nothing")
    args = ap.parse_args(argv)
    out = ROOT / "bench" / "out"
    if args.from_json:
        rows = json.loads((out / "finetune.json").read_text())
    else:
        data = dict(np.load(BENCH / "digits.npz"))
        cases = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
        rows = []
        for c in cases:
            r = run_case(*c, data, args.epochs, args.lr)
            print(f"{r['model']} {r['what']}: test {r['test_before']:.4f} -> {r['test_after']:.4f} "
                  f"(eval {r['eval_before']:.4f} -> {r['eval_after']:.4f}, {r['formats']}, {r['seconds']:.0f}s)",
                  flush=True)
            rows.append(r)
        out.mkdir(parents=True, exist_ok=True)
        (out / "finetune.json").write_text(json.dumps(rows, indent=1))
    md = markdown(rows, rows[0]["epochs"], rows[0]["lr"])
    print(md)
    if args.write:
        write_section(SECTION, md)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
