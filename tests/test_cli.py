"""The ``mpqc`` command line, end to end in subprocesses."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import bench_path
from tests.graphs import ort_session, rel_err


def mpqc(*args, cwd=None, module: str = "mpqc") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_user_error(res: subprocess.CompletedProcess, *needles: str, out: Path | None = None) -> str:
    """Exit code 2, exactly one stderr line 'mpqc: error: ...' naming each needle, no traceback, no output."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("mpqc: error: "), lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    for n in needles:
        assert n in lines[0], (n, lines[0])
    if out is not None:
        assert not out.exists()
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []  # no temp file
    return lines[0]


@pytest.fixture(scope="module")
def resnet() -> Path:
    return bench_path("digits_resnet.onnx")


@pytest.fixture(scope="module")
def digits() -> Path:
    return bench_path("digits.npz")


def ort_run(path, x):
    sess = ort_session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ----------------------------------------------------------------------------- compile
def test_compile_O0_writes_a_matching_deterministic_model(resnet, digits, tmp_path):
    out1, out2 = tmp_path / "a.onnx", tmp_path / "b.onnx"
    res = mpqc(resnet, "-O0", "-o", out1)
    assert res.returncode == 0, res.stderr
    assert "main_graph: 22 -> 22 nodes" in res.stderr and res.stdout == ""
    res = mpqc(resnet, "-O0", "-o", out2, "-q", module="mpqc.cli")
    assert res.returncode == 0 and res.stderr == "" and res.stdout == ""
    assert out1.read_bytes() == out2.read_bytes()  # byte-identical
    model = onnx.load(out1)
    onnx.checker.check_model(model, full_check=True)
    assert model.producer_name == "mpqc"
    x = np.load(digits)["x_eval"][:50]
    assert rel_err(ort_run(out1, x), ort_run(resnet, x)) < 1e-5


def test_compile_custom_passes_and_diagnostics(resnet, tmp_path):
    out = tmp_path / "p.onnx"
    res = mpqc(resnet, "--passes", "fold-constants,eliminate-dead-code", "--print-after", "eliminate-dead-code",
               "--time-passes", "--verify-each", "-q", "-o", out)
    assert res.returncode == 0, res.stderr
    assert "// ----- IR after eliminate-dead-code -----" in res.stdout
    assert "graph main_graph (opset 17): 22 nodes" in res.stdout
    table = res.stdout.split("-----\n", 1)[1]
    assert "fold-constants" in table and "total" in table
    assert out.exists()


# ----------------------------------------------------------------------------- info, eval, targets, passes
def test_info_table_and_json(resnet):
    res = mpqc("info", resnet)
    assert res.returncode == 0, res.stderr
    head = res.stdout.splitlines()
    assert head[0].startswith("model main_graph (opset 17): 22 nodes, 77,418 parameters")
    assert head[1].startswith("ops: ") and "Conv x9" in head[1]
    assert head[2].split() == ["layer", "op", "weight", "params", "MACs", "bits", "bytes"]
    assert any(line.startswith("/stem/stem.0/Conv") and "16x1x3x3" in line for line in head)
    res = mpqc("info", resnet, "--json")
    assert res.returncode == 0
    info = json.loads(res.stdout)
    assert info["params"] == 77418 and info["ops"]["Conv"] == 9 and len(info["layers"]) == 10
    assert info["inputs"] == [{"name": "input", "shape": ["N", 1, 16, 16], "dtype": "float32"}]
    stem = info["layers"][0]
    assert stem["weight_shape"] == [16, 1, 3, 3] and stem["macs"] == 16 * 16 * 16 * 9  # 'same' 3x3 on 16x16


def test_eval_metrics(resnet, digits):
    d = np.load(digits)
    x, y = d["x_eval"], d["y_eval"]
    ref = ort_run(resnet, x)
    want_top1 = float(np.mean(ref.argmax(1) == y))
    res = mpqc("eval", resnet, "--data", f"{digits}:eval")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"top1 = {want_top1:.4f} on 300 samples of digits.npz:eval (float runtime)"
    res = mpqc("eval", resnet, "--data", f"{digits}:test", "--metric", "top5", "--json", "--runtime", "ort")
    r = json.loads(res.stdout)
    top5 = np.argsort(-ort_run(resnet, d["x_test"]), 1, kind="stable")[:, :5]
    assert r == {"model": str(resnet), "data": "digits.npz:test", "samples": 400, "metric": "top5",
                 "value": pytest.approx(float(np.mean((top5 == d["y_test"][:, None]).any(1)))),
                 "runtime": "ort"}
    vgg = bench_path("digits_vgg.onnx")
    res = mpqc("eval", resnet, "--data", digits, "--metric", "agreement", "--reference", vgg, "--json")
    r = json.loads(res.stdout)
    assert r["metric"] == "agreement" and r["samples"] == 300
    assert r["value"] == pytest.approx(float(np.mean(ref.argmax(1) == ort_run(vgg, x).argmax(1))))


def test_targets_and_passes():
    res = mpqc("targets")
    assert res.returncode == 0
    rows = res.stdout.splitlines()
    assert rows[0].split()[:3] == ["target", "weights", "activations"]
    assert [r.split()[0] for r in rows[2:]] == ["npu8", "npu4", "bdcnn", "ort-int8"]
    assert {t["name"] for t in json.loads(mpqc("targets", "--json").stdout)} >= {"npu8", "npu4", "bdcnn",
                                                                                   "ort-int8"}
    res = mpqc("passes")
    assert res.returncode == 0
    names = [line.split()[0] for line in res.stdout.splitlines() if line and not line[0].isspace()]
    assert names == sorted(names)
    assert set(names) >= {"fold-constants", "remove-identity", "infer-shapes", "fold-pad-into-conv",
                          "fold-batchnorm", "reshape-to-flatten", "eliminate-dead-code"}
    line = next(l for l in res.stdout.splitlines() if l.startswith("fold-batchnorm"))
    assert "fold an inference BatchNormalization" in line


@pytest.mark.parametrize("cmd", [[], ["info"], ["eval"], ["targets"], ["passes"]])
def test_help_reads_well(cmd):
    res = mpqc(*cmd, "--help")
    assert res.returncode == 0 and res.stderr == ""
    text = res.stdout
    prog = " ".join(["mpqc", *cmd])
    assert text.startswith(f"usage: {prog} ")
    para = text.split("\n\n")[1]
    assert len(para) > 20 and para[0].isupper()  # a description sentence
    # every option and positional says what it is for
    body = text.split("\n\n", 2)[2]
    for line in body.splitlines():
        s = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and s.startswith(("-", "model")):
            idx = body.splitlines().index(line)
            nxt = body.splitlines()[idx + 1] if idx + 1 < len(body.splitlines()) else ""
            assert len(s.split("  ")) > 1 or nxt.startswith(" " * 10), f"no help text for {s!r}"
    if not cmd:
        assert "examples:" in text and "exit codes" in text


# ----------------------------------------------------------------------------- bad inputs
def topk_model(path: Path, op: str = "TopK") -> Path:
    k = numpy_helper.from_array(np.array([3], np.int64), "k")
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu"),
             helper.make_node("TopK", ["r", "k"], ["v", "i"], name="top_scores")]
    outs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("i", TensorProto.INT64, ["N", 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 10])],
                              outs, [k])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_bad_model_files(resnet, tmp_path):
    out = tmp_path / "out.onnx"
    text = tmp_path / "notes.onnx"
    text.write_text("this is a text file renamed to .onnx\n" * 20)
    assert_user_error(mpqc(text, "-O0", "-o", out), "notes.onnx", "not a readable ONNX model", out=out)
    half = tmp_path / "half.onnx"
    data = resnet.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    assert_user_error(mpqc(half, "-O0", "-o", out), "half.onnx", out=out)
    assert_user_error(mpqc(tmp_path / "nope.onnx", "-O0", "-o", out), "nope.onnx", "does not exist", out=out)
    line = assert_user_error(mpqc(topk_model(tmp_path / "topk.onnx"), "-O0", "-o", out),
                             "node 'top_scores'", "TopK", "Supported: ", "Conv", "Relu", out=out)
    assert "mpqc does not support" in line
    assert_user_error(mpqc("info", half), "half.onnx")
    assert_user_error(mpqc("eval", text, "--data", bench_path("digits.npz")), "notes.onnx")


def bad_data(tmp_path: Path) -> dict[str, Path]:
    ok = np.zeros((4, 1, 16, 16), np.float32)
    nan = ok.copy()
    nan[2, 0, 5, 5] = np.nan
    files = {
        "shape": dict(x_calib=np.zeros((4, 3, 16, 16), np.float32)),
        "rank": dict(x_calib=np.zeros((4, 16, 16), np.float32)),
        "strings": dict(x_calib=np.full((4, 1, 16, 16), "x")),
        "complex": dict(x_calib=ok.astype(np.complex64)),
        "nan": dict(x_calib=nan),
        "split": dict(x_train=ok),
    }
    out = {}
    for name, arrays in files.items():
        out[name] = tmp_path / f"{name}.npz"
        np.savez(out[name], **arrays)
    return out


@pytest.mark.parametrize("case, needles", [
    ("shape", ["--calib", "shape.npz:calib", "'x_calib'", "[4, 3, 16, 16]", "'input'", "dim 1 is 3, expected 1"]),
    ("rank", ["--calib", "'x_calib'", "rank 3", "'input'"]),
    ("strings", ["--calib", "'x_calib'", "dtype <U1"]),
    ("complex", ["--calib", "'x_calib'", "dtype complex64"]),
    ("nan", ["--calib", "'x_calib'", "1 NaN"]),
    ("split", ["--calib", "split.npz", "no array 'x_calib'", "splits present: train"]),
    ("missing", ["--calib", "missing.npz", "does not exist"]),
])
def test_bad_data_files(case, needles, resnet, tmp_path):
    files = bad_data(tmp_path)
    path = files.get(case, tmp_path / "missing.npz")
    out = tmp_path / "out.onnx"
    assert_user_error(mpqc(resnet, "-O0", "--calib", f"{path}:calib", "-o", out), *needles, out=out)
    if case in ("shape", "nan"):
        assert_user_error(mpqc("eval", resnet, "--data", f"{path}:calib"), "--data", "'x_calib'")


@pytest.mark.parametrize("args, needles", [
    (["-O0", "--passes", "fold-constants"], ["either -O LEVEL or --passes"]),
    (["-O0", "--max-drop", "0.01", "--target-score", "0.9"], ["--max-drop or --target-score"]),
    (["-O7"], ["argument -O", "invalid choice: 7"]),
    (["--passes", "fold-everything"], ["unknown pass 'fold-everything'", "fold-batchnorm"]),
    (["--passes", "fold-constants{level=3}"], ["'fold-constants' has no option 'level'"]),
    (["-O0", "--print-after", "fold-nothing"], ["--print-after 'fold-nothing'"]),
    (["-O0", "--batch-size", "0"], ["--batch-size must be at least 1"]),
    (["-O0", "--report", "{out}"], ["--report and --output name the same file"]),
    (["-O0", "--target", "tpu9"], ["tpu9"]),
    (["-O3", "--target", "npu4"], ["-O3 prunes channels to a MACs budget: give --flops"]),
    (["-O2", "--flops", "0.5"], ["--flops, --prune and --ratios choose how -O3 prunes"]),
    (["-O3", "--flops", "1.5"], ["--flops is the fraction of the MACs to keep", "(0, 1]"]),
    (["-O3", "--flops", "0.5", "--prune", "lasso"], ["--prune 'lasso' is unknown", "reap"]),
    (["-O3", "--flops", "0.5", "--ratios", "random"], ["--ratios 'random' is unknown", "pro"]),
    (["-O2", "--ranking-subset", "0"], ["--ranking-subset", "at least 1, got 0"]),
    (["-O2", "--rank-signal", "l2"], ["--rank-signal", "invalid choice: 'l2'"]),
])
def test_bad_options(args, needles, resnet, tmp_path):
    out = tmp_path / "out.onnx"
    args = [a.replace("{out}", str(out)) for a in args]
    assert_user_error(mpqc(resnet, *args, "-o", out), *needles, out=out)


def test_bad_eval_options(resnet, digits):
    assert_user_error(mpqc("eval", resnet, "--data", digits, "--metric", "top7"), "--metric 'top7'", "top1")
    assert_user_error(mpqc("eval", resnet, "--data", digits, "--metric", "psnr"), "--reference")
    assert_user_error(mpqc("eval", resnet), "--data")
    assert_user_error(mpqc("eval", resnet, "--data", digits, "--batch-size", "0"), "--batch-size")


def test_eval_labels_out_of_range(resnet, tmp_path):
    bad = tmp_path / "labels.npz"
    np.savez(bad, x_eval=np.zeros((3, 1, 16, 16), np.float32), y_eval=np.array([0, 1, 10]))
    assert_user_error(mpqc("eval", resnet, "--data", bad), "labels.npz:eval", "class indices in [0, 10)")


def test_unwritable_output(resnet, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert_user_error(mpqc(resnet, "-O0", "-o", blocker / "out.onnx"), "cannot write", "file.txt/out.onnx")
    assert_user_error(mpqc(resnet, "-O0", "-o", tmp_path), "cannot write", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_pass_failure_leaves_no_output(resnet, tmp_path):
    out = tmp_path / "out.onnx"
    out_old = tmp_path / "old.onnx"
    out_old.write_bytes(b"previous")
    script = textwrap.dedent("""
        import sys
        from dataclasses import dataclass
        from mpqc.compiler.passes import Pass
        from mpqc.compiler.pipelines import register_pass
        from mpqc.cli import main

        @register_pass
        @dataclass(frozen=True)
        class Explode(Pass):
            name = "test-explode"
            def run(self, graph, ctx):
                raise RuntimeError("boom")

        sys.exit(main(sys.argv[1:]))
    """)
    for target in (out, out_old):
        res = subprocess.run([sys.executable, "-c", script, str(resnet), "--passes",
                              "fold-constants,test-explode", "-o", str(target), "--report",
                              str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
        assert_user_error(res, "[test-explode] internal error: RuntimeError: boom")
    assert not out.exists() and not (tmp_path / "r.json").exists()
    assert out_old.read_bytes() == b"previous"  # an existing file is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.onnx"]


def test_output_into_a_closed_pipe_is_quiet():
    # mpqc info MODEL --json | head -1: the reader quits early; no BrokenPipeError traceback
    eff = bench_path("efficientnet_lite0.onnx")
    p = subprocess.Popen([sys.executable, "-m", "mpqc", "info", str(eff), "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"{"
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == ""


# ----------------------------------------------------------------------------- hostile input (issue 14)
def test_hostile_data_and_model_in_a_real_process(resnet, digits, tmp_path):
    """Through a real process (numpy warnings reach stderr here): float64 data that overflows float32
    and a NaN weight each give one error line; tests/test_hostile.py has the full list in-process."""
    x = np.load(digits)["x_test"].astype(np.float64)
    x[0, 0, 0, 0] = 1e300
    d = tmp_path / "d.npz"
    np.savez(d, x_test=x)
    assert_user_error(mpqc("eval", resnet, "--data", f"{d}:test"), "infinite after conversion", "float32")
    m = onnx.load(str(resnet))
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w.flat[0] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[0].name))
    bad = tmp_path / "nan.onnx"
    bad.write_bytes(m.SerializeToString())
    out = tmp_path / "q.onnx"
    assert_user_error(mpqc(bad, "-O1", "--calib", f"{digits}:calib", "-o", out), "NaN", out=out)


# ----------------------------------------------------------------------------- build integration (issue 13)
def test_version():
    from importlib.metadata import version
    res = mpqc("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"mpqc {version('mpqc')}" and res.stderr == ""


def test_compile_json_summary(resnet, digits, tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    res = mpqc(resnet, "-O1", "--target", "npu4", "--calib", digits, "--eval", f"{digits}:eval", "-o", out,
               "--report", rep, "--emit-bundle", tmp_path / "b.npz", "-MD", "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)  # one JSON object, nothing else on stdout; no text summary on stderr
    assert "main_graph: 22 -> 22 nodes" not in res.stderr
    report = json.loads(rep.read_text())
    assert s["model"] == "main_graph" and s["level"] == 1 and s["target"] == "npu4"
    assert s["float_model"]["nodes"] == 22 and s["compiled_model"]["weight_bytes"] < s["float_model"]["weight_bytes"]
    assert s["accuracy"] == report["accuracy"]
    assert [l["name"] for l in s["layers"]] == [l["name"] for l in report["compiled_model"]["layers"]]
    assert {l["weight_bits"] for l in s["layers"]} <= {4, 8} and all(l["act_bits"] for l in s["layers"])
    assert s["outputs"] == {"model": str(out), "report": str(rep), "bundle": str(tmp_path / "b.npz"),
                            "bundle_manifest": str(tmp_path / "b.json"), "depfile": f"{out}.d"}
    # --json with --print-after: the IR goes to stderr, stdout stays one JSON object
    res = mpqc(resnet, "-O0", "--print-after", "fold-constants", "--json", "-q")
    assert res.returncode == 0 and json.loads(res.stdout)["outputs"] == {} and "IR after" in res.stderr


def test_compile_json_search(resnet, digits):
    res = mpqc(resnet, "-O2", "--target", "npu4", "--calib", digits, "--eval", digits, "--max-drop", "0.05",
               "--strategy", "min-influence", "--json", "-q")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)["search"]
    assert s["strategy"] == "min-influence" and s["final_value"] >= s["goal"] and s["evaluations"] >= 1
    assert s["signal"] == "metric"


def test_compile_rank_signal_and_ranking_subset(resnet, digits, tmp_path):
    rep = tmp_path / "r.json"
    res = mpqc(resnet, "-O2", "--target", "npu4", "--calib", digits, "--eval", digits, "--max-drop", "0.05",
               "--strategy", "min-influence", "--rank-signal", "kl", "--ranking-subset", "50", "--report", rep,
               "--no-cache")
    assert res.returncode == 0, res.stderr
    r = json.loads(rep.read_text())["passes"]
    sec = r["assign-bit-widths"]
    assert sec["signal"] == "kl" and sec["ranking"]["samples"] == 50 and sec["ranking"]["of"] == 300
    assert r["layer-influence"]["chained"]["signal"] == "kl" and r["layer-influence"]["chained"]["samples"] == 50
    assert f"influences in kl on 50 of 300 samples ({sec['ranking']['sweeps']} sweeps)" in res.stderr


def test_depfile_md_mf_mt_and_escaping(resnet, digits, tmp_path):
    d = tmp_path / "a b#c$"
    d.mkdir()
    model, data = d / "m.onnx", d / "d 1.npz"
    shutil.copy(resnet, model)
    shutil.copy(digits, data)
    out = d / "q.onnx"
    res = mpqc(model, "-O1", "--calib", f"{data}:calib", "--eval", data, "-o", out, "--report", d / "r.json",
               "-MD", "-q")
    assert res.returncode == 0, res.stderr
    esc = str(d).replace(" ", "\\ ").replace("#", "\\#").replace("$", "$$")
    assert (d / "q.onnx.d").read_text() == (f"{esc}/q.onnx {esc}/r.json: \\\n {esc}/m.onnx \\\n"
                                            f" {esc}/d\\ 1.npz\n")
    # -MF FILE (implies -MD), -MT TARGET (repeatable) in place of the outputs
    res = mpqc(model, "-O0", "-o", out, "-MF", tmp_path / "deps.mk", "-MT", "model", "-MT", "all models", "-q")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "deps.mk").read_text() == f"model all\\ models: \\\n {esc}/m.onnx\n"
    # -MP: a phony rule per dependency, as gcc writes them
    res = mpqc(model, "-O1", "--calib", f"{data}:calib", "-o", out, "-MD", "-MP", "-q")
    assert res.returncode == 0, res.stderr
    assert (d / "q.onnx.d").read_text() == (f"{esc}/q.onnx: \\\n {esc}/m.onnx \\\n {esc}/d\\ 1.npz\n"
                                            f"\n{esc}/m.onnx:\n\n{esc}/d\\ 1.npz:\n")


def test_depfile_names_external_data(resnet, tmp_path):
    m = onnx.load(str(resnet))
    onnx.save_model(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="w eights.bin",
                    size_threshold=0)
    res = mpqc(tmp_path / "ext.onnx", "-O0", "-o", tmp_path / "q.onnx", "-MD", "-q")
    assert res.returncode == 0, res.stderr
    deps = (tmp_path / "q.onnx.d").read_text()
    assert deps == f"{tmp_path}/q.onnx: \\\n {tmp_path}/ext.onnx \\\n {tmp_path}/w\\ eights.bin\n"


def test_depfile_errors_and_atomicity(resnet, digits, tmp_path):
    # inputs are copies: a failing check must never let a test overwrite a shared file
    resnet, digits = shutil.copy(resnet, tmp_path / "m.onnx"), shutil.copy(digits, tmp_path / "d.npz")
    out = tmp_path / "q.onnx"
    assert_user_error(mpqc(resnet, "-O0", "-MD"), "-MD writes OUTPUT.d beside -o")
    assert_user_error(mpqc(resnet, "-O0", "-o", out, "-MT", "x"), "-MT names the target of a depfile", out=out)
    assert_user_error(mpqc(resnet, "-O0", "-MF", tmp_path / "d.d"), "depfile", "give -o")
    assert_user_error(mpqc(resnet, "-O0", "-o", out, "-MF", out), "-MF and --output name the same file", out=out)
    assert_user_error(mpqc(resnet, "-O0", "-o", out, "--report", tmp_path / "r.json", "-MF", tmp_path / "r.json"),
                      "-MF and --report name the same file", out=out)
    assert_user_error(mpqc(resnet, "-O0", "-o", out, "-MF", resnet), "is the same file as the model", out=out)
    assert_user_error(mpqc(resnet, "-O0", "--calib", digits, "-o", out, "-MF", digits),
                      "-MF", "is the same file as the --calib", out=out)
    # a failure after the pipeline (a target Make cannot name) writes neither the depfile nor the outputs
    assert_user_error(mpqc(resnet, "-O1", "--calib", digits, "-o", out, "--report", tmp_path / "r.json", "-MD",
                           "-MT", "a\nb"), "cannot write a depfile", "newline", out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx"]


def test_a_missed_goal_writes_the_best_network_and_exits_3(resnet, digits, tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    args = ["-O2", "--target", "npu4", "--calib", digits, "--eval", digits, "--target-score", "0.9999"]
    res = mpqc(resnet, *args, "-o", out, "--report", rep, "-q")
    assert res.returncode == 3, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpqc: goal missed: ") and "missed by" in lines[0]
    missed = json.loads(rep.read_text())["goal_missed"]
    assert missed["goal"] == 0.9999 and missed["value"] < missed["goal"]
    assert ort_run(out, np.load(digits)["x_eval"][:4]).shape == (4, 10)  # the best network found runs
    # --strict: today's behaviour, one error line and nothing written
    out2 = tmp_path / "q2.onnx"
    assert_user_error(mpqc(resnet, *args, "-o", out2, "--strict"), "not met even before", out=out2)
