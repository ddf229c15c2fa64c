"""The target bundle's npz codec keeps every constant's shape (a 0-d constant stays 0-d)."""
from __future__ import annotations

import io
import json

import numpy as np

from mpqc.core.program import MANIFEST_KEY, Program, program_bundle_bytes, read_bundle_constants


def test_zero_d_and_strided_constants_round_trip():
    # EfficientNet-Lite0's host preprocessing has scalar constants: np.ascontiguousarray made them (1,)
    consts = {"scalar": np.array(0.498, np.float32), "row": np.arange(6, dtype=np.float32).reshape(2, 3).T,
              "w": np.array([[1, -2], [3, 4]], np.int8)}
    prog = Program(name="t", inputs=[{"name": "x", "shape": [1], "dtype": "float32"}],
                   outputs=[{"name": "x", "tensor": "x"}], consts=consts, steps=[], rounding="half-even")
    data, _ = program_bundle_bytes(prog)
    npz = np.load(io.BytesIO(data), allow_pickle=False)
    m = json.loads(bytes(npz[MANIFEST_KEY]).decode())
    back = read_bundle_constants(m, npz, "t.npz")
    assert back["scalar"].shape == () and back["scalar"] == np.float32(0.498)
    np.testing.assert_array_equal(back["row"], consts["row"])
    np.testing.assert_array_equal(back["w"], consts["w"])
