"""The target program: what the integer accelerator (and mpqc's emulator) executes.

A ``Program`` is a flat list of integer ``Step``s, the integer constants they read
(weights, int32 biases), and the formats of every integer tensor; compiler/lowering.py
builds one from a QDQ graph and runtime/emulator.py executes it.

The target bundle (``--emit-bundle``) is a Program serialized as an .npz plus a JSON
manifest:

``bundle_bytes(graph, report)`` lowers the QDQ graph to the emulator's integer
program (runtime/emulator.py) and serializes it:

* the ``.npz`` holds every constant the program reads -- integer weights (int8;
  int4 values packed two per byte, low nibble first, when a weight tensor fits in
  [-8, 7]), int32 biases, host-side float constants -- and the manifest itself under
  the key ``__manifest__`` (UTF-8 JSON), so the .npz alone is enough to run;
* the manifest (also written as ``OUT.json``) lists inputs, outputs, constants
  (dtype, shape, packing, scale/frac per channel), the format of every integer tensor
  (scale, frac, zero point, range) and the steps in order: for each requantization
  its per-channel right shift (``shift``), saturation bounds and rounding, for each
  layer its operator, attributes and accumulation type.

Bytes are deterministic: zip entries are sorted, dated 1980-01-01 and deflated.
``load_bundle(path)`` reads a bundle back into a Program; ``read_manifest`` only the
manifest. Format version: ``BUNDLE_VERSION``.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, ModelError
from .ir import Value

@dataclass
class Step:
    """One instruction of the integer program.

    kind: float | quantize | requant | layer | clamp | add | mul | sum_pool | move |
    dequantize | raw. ``op``/``attrs``: the ONNX operator and attributes for steps that
    run a kernel (float, layer, move, sum_pool). ``params``: numbers and short lists."""
    kind: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    node: str = ""


@dataclass
class Program:
    name: str
    inputs: list[dict]  # {"name", "shape", "dtype"}
    outputs: list[dict]  # {"name": public name, "tensor": env name}
    consts: dict[str, np.ndarray]
    steps: list[Step]
    rounding: str
    tensors: dict[str, dict] = field(default_factory=dict)  # formats of integer tensors
    const_formats: dict[str, dict] = field(default_factory=dict)  # formats of integer constants
    metadata: dict[str, str] = field(default_factory=dict)

    def input_value(self) -> Value:
        """The Value (name, shape, dtype) of the first input."""
        return _input_value(self.inputs[0])


def _input_value(spec: dict) -> Value:
    return Value(spec["name"], tuple(spec["shape"]), np.dtype(spec["dtype"]))



BUNDLE_FORMAT = "mpqc-bundle"
BUNDLE_VERSION = 1
MANIFEST_KEY = "__manifest__"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _pack_int4(a: np.ndarray) -> np.ndarray:
    flat = (a.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def _unpack_int4(p: np.ndarray, shape) -> np.ndarray:
    lo = (p & 0xF).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    flat = np.empty(p.size * 2, np.int8)
    flat[0::2] = lo
    flat[1::2] = hi
    flat = np.where(flat > 7, flat - 16, flat).astype(np.int8)
    n = int(np.prod(shape, dtype=np.int64))
    return flat[:n].reshape(shape)


def _encode(v, arrays: dict, key: str):
    """JSON form of an attribute value; arrays go to the npz under ``key``."""
    if isinstance(v, np.ndarray):
        arrays[key] = v
        return {"__array__": key}
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [_encode(x, arrays, f"{key}_{i}") for i, x in enumerate(v)]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (int, float, str)) or v is None:
        return v
    raise ModelError(f"attribute value of type {type(v).__name__} cannot be stored in a bundle")


def _decode(v, npz, path=None):
    if isinstance(v, dict) and "__array__" in v:
        return read_bundle_array(npz, str(v["__array__"]), path, f"attribute array {v['__array__']!r}")
    if isinstance(v, list):
        return [_decode(x, npz, path) for x in v]
    return v


def program_manifest(prog: "Program", arrays: dict, report: dict | None = None) -> dict:
    """The manifest of ``prog``; fills ``arrays`` with the npz entries."""
    consts = {}
    dq_consts = set(prog.const_formats)
    for i, name in enumerate(sorted(prog.consts)):
        a = np.asarray(prog.consts[name])
        key = f"c{i:05d}"
        packed = None
        if name in dq_consts and a.dtype == np.int8 and a.size and int(a.min()) >= -8 and int(a.max()) <= 7:
            arrays[key] = _pack_int4(a)
            packed = "int4x2"
        else:
            arrays[key] = a
        consts[name] = {"key": key, "dtype": str(a.dtype), "shape": list(a.shape), "packed": packed,
                        "format": prog.const_formats.get(name)}
    steps = []
    for i, s in enumerate(prog.steps):
        steps.append({"kind": s.kind, "op": s.op, "node": s.node, "inputs": s.inputs, "outputs": s.outputs,
                      "attrs": {k: _encode(v, arrays, f"s{i:05d}_{k}") for k, v in sorted(s.attrs.items())},
                      "params": s.params})
    layers = []
    for l in ((report or {}).get("quantization") or {}).get("layers", []):
        layers.append({k: l.get(k) for k in ("layer", "op", "weight_bits", "act_bits", "weight_format_text",
                                               "act_format_text", "fused_activation", "weight_bytes", "macs")})
    weight_bytes = sum(int(arrays[c["key"]].nbytes) for n, c in consts.items() if n in dq_consts)
    return {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "model": prog.name, "rounding": prog.rounding,
            "metadata": dict(sorted(prog.metadata.items())), "inputs": prog.inputs, "outputs": prog.outputs,
            "constants": consts, "tensors": prog.tensors, "steps": steps, "layers": layers,
            "summary": {"steps": len(steps), "integer_constant_bytes": weight_bytes,
                        "requantizations": sum(1 for s in steps if s["kind"] == "requant"),
                        "layers": sum(1 for s in steps if s["kind"] == "layer")}}


def manifest_json(m: dict) -> bytes:
    """A manifest's deterministic JSON bytes."""
    return (json.dumps(m, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            b = io.BytesIO()
            a = np.asarray(arrays[key])  # not ascontiguousarray: it turns a 0-d array into shape (1,)
            np.lib.format.write_array(b, a if a.flags.c_contiguous else a.copy(order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, b.getvalue())
    return buf.getvalue()


def program_bundle_bytes(prog: "Program", report: dict | None = None) -> tuple[bytes, bytes]:
    """(npz bytes, manifest JSON bytes) of ``prog``; ``report``: the compile report whose
    per-layer quantization table the manifest repeats."""
    arrays: dict[str, np.ndarray] = {}
    manifest = program_manifest(prog, arrays, report)
    mbytes = manifest_json(manifest)
    arrays[MANIFEST_KEY] = np.frombuffer(mbytes, dtype=np.uint8)
    return _npz_bytes(arrays), mbytes


def free_lists(steps, consts, outputs) -> list[list[str]]:
    """Per step, the tensors no later step reads (program outputs and constants excluded): what a
    runtime may drop after that step to free memory early."""
    last: dict[str, int] = {}
    for i, s in enumerate(steps):
        for x in s.inputs:
            if x and x not in consts:
                last[x] = i
    keep = {o["tensor"] for o in outputs}
    return [[x for x in dict.fromkeys(s.inputs) if x and last.get(x) == i and x not in keep]
            for i, s in enumerate(steps)]


def bundle_input_value(path) -> Value:
    """The input Value (name, shape, dtype) a bundle (of any mpqc bundle format) expects, read
    from its manifest."""
    npz, m = open_bundle(path)
    npz.close()
    return _input_value(m["inputs"][0])


def _bundle_error(path, what: str) -> ModelError:
    return ModelError(f"bundle {str(path)!r} {what}",
                      hint="the bundle is damaged or was not written by mpqc; write it again with --emit-bundle")


def read_bundle_array(npz, key: str, path, what: str | None = None) -> np.ndarray:
    """One numeric array of an open bundle npz; a damaged member is a one-line ModelError."""
    what = what or f"array {key!r}"
    if key not in npz.files:
        raise _bundle_error(path, f"lacks the {what}")
    try:
        a = npz[key]
    except Exception as e:  # BadZipFile (CRC), zlib.error, ValueError (object arrays, bad header), EOFError
        msg = str(e).splitlines()[0][:100] if str(e) else ""
        if "allow_pickle" in msg or "pickle" in msg:
            raise _bundle_error(path, f"{what} holds Python objects; bundles hold numeric arrays only "
                                      f"(mpqc never unpickles)") from None
        raise _bundle_error(path, f"{what} is corrupt ({type(e).__name__}: {msg})") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
        raise _bundle_error(path, f"{what} has dtype {getattr(a, 'dtype', type(a).__name__)}, expected a "
                                  f"numeric array")
    return np.array(a)


def _is_shape(v) -> bool:
    return isinstance(v, list) and all((isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 31)
                                       or d is None or isinstance(d, str) for d in v)


def _is_dtype(v) -> bool:
    try:
        return isinstance(v, str) and np.dtype(v).kind in "biuf"
    except TypeError:
        return False


def validate_manifest(m, path, *, required=("model", "inputs", "outputs", "constants", "steps")) -> dict:
    """Check the schema of a bundle manifest: inputs, outputs, constants and steps, and that every
    tensor a step reads exists; returns ``m``. Every problem is a one-line ModelError."""
    if not isinstance(m, dict):
        raise _bundle_error(path, f"has a manifest that is a JSON {type(m).__name__}, expected an object")
    for key in required:
        if key not in m:
            raise _bundle_error(path, f"has a manifest without {key!r}")
    if "model" in m and not isinstance(m["model"], str):
        raise _bundle_error(path, "has a manifest whose 'model' is not a string")
    ins = m.get("inputs", [{"name": "", "shape": [], "dtype": "float32"}])
    if not isinstance(ins, list) or not ins:
        raise _bundle_error(path, "has a manifest whose 'inputs' is not a non-empty list")
    for i, spec in enumerate(ins):
        if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and _is_shape(spec.get("shape"))
                and _is_dtype(spec.get("dtype"))):
            raise _bundle_error(path, f"has a manifest whose input {i} is not {{name, shape, dtype}}")
    consts = m.get("constants", {})
    if not isinstance(consts, dict):
        raise _bundle_error(path, "has a manifest whose 'constants' is not an object")
    for name, c in consts.items():
        if not (isinstance(c, dict) and isinstance(c.get("key"), str) and _is_dtype(c.get("dtype"))
                and _is_shape(c.get("shape")) and all(isinstance(d, int) for d in c["shape"])):
            raise _bundle_error(path, f"has a manifest whose constant {name!r} is not {{key, dtype, shape}}")
        if c.get("packed") not in (None, "int4x2"):
            raise _bundle_error(path, f"has a manifest whose constant {name!r} has unknown packing {c['packed']!r}")
    if "steps" not in m or "constants" not in m:
        return m
    steps = m["steps"]
    if not isinstance(steps, list):
        raise _bundle_error(path, "has a manifest whose 'steps' is not a list")
    known = {spec["name"] for spec in ins} | set(consts)
    for i, st in enumerate(steps):
        ok = (isinstance(st, dict) and isinstance(st.get("kind"), str) and isinstance(st.get("op"), str)
              and isinstance(st.get("inputs"), list) and isinstance(st.get("outputs"), list)
              and all(isinstance(x, str) for x in st["inputs"] + st["outputs"])
              and isinstance(st.get("attrs", {}), dict) and isinstance(st.get("params", {}), dict))
        if not ok:
            raise _bundle_error(path, f"has a manifest whose step {i} is not {{kind, op, inputs, outputs, "
                                      f"attrs, params}}")
        for x in st["inputs"]:
            if x and x not in known:
                raise _bundle_error(path, f"has a manifest whose step {i} ({st['kind']} {st.get('node', '')!r}) "
                                          f"reads tensor {x!r}, which no input, constant or earlier step gives")
        known.update(st["outputs"])
    if "outputs" not in m:
        return m
    outs = m["outputs"]
    if not isinstance(outs, list) or not outs:
        raise _bundle_error(path, "has a manifest whose 'outputs' is not a non-empty list")
    for i, o in enumerate(outs):
        if not (isinstance(o, dict) and isinstance(o.get("name"), str) and isinstance(o.get("tensor"), str)):
            raise _bundle_error(path, f"has a manifest whose output {i} is not {{name, tensor}}")
        if o["tensor"] not in known:
            raise _bundle_error(path, f"has a manifest whose output {o['name']!r} names tensor {o['tensor']!r}, "
                                      f"which no step gives")
    return m


def read_bundle_constants(m: dict, npz, path) -> dict[str, np.ndarray]:
    """The constants of a validated manifest, each checked against its recorded dtype and shape."""
    consts = {}
    for name, c in m["constants"].items():
        a = read_bundle_array(npz, c["key"], path, f"array of constant {name!r}")
        shape = tuple(c["shape"])
        n = int(np.prod(shape, dtype=np.int64))
        if c.get("packed") == "int4x2":
            if a.dtype != np.uint8 or a.ndim != 1 or a.size != (n + 1) // 2:
                raise _bundle_error(path, f"constant {name!r}: packed array has shape {list(a.shape)} "
                                          f"({a.dtype}), expected {(n + 1) // 2} uint8 bytes for shape {list(shape)}")
            a = _unpack_int4(a, shape)
        elif a.shape != shape or str(a.dtype) != str(np.dtype(c["dtype"])):
            raise _bundle_error(path, f"constant {name!r} has shape {list(a.shape)} ({a.dtype}) but the manifest "
                                      f"says shape {list(shape)} ({c['dtype']})")
        consts[name] = a
    return consts


def open_bundle(path) -> tuple[Any, dict]:
    """(the open npz, its manifest) of an mpqc bundle of any format; the caller closes the npz."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"bundle {str(p)!r} does not exist")
    if p.is_dir():
        raise ModelError(f"bundle path {str(p)!r} is a directory, expected an .npz bundle")
    if not zipfile.is_zipfile(p):
        raise ModelError(f"{str(p)!r} is not a readable .npz bundle: it is not a zip archive (empty, truncated "
                         f"or another format)", hint="write one with 'mpqc MODEL.onnx -O1 --emit-bundle OUT.npz'")
    try:  # from memory: a failing np.load on a path leaks its open file
        npz = np.load(io.BytesIO(p.read_bytes()), allow_pickle=False)
    except Exception as e:
        raise ModelError(f"{str(p)!r} is not a readable .npz bundle ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile) or MANIFEST_KEY not in npz.files:
        if isinstance(npz, np.lib.npyio.NpzFile):
            npz.close()
        raise ModelError(f"{str(p)!r} is not an mpqc bundle (no {MANIFEST_KEY} entry)",
                         hint="write one with 'mpqc MODEL.onnx -O1 --emit-bundle OUT.npz'")
    try:
        raw = read_bundle_array(npz, MANIFEST_KEY, p, "manifest")
        m = json.loads(raw.tobytes().decode("utf-8"))
    except ModelError:
        npz.close()
        raise
    except Exception as e:
        npz.close()
        raise ModelError(f"{str(p)!r}: its manifest is not valid JSON ({str(e)[:80]})") from None
    try:
        validate_manifest(m, p, required=("inputs",))
    except ModelError:
        npz.close()
        raise
    return npz, m


def decode_steps(m: dict, npz, path=None) -> list[Step]:
    """The steps of a bundle's manifest, their array attributes read from ``npz``."""
    return [Step(s["kind"], s["op"], list(s["inputs"]), list(s["outputs"]),
                 {k: _decode(v, npz, path) for k, v in s.get("attrs", {}).items()}, dict(s.get("params", {})),
                 str(s.get("node", "")))
            for s in m["steps"]]


def _open(path):
    npz, m = open_bundle(path)
    if m.get("format") != BUNDLE_FORMAT or not isinstance(m.get("version", 0), int) \
            or int(m.get("version", 0)) > BUNDLE_VERSION:
        npz.close()
        raise ModelError(f"{str(path)!r} is a bundle of format {m.get('format')!r} version {m.get('version')}; "
                         f"this mpqc reads {BUNDLE_FORMAT} up to version {BUNDLE_VERSION}")
    return npz, m


def read_manifest(path) -> dict:
    npz, m = _open(path)
    npz.close()
    return m


def load_bundle(path) -> "Program":
    """The Program stored in a bundle .npz."""
    npz, m = _open(path)
    try:
        validate_manifest(m, path, required=("model", "inputs", "outputs", "constants", "steps", "rounding"))
        if not isinstance(m["rounding"], str) or not isinstance(m.get("tensors", {}), dict) \
                or not isinstance(m.get("metadata", {}), dict):
            raise _bundle_error(path, "has a manifest whose 'rounding', 'tensors' or 'metadata' is malformed")
        consts = read_bundle_constants(m, npz, path)
        steps = decode_steps(m, npz, path)
    finally:
        npz.close()
    return Program(m["model"], m["inputs"], m["outputs"], consts, steps, m["rounding"], m.get("tensors", {}),
                   {n: c["format"] for n, c in m["constants"].items() if c.get("format")}, m.get("metadata", {}))
