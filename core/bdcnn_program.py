"""The binary-decomposed program and its bundle: what the popcount runtime executes.

A ``BdcnnProgram`` is a flat list of ``Step``s (core/program.py) over named tensors:

* ``kind="float"``: an ONNX operator run in float (``op``, ``attrs``; constant inputs in
  ``consts``) -- pooling, activations, reshapes, and the layers that were not decomposed
  (their weights already rounded to the target's fixed-point format by the compiler);
* ``kind="binary"``: a binary-decomposed Conv (2-D) or fully connected layer (``op`` is
  ``Conv`` or ``Gemm``; ``attrs`` the Conv's strides/pads/dilations/group/auto_pad).
  ``inputs`` = [activation, bases, coefficients, coefficient fractions, bias or ""] where

  - bases: ``M+`` (the +1 entries of M) packed into uint64 words along D (bit ``j % 64`` of
    word ``j // 64``), laid out (group, k, words, O/group);
  - coefficients: the integers of ``c`` (O, k), int8 (int16 above 8 bits), with ``c =
    c_int * 2^-frac`` and ``frac`` (O,) int8 per output filter;
  - bias: float32 (O,);

  ``params`` hold the quantization sub-layer ``Q``, ``zero_point``, ``delta`` (a float32
  value), ``min`` (= -zero_point * delta), and ``k``, ``D``, ``O``, ``group``,
  ``weight_shape``, ``coef_bits``.

The bundle is an .npz of every array plus the JSON manifest under ``__manifest__`` (also
returned separately), with deterministic bytes (sorted entries, fixed dates), format
``BDCNN_FORMAT`` version ``BDCNN_VERSION``. ``load_bdcnn_bundle`` reads it back;
``is_bdcnn_bundle`` tells it from the fixed-point bundle of core/program.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import DataError, ModelError
from .program import (MANIFEST_KEY, Step, _encode, _npz_bytes, decode_steps, manifest_json, open_bundle,
                      read_bundle_constants, validate_manifest)

BDCNN_FORMAT = "mpqc-bdcnn-bundle"
BDCNN_VERSION = 1


@dataclass
class BdcnnProgram:
    name: str
    inputs: list[dict]  # {"name", "shape", "dtype"}
    outputs: list[dict]  # {"name": public name, "tensor": env name}
    consts: dict[str, np.ndarray]
    steps: list[Step]
    layers: list[dict] = field(default_factory=list)  # per-layer summary rows (k, Q, error, bytes)
    metadata: dict[str, str] = field(default_factory=dict)

    def binary_steps(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "binary"]


def bdcnn_manifest(prog: BdcnnProgram, arrays: dict) -> dict:
    consts = {}
    for i, name in enumerate(sorted(prog.consts)):
        a = np.array(prog.consts[name], order="C")  # keeps a 0-d constant 0-d (ascontiguousarray does not)
        key = f"c{i:05d}"
        arrays[key] = a
        consts[name] = {"key": key, "dtype": str(a.dtype), "shape": list(a.shape)}
    steps = []
    for i, s in enumerate(prog.steps):
        steps.append({"kind": s.kind, "op": s.op, "node": s.node, "inputs": s.inputs, "outputs": s.outputs,
                      "attrs": {k: _encode(v, arrays, f"s{i:05d}_{k}") for k, v in sorted(s.attrs.items())},
                      "params": s.params})
    binary = [s for s in prog.steps if s.kind == "binary"]
    packed = sum(int(np.asarray(prog.consts[s.inputs[1]]).nbytes + np.asarray(prog.consts[s.inputs[2]]).nbytes)
                 for s in binary)
    return {"format": BDCNN_FORMAT, "version": BDCNN_VERSION, "model": prog.name,
            "metadata": dict(sorted(prog.metadata.items())), "inputs": prog.inputs, "outputs": prog.outputs,
            "constants": consts, "steps": steps, "layers": prog.layers,
            "summary": {"steps": len(steps), "binary_layers": len(binary), "binary_weight_bytes": packed}}


def bdcnn_bundle_bytes(prog: BdcnnProgram) -> tuple[bytes, bytes]:
    """(npz bytes, manifest JSON bytes) of ``prog``; the npz alone is enough to run."""
    arrays: dict[str, np.ndarray] = {}
    m = bdcnn_manifest(prog, arrays)
    mbytes = manifest_json(m)
    arrays[MANIFEST_KEY] = np.frombuffer(mbytes, dtype=np.uint8)
    return _npz_bytes(arrays), mbytes


def is_bdcnn_bundle(path) -> bool:
    """True when ``path`` is a binary-decomposed bundle (False for other mpqc bundles)."""
    npz, m = open_bundle(path)
    npz.close()
    return m.get("format") == BDCNN_FORMAT


def load_bdcnn_bundle(path) -> BdcnnProgram:
    """The program stored in a binary-decomposed bundle .npz."""
    npz, m = open_bundle(path)
    try:
        if m.get("format") != BDCNN_FORMAT or not isinstance(m.get("version", 0), int) \
                or int(m.get("version", 0)) > BDCNN_VERSION:
            raise ModelError(f"{str(path)!r} is a bundle of format {m.get('format')!r} version {m.get('version')}; "
                             f"the popcount runtime reads {BDCNN_FORMAT} up to version {BDCNN_VERSION}",
                             hint="write one with 'mpqc MODEL.onnx -O2 --target bdcnn --emit-bundle OUT.npz'")
        validate_manifest(m, path)
        consts = read_bundle_constants(m, npz, path)
        steps = decode_steps(m, npz, path)
        for i, s in enumerate(steps):
            if s.kind == "binary" and (len(s.inputs) < 4 or any(x not in consts for x in s.inputs[1:4])):
                raise ModelError(f"bundle {str(path)!r} has a binary step {i} ({s.node!r}) whose bases or "
                                 f"coefficients are not constants",
                                 hint="the bundle is damaged or was not written by mpqc; write it again")
    finally:
        npz.close()
    return BdcnnProgram(m["model"], m["inputs"], m["outputs"], consts, steps,
                        m.get("layers", []) if isinstance(m.get("layers", []), list) else [],
                        m.get("metadata", {}) if isinstance(m.get("metadata", {}), dict) else {})
