"""Target bundle: round trip, manifest contents, int4 packing, determinism, CLI evaluation."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from mpqc.cli import main
from mpqc.compiler.bundle import bundle_bytes
from mpqc.core.program import MANIFEST_KEY, _pack_int4, _unpack_int4, bundle_input_value, load_bundle, read_manifest
from mpqc.core.errors import ModelError
from mpqc.compiler.export import atomic_write_bytes
from mpqc.compiler.lowering import run_emulator
from tests.passes.test_insert_qdq import compile_small
from tests.graphs import randn


def write(tmp_path, graph, report=None, name="b.npz"):
    npz, manifest = bundle_bytes(graph, report)
    p = tmp_path / name
    atomic_write_bytes(p, npz)
    return p, npz, manifest


def test_round_trip_runs_from_the_bundle_alone(tmp_path):
    g, ctx = compile_small()
    p, _, manifest = write(tmp_path, g, ctx.report)
    x = randn(10, 2, 6, 6, seed=3)
    assert np.array_equal(run_emulator(p, x), run_emulator(g, x))
    m = json.loads(manifest)
    assert m == read_manifest(p)  # the .npz carries the same manifest
    assert m["format"] == "mpqc-bundle" and m["version"] == 1 and m["rounding"] == "half-even"
    assert m["inputs"] == [{"name": "x", "shape": ["N", 2, 6, 6], "dtype": "float32"}]
    v = bundle_input_value(p)
    assert (v.name, v.shape, v.dtype) == ("x", ("N", 2, 6, 6), np.float32)
    # integer weights with their formats, shifts per requantization, formats per integer tensor
    wq = m["constants"]["w_quantized"]
    assert wq["dtype"] == "int8" and wq["shape"] == [3, 2, 3, 3] and wq["format"]["axis"] == 0
    assert wq["format"]["frac"] == list(g.node_by_name("conv").qconfig.weight_format.frac)
    kinds = [s["kind"] for s in m["steps"]]
    assert kinds == ["quantize", "layer", "requant", "sum_pool", "requant", "move", "requant", "layer",
                     "requant", "dequantize"]
    conv_rq = m["steps"][2]
    n_in = int(g.inputs[0].qformat.frac)
    n_out = int(g.value_by_name("relu_out").qformat.frac)
    assert conv_rq["params"]["shift"] == [n_in + f - n_out for f in wq["format"]["frac"]]
    assert m["tensors"]["relu_out_quantized"]["frac"] == n_out
    assert [l["layer"] for l in m["layers"]] == ["conv", "fc"]
    prog = load_bundle(p)
    assert np.array_equal(prog.consts["w_quantized"], g.node_by_name("conv").inputs[1].producer.inputs[0].const)


def test_bytes_are_deterministic_and_entries_dated_1980(tmp_path):
    g1, c1 = compile_small()
    g2, c2 = compile_small()
    a, ma = bundle_bytes(g1, c1.report)
    b, mb = bundle_bytes(g2, c2.report)
    assert a == b and ma == mb
    zf = zipfile.ZipFile(io.BytesIO(a))
    names = zf.namelist()
    assert names == sorted(names) and f"{MANIFEST_KEY}.npy" in names
    assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_int4_weights_are_packed_two_per_byte(tmp_path):
    g, ctx = compile_small("npu4", "choose-formats{weight_bits=4,act_bits=8},insert-qdq")
    p, npz, manifest = write(tmp_path, g, ctx.report)
    m = json.loads(manifest)
    c = m["constants"]["w_quantized"]
    assert c["packed"] == "int4x2"
    assert np.load(p)[c["key"]].shape == (27,)  # 54 values in 27 bytes
    x = randn(6, 2, 6, 6, seed=8)
    assert np.array_equal(run_emulator(p, x), run_emulator(g, x))
    a = np.array([-8, 7, -1, 0, 3], np.int8)
    assert np.array_equal(_unpack_int4(_pack_int4(a), (5,)), a)
    assert _pack_int4(np.array([1, -1], np.int8)).tolist() == [0xF1]  # low nibble first


def test_not_a_bundle(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(ModelError, match="not an mpqc bundle"):
        run_emulator(p, np.zeros((1, 2, 6, 6), np.float32))
    q = tmp_path / "bad.npz"
    q.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a readable"):
        read_manifest(q)
    with pytest.raises(ModelError, match="does not exist"):
        read_manifest(tmp_path / "none.npz")


def test_cli_eval_of_a_bundle(tmp_path, capsys):
    g, ctx = compile_small()
    p, _, _ = write(tmp_path, g, ctx.report)
    x = randn(20, 2, 6, 6, seed=11)
    out = run_emulator(g, x)
    data = tmp_path / "d.npz"
    np.savez(data, x_test=x, y_test=np.argmax(out, 1))
    assert main(["eval", str(p), "--data", f"{data}:test", "--runtime", "emulator", "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["value"] == 1.0 and res["samples"] == 20 and res["runtime"] == "emulator"
    assert main(["eval", str(p), "--data", f"{data}:test", "--runtime", "ort"]) == 2
    assert "target bundle" in capsys.readouterr().err
