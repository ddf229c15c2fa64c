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


def _decode(v, npz):
    if isinstance(v, dict) and "__array__" in v:
        return np.array(npz[v["__array__"]])
    if isinstance(v, list):
        return [_decode(x, npz) for x in v]
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
            np.lib.format.write_array(b, np.ascontiguousarray(arrays[key]), allow_pickle=False)
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


def bundle_input_value(path) -> Value:
    """The input Value (name, shape, dtype) a bundle (of any mpqc bundle format) expects, read
    from its manifest."""
    npz, m = open_bundle(path)
    npz.close()
    return _input_value(m["inputs"][0])


def open_bundle(path) -> tuple[Any, dict]:
    """(the open npz, its manifest) of an mpqc bundle of any format; the caller closes the npz."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"bundle {str(p)!r} does not exist")
    try:
        npz = np.load(p, allow_pickle=False)
    except Exception as e:
        raise ModelError(f"{str(p)!r} is not a readable .npz bundle ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile) or MANIFEST_KEY not in npz.files:
        raise ModelError(f"{str(p)!r} is not an mpqc bundle (no {MANIFEST_KEY} entry)",
                         hint="write one with 'mpqc MODEL.onnx -O1 --emit-bundle OUT.npz'")
    try:
        m = json.loads(bytes(npz[MANIFEST_KEY]).decode("utf-8"))
    except Exception as e:
        raise ModelError(f"{str(p)!r}: its manifest is not valid JSON ({str(e)[:80]})") from None
    return npz, m


def decode_steps(m: dict, npz) -> list[Step]:
    """The steps of a bundle's manifest, their array attributes read from ``npz``."""
    return [Step(s["kind"], s["op"], list(s["inputs"]), list(s["outputs"]),
                 {k: _decode(v, npz) for k, v in s["attrs"].items()}, dict(s["params"]), s.get("node", ""))
            for s in m["steps"]]


def _open(path):
    npz, m = open_bundle(path)
    if m.get("format") != BUNDLE_FORMAT or int(m.get("version", 0)) > BUNDLE_VERSION:
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
        consts = {}
        for name, c in m["constants"].items():
            if c["key"] not in npz.files:
                raise DataError(f"bundle {str(path)!r} lacks the array of constant {name!r}")
            a = np.array(npz[c["key"]])
            if c.get("packed") == "int4x2":
                a = _unpack_int4(a, tuple(c["shape"]))
            consts[name] = a
        steps = decode_steps(m, npz)
    finally:
        npz.close()
    return Program(m["model"], m["inputs"], m["outputs"], consts, steps, m["rounding"], m.get("tensors", {}),
                   {n: c["format"] for n, c in m["constants"].items() if c.get("format")}, m.get("metadata", {}))
