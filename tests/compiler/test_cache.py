"""The content-addressed result cache (compiler/cache.py): entries, keys, damage, eviction, and
compiles that reuse it (byte-identical outputs, --max-drop reusing calibration and sweeps, a
killed compile, parallel compiles sharing one folder, a damaged folder)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpqc.compiler.cache import (ResultCache, array_digest, graph_digest, hash_json, open_cache, parse_size)
from mpqc.compiler.driver import Outputs, compile_model
from mpqc.core.errors import OptionError
from mpqc.core.qformat import QFormat
from mpqc.testing import GraphBuilder, randn

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "digits_resnet.onnx"


def entry_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.npz") if not p.name.startswith(".tmp-"))


# ---------------------------------------------------------------------------- entries
def test_put_get_round_trip_is_exact(tmp_path):
    c = ResultCache(tmp_path)
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    meta = {"x": 0.1 + 0.2, "inf": float("inf"), "names": ["a", "b"]}
    c.put("k", {"q": 1}, meta, {"a": a, "i": np.arange(4, dtype=np.int64)})
    m, arrays = c.get("k", {"q": 1})
    assert m["x"] == 0.1 + 0.2 and m["inf"] == float("inf") and m["names"] == ["a", "b"]
    assert arrays["a"].dtype == np.float32 and np.array_equal(arrays["a"], a)
    assert np.array_equal(arrays["i"], np.arange(4))
    assert c.get("k", {"q": 2}) is None  # another key
    assert c.get("other", {"q": 1}) is None  # another kind
    assert c.stats["k"] == {"hits": 1, "misses": 1, "rejected": 0}


def test_memo_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return 3.25

    for _ in range(3):
        assert ResultCache(tmp_path).memo_json("v", [1, 2], compute) == 3.25
    assert len(calls) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_entry_is_recomputed(tmp_path, damage):
    c = ResultCache(tmp_path)
    c.put("k", "key", {"v": 1}, {"a": np.arange(1000, dtype=np.float32)})
    (path,) = entry_files(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # one byte of the array data: the zip still reads, the digest does not match
        b = bytearray(data)
        i = data.index(np.arange(1000, dtype=np.float32)[500:502].tobytes())
        b[i] ^= 0xFF
        path.write_bytes(bytes(b))
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    else:
        path.write_bytes(b"")
    c2 = ResultCache(tmp_path)
    assert c2.memo("k", "key", lambda: "fresh", lambda r: ({"v": 2}, {}), lambda m, a: m["v"]) == "fresh"
    assert c2.stats["k"]["rejected"] == 1
    assert ResultCache(tmp_path).get("k", "key")[0] == {"v": 2}  # the recomputed entry replaced it


def test_foreign_entry_is_not_trusted(tmp_path):
    """A file under the right name whose header names another key (copied in, or a collision)."""
    c = ResultCache(tmp_path)
    c.put("k", "one", {"v": "one"})
    c.put("k", "two", {"v": "two"})
    p_one, _ = c._path("k", "one")
    p_two, _ = c._path("k", "two")
    p_one.write_bytes(p_two.read_bytes())
    assert c.get("k", "one") is None
    assert c.stats["k"]["rejected"] == 1
    assert c.get("k", "two")[0] == {"v": "two"}


def test_object_arrays_never_loaded(tmp_path):
    c = ResultCache(tmp_path)
    c.put("k", "key", {}, {"a": np.zeros(3)})
    (path,) = entry_files(tmp_path)
    np.savez(path.with_suffix(""), a=np.array([{"evil": 1}], dtype=object), __meta__=np.zeros(2, np.uint8))
    assert c.get("k", "key") is None and c.stats["k"]["rejected"] == 1
    with pytest.raises(ValueError):
        c.put("k", "key2", {}, {"a": np.array([None], dtype=object)})


def test_decode_failure_recomputes(tmp_path):
    c = ResultCache(tmp_path)
    c.put("k", "key", {"wrong": 1})
    assert c.memo("k", "key", lambda: 7, lambda r: ({"v": r}, {}), lambda m, a: m["v"]) == 7
    assert c.stats["k"]["rejected"] == 1


def test_trim_removes_least_recently_used(tmp_path):
    c = ResultCache(tmp_path, max_bytes=10 ** 9)
    for i in range(5):
        c.put("k", i, {}, {"a": np.zeros(10_000, np.float32)})
        p, _ = c._path("k", i)
        os.utime(p, (1000 + i, 1000 + i))
    assert c.get("k", 0) is not None  # a hit makes entry 0 the most recent
    size = entry_files(tmp_path)[0].stat().st_size
    c.max_bytes = 2 * size
    assert c.trim() == 3
    assert c.get("k", 0) is not None and c.get("k", 4) is not None
    assert all(c.get("k", i) is None for i in (1, 2, 3))


def test_stale_temporary_files_are_removed(tmp_path):
    c = ResultCache(tmp_path)
    c.put("k", 1, {})
    d = entry_files(tmp_path)[0].parent
    old, new = d / ".tmp-old.npz", d / ".tmp-new.npz"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    c.trim()
    assert not old.exists() and new.exists()


def test_unwritable_folder_disables_the_cache(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    c = ResultCache(blocker / "sub")  # its parent is a file: nothing can be written under it
    assert c.memo_json("k", 1, lambda: 5) == 5
    assert c.disabled_reason is not None and "cannot write" in c.summary()["disabled"]
    assert c.memo_json("k", 1, lambda: 6) == 6  # no more attempts, still computes


def test_open_cache_and_sizes(tmp_path, monkeypatch):
    assert open_cache(None) is None and open_cache(False) is None
    monkeypatch.setenv("MPQC_CACHE_DIR", str(tmp_path / "d"))
    assert open_cache(True).root == tmp_path / "d"
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(OptionError, match="is a file"):
        open_cache(f)
    assert parse_size("2G") == 2 << 30 and parse_size("500M") == 500 << 20 and parse_size("1024") == 1024
    assert parse_size("1.5KiB") == 1536
    for bad in ("lots", "-1G", "nanG"):
        with pytest.raises(OptionError, match="--cache-size"):
            parse_size(bad)


# ---------------------------------------------------------------------------- keys
def _tiny():
    b = GraphBuilder()
    x = b.input("x", (1, 2, 4, 4))
    y = b.op("Conv", [x, b.const("w", randn(3, 2, 3, 3, seed=1)), b.const("b", randn(3, seed=2))], name="c0",
             pads=[1, 1, 1, 1])
    return b.output(b.op("Relu", [y], name="r0"))


def test_graph_digest_sees_constants_and_decisions():
    g = _tiny()
    d0 = graph_digest(g)
    assert graph_digest(_tiny()) == d0  # the same network built again
    w = g.node_by_name("c0").weight
    arr = w.const.copy()
    arr.flat[5] = np.nextafter(arr.flat[5], np.float32(1))  # one ulp of one weight
    w.set_const(arr)
    d1 = graph_digest(g)
    assert d1 != d0
    out = g.node_by_name("c0").outputs[0]
    out.qformat = QFormat(8, 4, True)
    assert graph_digest(g) != d1
    assert graph_digest(g, decisions=False) == d1  # float results do not depend on formats


def test_key_digests():
    a = np.arange(6, dtype=np.float32)
    assert array_digest(a) != array_digest(a.astype(np.float64))
    assert array_digest(a) != array_digest(a.reshape(2, 3))
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})


# ---------------------------------------------------------------------------- compiles
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    z = np.load(ROOT / "examples" / "digits.npz")
    p = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(p, x_calib=z["x_calib"][:48], x_eval=z["x_eval"][:120], y_eval=z["y_eval"][:120])
    return p


def _compile(data, out: Path, cache, max_drop=0.02, time_passes=False):
    from mpqc.compiler.driver import Diagnostics
    out.mkdir(parents=True, exist_ok=True)
    outputs = Outputs(out / "m.onnx", out / "r.json", None, out / "b.npz")
    return compile_model(str(MODEL), level=2, target="npu4", calib=f"{data}:calib", eval=f"{data}:eval",
                         options={"max_drop": max_drop}, outputs=outputs, cache=cache,
                         diagnostics=Diagnostics(time_passes=time_passes))


def _md5s(out: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    _compile(small_data, out, None)
    return _md5s(out)


def test_warm_compile_is_byte_identical_and_computes_nothing(small_data, reference, tmp_path):
    cache = tmp_path / "cache"
    r1 = _compile(small_data, tmp_path / "a", cache)
    assert _md5s(tmp_path / "a") == reference
    assert r1.cache["misses"] > 0 and r1.cache["written"] > 0
    r2 = _compile(small_data, tmp_path / "b", cache)
    assert _md5s(tmp_path / "b") == reference
    assert r2.cache["misses"] == 0 and r2.cache["hits"] > 0
    for kind in ("activation-ranges", "influence", "evaluation", "float-reference", "emulator-accuracy"):
        assert r2.cache["kinds"][kind]["hits"] > 0, kind
    # the report does not say it (byte-identical); --time-passes reports it
    assert "cache" not in json.loads((tmp_path / "b" / "r.json").read_text())
    r3 = _compile(small_data, tmp_path / "c", cache, time_passes=True)
    assert json.loads((tmp_path / "c" / "r.json").read_text())["cache"]["misses"] == 0
    assert r3.report["cache"]["hits"] == r2.cache["hits"]


def test_changing_max_drop_reuses_calibration_and_sweeps(small_data, tmp_path):
    cache = tmp_path / "cache"
    _compile(small_data, tmp_path / "a", cache, max_drop=0.02)
    r = _compile(small_data, tmp_path / "b", cache, max_drop=0.2)
    k = r.cache["kinds"]
    assert k["activation-ranges"] == {"hits": 1, "misses": 0, "rejected": 0}
    assert k["layer-input-means"]["misses"] == 0
    assert k["influence"]["hits"] >= 3  # the three variants of the starting network
    assert k["evaluation"]["hits"] >= 1 and k["evaluation"]["misses"] >= 1  # the new goal goes further
    fresh = _compile(small_data, tmp_path / "c", None, max_drop=0.2)
    assert _md5s(tmp_path / "b") == _md5s(tmp_path / "c")
    assert fresh.cache is None


def test_damaged_cache_folder_is_recomputed(small_data, reference, tmp_path):
    cache = tmp_path / "cache"
    _compile(small_data, tmp_path / "a", cache)
    files = entry_files(cache)
    for i, p in enumerate(files):  # damage every entry, three ways
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3] if i % 3 == 0 else b"junk" if i % 3 == 1 else data[:-7] + b"\0" * 7)
    r = _compile(small_data, tmp_path / "b", cache)
    assert _md5s(tmp_path / "b") == reference
    assert sum(v["rejected"] for v in r.cache["kinds"].values()) == len(files)
    r2 = _compile(small_data, tmp_path / "c", cache)
    assert r2.cache["misses"] == 0


def _cli(data, out: Path, cache: Path, extra=()) -> list[str]:
    return [sys.executable, "-m", "mpqc", str(MODEL), "-O2", "--target", "npu4", "--calib", f"{data}:calib",
            "--eval", f"{data}:eval", "--max-drop", "0.02", "-o", str(out / "m.onnx"), "--report",
            str(out / "r.json"), "--emit-bundle", str(out / "b.npz"), "--cache-dir", str(cache), "-q", *extra]


ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _processes_naming(path) -> list[int]:
    """Live processes whose command line names ``path`` (a compile and its forked workers)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes()
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if str(path).encode() in cmd and "zombie" not in state:
            found.append(int(d.name))
    return found


@pytest.mark.slow
def test_killed_compile_leaves_nothing_and_a_usable_cache(small_data, reference, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(_cli(small_data, out, cache), env=ENV)
    t0 = time.time()
    try:  # kill it during the search: once some evaluations are in the cache
        while time.time() - t0 < 120 and proc.poll() is None:
            if len(entry_files(cache / "v1" / "evaluation")) >= 3 if (cache / "v1" / "evaluation").is_dir() else 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the compile ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(out.iterdir()) == []  # no output, no temporary file beside the outputs
    deadline = time.time() + 20  # its --jobs workers die with it instead of waiting for batches forever
    while _processes_naming(out) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_naming(out) == []
    r = subprocess.run(_cli(small_data, out, cache, ["--json"]), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["cache"]["hits"] > 0 and summary["cache"]["kinds"]["evaluation"]["hits"] >= 3
    assert _md5s(out) == reference


@pytest.mark.slow
def test_parallel_compiles_share_one_cache(small_data, reference, tmp_path):
    cache = tmp_path / "cache"
    outs = [tmp_path / "a", tmp_path / "b"]
    for o in outs:
        o.mkdir()
    procs = [subprocess.Popen(_cli(small_data, o, cache, extra), env=ENV, stderr=subprocess.PIPE, text=True)
             for o, extra in zip(outs, (["--jobs", "2"], []))]  # one of them with two worker processes
    errs = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert _md5s(outs[0]) == _md5s(outs[1]) == reference
    assert not list(cache.rglob(".tmp-*"))
    r = subprocess.run(_cli(small_data, outs[0], cache, ["--json"]), env=ENV, capture_output=True, text=True)
    assert json.loads(r.stdout)["cache"]["misses"] == 0


def test_time_budget_keeps_the_best_network_so_far(small_data, tmp_path):
    from mpqc.compiler.driver import Diagnostics
    out = tmp_path / "o"
    out.mkdir()
    res = compile_model(str(MODEL), level=2, target="npu4", calib=f"{small_data}:calib",
                        eval=f"{small_data}:eval", options={"max_drop": 0.2, "time_budget": 1e-6},
                        outputs=Outputs(out / "m.onnx", out / "r.json"), diagnostics=Diagnostics())
    stop = res.report["time_budget_exceeded"]
    assert "ran out" in stop["message"]
    sec = res.report["passes"]["assign-bit-widths"]
    assert sec["time_budget_exceeded"] == stop
    # the starting network is always measured, nothing after it: the result is the start
    assert [s["action"] for s in sec["trace"]] == ["start"]
    assert all(r["weight_bits"] == r["start_bits"][0] for r in sec["layers"])
    assert (out / "m.onnx").exists()
    with pytest.raises(OptionError, match="--time-budget"):
        compile_model(str(MODEL), level=2, options={"time_budget": 0})


def test_cli_cache_flags(small_data, tmp_path):
    from mpqc.cli import main
    out = tmp_path / "o"
    out.mkdir()
    args = [str(MODEL), "-O1", "--target", "npu8", "--calib", f"{small_data}:calib", "-o", str(out / "m.onnx")]
    assert main(args + ["--cache-dir", str(tmp_path / "c"), "-q"]) == 0
    assert entry_files(tmp_path / "c")
    assert main(args + ["--no-cache", "-q"]) == 0
    assert main(args + ["--no-cache", "--cache-dir", str(tmp_path / "c")]) == 2
    assert main(args + ["--cache-size", "huge"]) == 2


def test_time_budget_mid_search_keeps_the_last_accepted_step(small_data, tmp_path, monkeypatch):
    """A budget that runs out after two steps of the search: the result is the smallest network a
    step accepted, and the exported model is that network."""
    from mpqc.compiler import bitsearch
    from mpqc.compiler.driver import Diagnostics

    def check_budget(self):
        if len(self.trace) >= 3:  # start + two steps
            raise bitsearch.TimeBudgetExceeded()
    monkeypatch.setattr(bitsearch.SearchContext, "check_budget", check_budget)
    res = compile_model(str(MODEL), level=2, target="npu4", calib=f"{small_data}:calib",
                        eval=f"{small_data}:eval", options={"max_drop": 0.5, "time_budget": 1000},
                        outputs=Outputs(), diagnostics=Diagnostics())
    sec = res.report["passes"]["assign-bit-widths"]
    assert sec["time_budget_exceeded"]["steps"] == 3
    trace = sec["trace"]
    assert len(trace) == 3 and trace[0]["action"] == "start"
    accepted = [s for s in trace if s["accepted"]]
    best = min(accepted, key=lambda s: (s["weight_bytes"], -s["step"]))
    assert sec["final_bits"] == best["bits"] and best["weight_bytes"] < trace[0]["weight_bytes"]
    assert sec["final_value"] == best["value"]


def test_cli_time_budget_note(small_data, tmp_path, capsys):
    from mpqc.cli import main
    out = tmp_path / "m.onnx"
    rc = main([str(MODEL), "-O2", "--target", "npu4", "--calib", f"{small_data}:calib", "--eval",
               f"{small_data}:eval", "--max-drop", "0.2", "--time-budget", "1e-6", "-o", str(out), "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 0 and out.exists()
    assert "mpqc: note: the --time-budget of 1e-06 s ran out after 1 search step(s)" in err
    assert main([str(MODEL), "-O2", "--target", "npu4", "--calib", f"{small_data}:calib", "--eval",
                 f"{small_data}:eval", "--time-budget", "inf", "-o", str(out)]) == 2
    assert "--time-budget must be a finite number" in capsys.readouterr().err


def test_jobs_give_identical_outputs(small_data, reference, tmp_path):
    """--jobs 1 and --jobs 3 (more workers than batches of the calibration split) write the same bytes."""
    from mpqc.compiler.driver import Diagnostics
    for jobs in (1, 3):
        out = tmp_path / f"j{jobs}"
        out.mkdir()
        compile_model(str(MODEL), level=2, target="npu4", calib=f"{small_data}:calib", eval=f"{small_data}:eval",
                      options={"max_drop": 0.02}, outputs=Outputs(out / "m.onnx", out / "r.json", None, out / "b.npz"),
                      diagnostics=Diagnostics(), jobs=jobs)
        assert _md5s(out) == reference
    with pytest.raises(OptionError, match="--jobs"):
        compile_model(str(MODEL), level=0, jobs=0)
