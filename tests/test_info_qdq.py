"""`mpqc info` on a quantized (QDQ) model reports its layers at the widths insert-qdq recorded."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"


def _mpqc(*args):
    return subprocess.run([sys.executable, "-m", "mpqc", *map(str, args)], capture_output=True, text=True)


def test_info_of_qdq_model_shows_recorded_bits(tmp_path):
    out = tmp_path / "q.onnx"
    r = _mpqc(EX / "digits_resnet.onnx", "--target", "npu4", "--passes",
              "fold-constants,choose-formats{weight_bits=2,act_bits=4},insert-qdq",
              "--calib", f"{EX / 'digits.npz'}:calib", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    info = json.loads(_mpqc("info", out, "--json").stdout)
    assert len(info["layers"]) == 10
    assert {l["weight_bits"] for l in info["layers"]} == {2}
    assert {l["act_bits"] for l in info["layers"]} == {4}
    # 2-bit weights: a quarter of a byte per weight plus int32 biases
    stem = info["layers"][0]
    assert stem["weight_bytes"] == 16 * 9 * 2 / 8 + 16 * 4
