"""Seeded fuzz test of hostile input (issue 14), in-process through ``mpqc.cli.main``.

Five families: mutated model bytes, mutated model structure, mutated data files, damaged
bundles (both kinds) and option/path combinations. For every case: exit 0 (and a compiled model
loads in onnxruntime and gives finite outputs), or exit 2 with exactly one ``mpqc: error:`` line
and no traceback; every input is byte-identical afterwards; a failed run leaves no output and no
folder behind. Counts per family and outcome are printed.

The fast part (``FUZZ_CASES`` cases) runs in ``make test``; ``MPQC_FUZZ=N`` (``make fuzz``)
multiplies the number of cases by N with other seeds.
"""
from __future__ import annotations

import collections
import io
import json
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.test_hostile import RESNET, run_cli, tiny_model

SCALE = int(os.environ.get("MPQC_FUZZ", "1") or 1)
#: cases per family in the fast run
FUZZ_CASES = {"model-bytes": 120, "model-structure": 130, "data": 110, "bundle": 90, "options": 80}
SEED = 20261202


def _tiny_data(path: Path, n=16) -> Path:
    rng = np.random.default_rng(3)
    arrs = {}
    for s in ("calib", "eval", "test"):
        arrs[f"x_{s}"] = rng.normal(0, 1, (n, 1, 8, 8)).astype(np.float32)
        arrs[f"y_{s}"] = rng.integers(0, 10, n)
    np.savez(path, **arrs)
    return path


def _digits_small(path: Path) -> Path:
    d = np.load(Path(RESNET).parent / "digits.npz")
    np.savez(path, **{k: d[k][:16] for k in d.files})
    return path


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


class Fuzz:
    def __init__(self, root: Path):
        self.root = root
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[str] = []

    def case(self, family: str, desc: str, files: dict[str, bytes], argv_fn, outputs=(), replaceable=()) -> None:
        """Run one case in a fresh folder holding ``files``; ``argv_fn(folder)`` gives argv."""
        d = self.root / f"c{sum(self.counts.values()):05d}"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
        before = _snapshot(d)
        argv = argv_fn(d)
        replaceable = {r for r in replaceable if str(d / r) in map(str, argv)}
        res = run_cli(*argv)
        after = _snapshot(d)
        problem = None
        if res.exc is not None:
            problem = "traceback: " + res.exc.strip().splitlines()[-1]
        elif res.rc == 0:
            outcome = "ok"
            for k, v in before.items():
                if after.get(k) != v and k not in replaceable:  # a pre-existing output may be replaced
                    problem = f"input {k} changed"
            for o in outputs:
                p = d / o
                if p.suffix == ".onnx" and p.exists() and problem is None:
                    problem = self._check_onnx(p, d)
        elif res.rc == 3:  # accuracy goal missed: the best network is written, and one line says so
            outcome = "missed"
            lines = res.stderr.splitlines()
            if not lines or not lines[-1].startswith("mpqc: goal missed: ") or "Traceback" in res.stderr:
                problem = f"exit 3 without the goal-missed line: {res.stderr[-300:]!r}"
            for k, v in before.items():
                if after.get(k) != v and k not in replaceable:
                    problem = f"input {k} changed"
            for o in outputs:
                p = d / o
                if p.suffix == ".onnx" and p.exists() and problem is None:
                    problem = self._check_onnx(p, d)
        elif res.rc == 2:
            outcome = "error"
            lines = res.stderr.splitlines()
            if len(lines) != 1 or not lines[0].startswith("mpqc: error: ") or "Traceback" in res.stderr:
                problem = f"stderr is not one error line: {res.stderr[:300]!r}"
            elif "mpqc bug" in lines[0] or "internal error" in lines[0]:
                problem = f"reported as an mpqc bug: {lines[0][:300]}"
            elif after != before:
                problem = f"files changed on failure: {sorted(set(after) ^ set(before)) or 'contents'}"
        else:
            problem = f"exit code {res.rc}: {res.stderr[-300:]!r}"
        if problem is None:
            self.counts[(family, outcome)] += 1
        else:
            self.counts[(family, "FAIL")] += 1
            self.failures.append(f"[{family}] {desc} {[str(a) for a in argv]}: {problem}")
        shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def _check_onnx(p: Path, d: Path) -> str | None:
        import onnxruntime as ort
        try:
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0]
            shape = [s if isinstance(s, int) and s > 0 else 2 for s in inp.shape]
            dt = np.float32 if "float" in inp.type else np.int64
            x = np.random.default_rng(0).normal(0, 1, shape).astype(dt)
            out = sess.run(None, {inp.name: x})[0]
        except Exception as e:  # noqa: BLE001 - the property under test
            return f"onnxruntime cannot run the output: {str(e)[:200]}"
        if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
            return "the output model gives non-finite outputs"
        return None

    def report(self) -> str:
        fams = sorted({f for f, _ in self.counts})
        lines = [f"fuzz: {sum(self.counts.values())} cases"]
        for f in fams:
            parts = ", ".join(f"{o} {self.counts[(f, o)]}" for o in ("ok", "error", "FAIL") if self.counts[(f, o)])
            lines.append(f"  {f:<16} {sum(v for (ff, _), v in self.counts.items() if ff == f):>4}: {parts}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- families
def fuzz_model_bytes(fz: Fuzz, rng: random.Random, n: int, data: bytes, tiny: bytes) -> None:
    base = RESNET.read_bytes()
    for i in range(n):
        src = base if rng.random() < 0.6 else tiny
        b = bytearray(src)
        how = rng.choice(["flip", "flip", "truncate", "insert", "zero-run", "splice"])
        if how == "flip":
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif how == "truncate":
            b = b[:rng.randrange(len(b))]
        elif how == "insert":
            at = rng.randrange(len(b))
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif how == "zero-run":
            at = rng.randrange(len(b))
            b[at:at + rng.randint(1, 64)] = b"\0" * len(b[at:at + 64])
        else:  # a chunk of the header region (names, attributes) mutated
            at = rng.randrange(min(len(b), 4096))
            b[at] = rng.randrange(256)
        cmd = rng.choice(["info", "info", "eval", "eval", "compile"])
        argv = {"info": lambda d: ["info", d / "m.onnx"],
                "eval": lambda d: ["eval", d / "m.onnx", "--data", f"{d / 'd.npz'}:test", "-q"],
                "compile": lambda d: [d / "m.onnx", "-O0", "-o", d / "out" / "q.onnx", "-q"]}[cmd]
        fz.case("model-bytes", f"{how} #{i} ({'resnet' if src is base else 'tiny'})",
                {"m.onnx": bytes(b), "d.npz": data if src is base else tiny_data_bytes(fz)}, argv,
                outputs=["out/q.onnx"])


_TINY_DATA: dict = {}


def tiny_data_bytes(fz: Fuzz) -> bytes:
    if "b" not in _TINY_DATA:
        p = fz.root / "tiny_data.npz"
        _TINY_DATA["b"] = _tiny_data(p).read_bytes()
    return _TINY_DATA["b"]


_ATTR_VALUES = {
    "strides": [[0, 1], [1], [-1, -1], [2, 2], [1, 1, 1], [2 ** 40, 1]],
    "pads": [[-1, 0, 0, 0], [1, 1], [0, 0, 0, 0], [5, 5, 5, 5], [1, 1, 1, 1, 1, 1]],
    "group": [0, -1, 2, 3, 4, 2 ** 40],
    "kernel_shape": [[5, 5], [3], [0, 3], [3, 3], [1, 1]],
    "dilations": [[0, 1], [2, 2], [1], [-3, 1]],
    "auto_pad": ["SAME_UPPER", "VALID", "BOGUS", "SAME_LOWER", "NOTSET"],
    "alpha": [float("nan"), float("inf"), 0.5, -1.0, 1e30],
    "beta": [float("nan"), 0.0, 2.0],
    "transB": [0, 2, -1],
    "axis": [5, -9, 0],
}


def _mutate_structure(m: onnx.ModelProto, rng: random.Random) -> str:
    g = m.graph
    how = rng.choice(["attr", "attr", "attr", "init-nan", "init-shape", "init-raw", "drop-node", "drop-output",
                      "opset", "input-dim", "input-type", "rename", "shuffle", "bias", "drop-init", "op-type"])
    if how == "attr":
        n = rng.choice(list(g.node))
        key = rng.choice(list(_ATTR_VALUES))
        val = rng.choice(_ATTR_VALUES[key])
        for a in list(n.attribute):
            if a.name == key:
                n.attribute.remove(a)
        n.attribute.append(helper.make_attribute(key, val))
        return f"{n.op_type}.{key}={val}"
    if how in ("init-nan", "init-shape", "init-raw", "bias", "drop-init"):
        if not g.initializer:
            return f"{how} (no initializer left)"
        t = rng.choice(list(g.initializer))
        try:
            a = numpy_helper.to_array(t).copy()
        except ValueError:  # damaged by an earlier mutation of this case
            return f"{how} {t.name} (already damaged)"
        if how == "init-nan" and a.dtype.kind == "f" and a.size:
            a.flat[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
            t.CopyFrom(numpy_helper.from_array(a, t.name))
        elif how in ("init-shape", "bias") and a.size:
            new = a.reshape(-1)[: rng.randint(1, a.size)]
            if how == "init-shape" and new.size > 1 and a.ndim > 1:
                new = new[: new.size // 2 * 2].reshape(2, -1)
            t.CopyFrom(numpy_helper.from_array(new.copy(), t.name))
        elif how == "init-raw":
            t.raw_data = t.raw_data[: len(t.raw_data) // 2] if rng.random() < 0.5 else t.raw_data + b"\1\2\3\4"
        else:
            g.initializer.remove(t)
        return f"{how} {t.name}"
    if how == "drop-node":
        n = rng.choice(list(g.node))
        g.node.remove(n)
        return f"drop {n.name}"
    if how == "drop-output":
        del g.output[:]
        return how
    if how == "opset":
        v = rng.choice([0, 1, 6, 9, 11, 12, 13, 19, 22, 999, -3])
        m.opset_import[0].version = v
        return f"opset {v}"
    if how == "input-dim":
        dim = g.input[0].type.tensor_type.shape.dim[rng.randrange(4)]
        v = rng.choice([0, 1, 2, 3, 7, 16, 2 ** 62])
        dim.dim_value = v
        return f"input dim {v}"
    if how == "input-type":
        t = rng.choice([TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.STRING,
                        TensorProto.BOOL, TensorProto.BFLOAT16, TensorProto.UINT8])
        g.input[0].type.tensor_type.elem_type = t
        return f"input type {t}"
    if how == "rename":
        n = rng.choice(list(g.node))
        if n.input:
            n.input[0] = rng.choice(["nope", "", n.output[0]])
        return f"rename input of {n.name}"
    if how == "shuffle":
        nodes = list(g.node)
        rng.shuffle(nodes)
        del g.node[:]
        g.node.extend(nodes)
        return how
    n = rng.choice(list(g.node))
    n.op_type = rng.choice(["Conv", "Relu", "MaxPool", "Gemm", "Sigmoid", "Foo", "Add", "Softmax"])
    return f"op_type {n.op_type}"


def fuzz_model_structure(fz: Fuzz, rng: random.Random, n: int, data: bytes) -> None:
    for i in range(n):
        big = rng.random() < 0.5
        m = onnx.load(str(RESNET)) if big else tiny_model()
        desc = "; ".join(_mutate_structure(m, rng) for _ in range(rng.choice([1, 1, 1, 2])))
        cmd = rng.choice(["info", "eval", "eval-ort", "compile0", "compile1"])
        d_name = "d.npz"
        argv = {"info": lambda d: ["info", d / "m.onnx"],
                "eval": lambda d: ["eval", d / "m.onnx", "--data", f"{d / d_name}:test", "-q"],
                "eval-ort": lambda d: ["eval", d / "m.onnx", "--data", f"{d / d_name}:test", "-q", "--runtime", "ort"],
                "compile0": lambda d: [d / "m.onnx", "-O0", "-o", d / "out" / "q.onnx", "-q"],
                "compile1": lambda d: [d / "m.onnx", "-O1", "--calib", f"{d / d_name}:calib", "-o",
                                       d / "out" / "q.onnx", "--report", d / "out" / "r.json", "-q"]}[cmd]
        fz.case("model-structure", f"{desc} ({'resnet' if big else 'tiny'}, {cmd})",
                {"m.onnx": m.SerializeToString(), "d.npz": data if big else tiny_data_bytes(fz)}, argv,
                outputs=["out/q.onnx"])


def _npz(arrs: dict) -> bytes:
    b = io.BytesIO()
    np.savez(b, **arrs)
    return b.getvalue()


def fuzz_data(fz: Fuzz, rng: random.Random, n: int, data: bytes) -> None:
    src = np.load(io.BytesIO(data))
    base = {k: src[k] for k in src.files}
    for i in range(n):
        how = rng.choice(["flip", "truncate", "dtype", "shape", "nan", "drop", "object", "empty", "huge-header",
                          "other-file", "labels", "f64-overflow", "valid"])
        arrs = dict(base)
        blob = None
        if how in ("flip", "truncate"):
            b = bytearray(_npz(arrs))
            if how == "flip":
                for _ in range(rng.randint(1, 6)):
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            else:
                b = b[:rng.randrange(len(b))]
            blob = bytes(b)
        elif how == "dtype":
            arrs["x_test"] = arrs["x_test"].astype(rng.choice(["int8", "uint16", "float16", "float64", "complex64",
                                                                "bool", "U3"]))
        elif how == "shape":
            x = arrs["x_test"]
            arrs["x_test"] = rng.choice([x[:, :, :8], x.reshape(len(x), -1), x[None], x[:0], x[:, 0]])
        elif how == "nan":
            x = arrs["x_test"].copy()
            x.flat[rng.randrange(x.size)] = rng.choice([np.nan, np.inf])
            arrs["x_test"] = x
        elif how == "drop":
            arrs.pop(rng.choice(["x_test", "y_test"]))
        elif how == "object":
            arrs["x_test"] = np.array([[1], "a"], dtype=object)
        elif how == "empty":
            blob = rng.choice([b"", _npz({})])
        elif how == "huge-header":
            h = io.BytesIO()
            np.lib.format.write_array_header_1_0(h, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (rng.choice([10 ** 10, 2 ** 40, 17]), 1, 16, 16)})
            zb = io.BytesIO()
            with zipfile.ZipFile(zb, "w") as z:
                z.writestr("x_test.npy", h.getvalue() + b"\0" * 100)
            blob = zb.getvalue()
        elif how == "other-file":
            import gzip
            import pickle
            blob = rng.choice([b"hello world\n", gzip.compress(b"abc" * 100), pickle.dumps({"x": 1}),
                               RESNET.read_bytes()[:2000], b"PK\x03\x04garbage"])
        elif how == "labels":
            y = arrs["y_test"]
            arrs["y_test"] = rng.choice([y[:3], y.astype(np.float32) * np.nan, y + 1000, y.reshape(-1, 1)])
        elif how == "f64-overflow":
            x = arrs["x_test"].astype(np.float64)
            x.flat[0] = 1e300
            arrs["x_test"] = x
        if blob is None:
            blob = _npz(arrs)
        fz.case("data", f"{how} #{i}", {"m.onnx": RESNET.read_bytes(), "d.npz": blob},
                lambda d: ["eval", d / "m.onnx", "--data", f"{d / 'd.npz'}:test", "-q"]
                if rng.random() < 0.7 else [d / "m.onnx", "-O1", "--calib", f"{d / 'd.npz'}:test", "-o",
                                            d / "out" / "q.onnx", "-q"],
                outputs=["out/q.onnx"])


def _members(b: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(b)) as z:
        return {n: z.read(n) for n in z.namelist()}


def _zip(members: dict[str, bytes]) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, v in members.items():
            z.writestr(n, v)
    return b.getvalue()


def _npy(a, allow_pickle=False) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array(b, a, allow_pickle=allow_pickle)
    return b.getvalue()


def _damage_bundle(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    how = rng.choice(["flip", "truncate", "drop-member", "manifest-key", "manifest-type", "const-shape",
                      "const-dtype", "object", "step-input", "step-param", "manifest-json", "output-tensor"])
    if how == "flip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return how, bytes(b)
    if how == "truncate":
        return how, raw[:rng.randrange(len(raw))]
    mem = _members(raw)
    m = json.loads(np.load(io.BytesIO(mem["__manifest__.npy"])).tobytes())
    name = rng.choice(sorted(m["constants"]))
    c = m["constants"][name]
    if how == "drop-member":
        mem.pop(rng.choice(sorted(mem)))
    elif how == "manifest-key":
        m.pop(rng.choice(["steps", "inputs", "outputs", "constants", "model", "format", "rounding", "version"]), None)
    elif how == "manifest-type":
        m[rng.choice(["steps", "inputs", "outputs", "constants"])] = rng.choice([None, 3, "x", {}, []])
    elif how == "const-shape":
        a = np.load(io.BytesIO(mem[c["key"] + ".npy"]))
        mem[c["key"] + ".npy"] = _npy(a.reshape(-1)[: max(1, a.size - 1)].copy())
    elif how == "const-dtype":
        a = np.load(io.BytesIO(mem[c["key"] + ".npy"]))
        mem[c["key"] + ".npy"] = _npy(a.astype(rng.choice([np.float64, np.int64, np.uint8])))
    elif how == "object":
        mem[c["key"] + ".npy"] = _npy(np.array([None, "a"], dtype=object), allow_pickle=True)
    elif how == "step-input":
        s = rng.choice(m["steps"])
        if s["inputs"]:
            s["inputs"][0] = "nowhere"
    elif how == "step-param":
        s = rng.choice(m["steps"])
        if s["params"]:
            k = rng.choice(sorted(s["params"]))
            s["params"][k] = rng.choice([None, "x", [], 10 ** 6, -5])
        else:
            s["kind"] = "bogus"
    elif how == "output-tensor":
        m["outputs"][0]["tensor"] = "nowhere"
    if how == "manifest-json":
        mem["__manifest__.npy"] = _npy(np.frombuffer(b"{not json", np.uint8))
    else:
        mem["__manifest__.npy"] = _npy(np.frombuffer(json.dumps(m).encode(), np.uint8))
    return f"{how} {name}", _zip(mem)


def fuzz_bundles(fz: Fuzz, rng: random.Random, n: int, bundles: dict, data: bytes) -> None:
    for i in range(n):
        runtime = rng.choice(sorted(bundles))
        how, blob = _damage_bundle(bundles[runtime], rng)
        fz.case("bundle", f"{runtime}: {how}", {"b.npz": blob, "d.npz": data},
                lambda d: ["eval", d / "b.npz", "--data", f"{d / 'd.npz'}:test", "--runtime", runtime, "-q"])


def fuzz_options(fz: Fuzz, rng: random.Random, n: int, data: bytes) -> None:
    tiny = tiny_model().SerializeToString()
    for i in range(n):
        level = rng.choice(["0", "1", "1", "2", "3"])
        argv = ["@m.onnx", "-O", level]  # "@NAME": a file in the case folder; "@": the empty path
        if rng.random() < 0.8:
            argv += ["--calib", "@d.npz:calib"]
        if rng.random() < 0.5:
            argv += ["--eval", "@d.npz:eval"]
        for opt, vals in (("--target", ["npu8", "npu4", "nope", "bdcnn"]), ("--batch-size", ["0", "-1", "3", "64"]),
                          ("--max-drop", ["0.01", "nan", "-1", "inf", "0.5"]),
                          ("--flops", ["0.5", "0", "2", "nan"]), ("--finetune-epochs", ["inf", "1", "-2"]),
                          ("--planes", ["1", "4", "9"]), ("--strategy", ["auto", "bogus", "threshold"]),
                          ("--seed", ["1", "-1"]), ("--restarts", ["1", "-1"]), ("--iterations", ["2", "0"])):
            if rng.random() < 0.15:
                argv += [opt, rng.choice(vals)]
        outs = {"-o": ["out/q.onnx", "m.onnx", "d.npz", "", "out", "q.json", "sub/../m.onnx", "m.onnx/x.onnx"],
                "--report": ["out/r.json", "r.json", "d.npz", "b.json", "", "new/deep/r.json"],
                "--emit-bundle": ["out/b.npz", "b.npz", "b.json", "m.npz", ""],
                "--html": ["out/r.html", "r.json"]}
        targets = []
        for opt, vals in outs.items():
            if rng.random() < (0.7 if opt == "-o" else 0.3):
                argv += [opt, "@" + rng.choice(vals)]
                targets.append(argv[-1][1:])
                if opt == "--emit-bundle" and targets[-1]:
                    targets.append(str(Path(targets[-1]).with_suffix(".json")))
        if rng.random() < 0.2:
            argv += ["--finetune", "--train", "@d.npz:calib", "--finetune-epochs", "0.05"]
        argv.append("-q")
        files = {"m.onnx": tiny, "d.npz": data}
        if rng.random() < 0.2:  # the model in ONNX's JSON form
            argv[0] = "@m.json"
            files = {"m.json": _json_model(tiny_model()), "d.npz": data}
        if rng.random() < 0.3:  # a pre-existing output
            files["q.json"] = b"old"
            files["r.json"] = b"old"

        def mk(d, argv=argv):
            return [(str(d / a[1:]) if len(a) > 1 else "") if a.startswith("@") else a for a in argv]
        fz.case("options", " ".join(argv), files, mk, outputs=["out/q.onnx"], replaceable=targets)


def _json_model(m) -> bytes:
    from google.protobuf import json_format
    return json_format.MessageToJson(m).encode()


# ----------------------------------------------------------------------------- the tests
def _bundles(root: Path, data_path: Path) -> dict:
    m = root / "bm.onnx"
    m.write_bytes(tiny_model().SerializeToString())
    out = {}
    for runtime, extra in (("emulator", []), ("popcount", ["--target", "bdcnn", "--restarts", "1",
                                                          "--iterations", "2"])):
        b = root / f"{runtime}.npz"
        res = run_cli(m, "-O1", "--calib", f"{data_path}:calib", "--emit-bundle", b, "-q", *extra)
        assert res.rc == 0, (res.stderr, res.exc)
        out[runtime] = b.read_bytes()
    return out


def run_fuzz(root: Path, scale: int, seed: int) -> Fuzz:
    fz = Fuzz(root)
    data = _digits_small(root / "digits16.npz").read_bytes()
    tdata = _tiny_data(root / "tiny16.npz")
    bundles = _bundles(root, tdata)
    for k in range(scale):
        rng = random.Random(seed + k)
        n = FUZZ_CASES
        fuzz_model_bytes(fz, rng, n["model-bytes"], data, tdata.read_bytes())
        fuzz_model_structure(fz, rng, n["model-structure"], data)
        fuzz_data(fz, rng, n["data"], data)
        fuzz_bundles(fz, rng, n["bundle"], bundles, tdata.read_bytes())
        fuzz_options(fz, rng, n["options"], tdata.read_bytes())
    return fz


def test_fuzz_hostile_input(tmp_path, capsys):
    fz = run_fuzz(tmp_path, SCALE, SEED)
    with capsys.disabled():
        print("\n" + fz.report())
    assert not fz.failures, f"{len(fz.failures)} failing cases:\n" + "\n".join(fz.failures[:40])
    assert sum(fz.counts.values()) >= 500 * SCALE
    assert not fz.failures, f"{len(fz.failures)} failing cases:\n" + "\n".join(fz.failures[:40])
