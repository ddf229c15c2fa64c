"""``mpqc opt``: textual IR (or ONNX) in, passes, textual IR out; --split-input-file; one-line errors."""
from __future__ import annotations

import io

import numpy as np
import pytest

from mpqc.cli import SUBCOMMANDS, main
from mpqc.core.textir import parse_graph

from tests.conftest import bench_path

GOOD = """\
graph @g opset 17 {
  input %x: float32[N,4]
  %i: float32[N,4] = Identity "id"(%x)
  %y: float32[N,4] = Relu "relu"(%i)
  output %y
}
"""
AFTER = GOOD.replace('  %i: float32[N,4] = Identity "id"(%x)\n', "").replace("(%i)", "(%x)")
BAD = GOOD.replace("Relu \"relu\"(%i)", "Relu \"relu\"(%j)")  # line 4, column 34


def opt(capsys, *args):
    rc = main(["opt", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_opt_is_a_subcommand():
    assert "opt" in SUBCOMMANDS


def test_prints_roundtrip_without_passes(tmp_path, capsys):
    (tmp_path / "a.mir").write_text(GOOD)
    assert opt(capsys, tmp_path / "a.mir") == (0, GOOD, "")


def test_runs_passes(tmp_path, capsys):
    (tmp_path / "a.mir").write_text(GOOD)
    assert opt(capsys, tmp_path / "a.mir", "--passes", "remove-identity,eliminate-dead-code") == (0, AFTER, "")
    rc, out, err = opt(capsys, tmp_path / "a.mir", "--passes", "remove-identity", "-o", tmp_path / "b.mir")
    assert (rc, out, err) == (0, "", "") and (tmp_path / "b.mir").read_text() == AFTER


def test_reads_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(GOOD))
    assert opt(capsys, "-", "--passes", "remove-identity") == (0, AFTER, "")


def test_malformed_text_is_one_line_with_line_and_column(tmp_path, capsys):
    (tmp_path / "bad.mir").write_text(BAD)
    rc, out, err = opt(capsys, tmp_path / "bad.mir", "--passes", "remove-identity")
    assert rc == 2 and out == ""
    assert err == f"mpqc: error: {tmp_path / 'bad.mir'}:4:34: use of undefined value %j\n"


def test_split_input_file(tmp_path, capsys):
    text = GOOD + "// -----\n" + BAD.replace("@g", "@bad") + "// -----\n" + GOOD.replace("@g", "@h")
    (tmp_path / "s.mir").write_text(text)
    rc, out, err = opt(capsys, tmp_path / "s.mir", "--split-input-file", "--passes", "remove-identity")
    # the broken case is reported with its line in the whole file; the others still run
    assert rc == 2 and err == f"mpqc: error: {tmp_path / 's.mir'}:11:34: use of undefined value %j\n"
    assert out == AFTER + "// -----\n" + AFTER.replace("@g", "@h")
    # without the flag the separators are comments, and a second graph is an error
    rc, out, err = opt(capsys, tmp_path / "s.mir")
    assert rc == 2 and ":8:1: expected end of input after the graph, found 'graph'" in err


def test_option_and_pass_errors(tmp_path, capsys):
    (tmp_path / "a.mir").write_text(GOOD)
    rc, _, err = opt(capsys, tmp_path / "a.mir", "--passes", "no-such-pass")
    assert rc == 2 and err.startswith("mpqc: error: unknown pass 'no-such-pass'")
    rc, _, err = opt(capsys, tmp_path / "a.mir", "--passes", "choose-formats")
    assert rc == 2 and "[choose-formats]" in err and "--target" in err and len(err.splitlines()) == 1
    rc, _, err = opt(capsys, tmp_path / "missing.mir")
    assert rc == 2 and "cannot read" in err
    rc, _, err = opt(capsys, tmp_path / "a.mir", "--random-data", "4", "--calib", "x.npz")
    assert rc == 2 and "--random-data" in err


def test_data_passes_with_random_or_file_data(tmp_path, capsys):
    text = GOOD.replace('Identity "id"(%x)', 'Gemm "fc"(%x, #w) {transB = 1}').replace(
        "  %i", "  const #w: float32[4,4] = dense<[" + ", ".join(["0.5"] * 16) + "]>\n  %i")
    (tmp_path / "a.mir").write_text(text)
    rc, out, err = opt(capsys, tmp_path / "a.mir", "--passes", "choose-formats", "--target", "npu8",
                       "--random-data", "8")
    assert rc == 0, err
    assert "qconfig<w=8 a=8" in out and parse_graph(out).nodes[0].qconfig.weight_bits == 8
    np.savez(tmp_path / "d.npz", x_calib=np.random.default_rng(0).random((8, 4)).astype(np.float32))
    rc, out2, err = opt(capsys, tmp_path / "a.mir", "--passes", "choose-formats", "--target", "npu8",
                        "--calib", f"{tmp_path / 'd.npz'}:calib")
    assert rc == 0 and "input %x: float32[N,4] q<u8" in out2  # non-negative calibration data: unsigned


def test_onnx_input_and_elision(capsys):
    model = bench_path("digits_resnet.onnx")
    rc, out, err = opt(capsys, model, "--passes", "fold-batchnorm")
    assert rc == 0, err
    assert "BatchNormalization" not in out and "dense<seed=" in out
    g = parse_graph(out)
    assert len(g.layers()) == 10
    rc, full, _ = opt(capsys, model, "--elide-above", "-1")
    assert rc == 0 and "dense<seed=" not in full and len(full) > 10 * len(out)
