"""Target profiles: what a chip executes, as data (not code branches).

A ``Target`` lists allowed weight and activation widths (highest first: the first
is the default for ``-O1``), the scale kind, whether weights may be per channel,
the accumulator width, the ops it runs, and a cost model: weight bytes at the
chosen widths and MACs weighted by ``mac_cost[(w_bits, a_bits)]``.
``levels`` gives the reduction ladder that mixed-precision searches walk
(npu8: w8a16 -> w8a8 -> w4a8).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.errors import OptionError


@dataclass(frozen=True)
class Target:
    """An integer accelerator's profile: what the compiler may emit for it (data, not code).

    ``weight_bits``/``act_bits``: the widths its kernels support; ``scale``: power-of-two
    (``pow2``, Qm.n formats) or float scales; ``rounding`` of requantization shifts;
    ``per_channel`` weight formats; ``accumulator_bits``; ``min_bits``: the lowest width a
    search may reach; ``binary_decomposed``: weights as binary bases (popcount hardware);
    ``ops``: the operators it runs; ``default_bits`` (``-O1``) and ``ladder`` (the widths the
    ``-O2`` search walks, highest first). ``mpqc targets`` lists the built-in ones;
    ``get_target(name)`` returns one."""

    name: str
    description: str
    weight_bits: tuple[int, ...]
    act_bits: tuple[int, ...]
    scale: str = "pow2"  # "pow2" or "float"
    #: rounding of every requantization shift: "half-even" (ties to the even neighbour: what ONNX
    #: QuantizeLinear and onnxruntime compute, so the exported QDQ model is exact) or "half-up"
    #: ((acc + 2^(k-1)) >> k; ONNX cannot express it, see docs/FIXED_POINT.md)
    rounding: str = "half-even"
    per_channel: bool = True
    accumulator_bits: int = 32
    min_bits: int = 2  # b_m: lowest width a search may reach
    binary_decomposed: bool = False
    ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool", "AveragePool",
                            "GlobalAveragePool", "Flatten", "Reshape", "Concat", "Transpose", "Pad",
                            "Mul", "Sub", "Div", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish",
                            "Softmax", "Sum", "LRN")
    mac_cost_per_bit: float = 1.0  # MAC cost proportional to w_bits * a_bits / 64
    #: (weight bits, activation bits) of every layer at -O1
    default_bits: tuple[int, int] = (8, 8)
    #: reduction ladder walked by mixed-precision searches, highest first: a layer at
    #: ladder[i] is "reduced" to ladder[i + 1]; -O2 starts every layer at ladder[0]
    ladder: tuple[tuple[int, int], ...] = ((8, 8), (4, 8))

    @property
    def default_weight_bits(self) -> int:
        return self.default_bits[0]

    @property
    def default_act_bits(self) -> int:
        return self.default_bits[1]

    def ladder_index(self, bits: tuple[int, int]) -> int:
        try:
            return self.ladder.index(tuple(bits))
        except ValueError:
            raise OptionError(f"bit widths w{bits[0]}/a{bits[1]} are not on target {self.name}'s ladder "
                              f"{self.ladder_text()}") from None

    def ladder_text(self) -> str:
        return " -> ".join(f"w{w}a{a}" for w, a in self.ladder)

    def lower_weight_bits(self, bits: int) -> int | None:
        """The next allowed weight width below ``bits`` (None at the bottom)."""
        lower = sorted(b for b in self.weight_bits if b < bits and b >= self.min_bits)
        return lower[-1] if lower else None

    def lower_act_bits(self, bits: int) -> int | None:
        lower = sorted(b for b in self.act_bits if b < bits and b >= self.min_bits)
        return lower[-1] if lower else None

    def mac_cost(self, w_bits: int, a_bits: int) -> float:
        return self.mac_cost_per_bit * w_bits * a_bits / 64.0

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "weight_bits": list(self.weight_bits),
                "act_bits": list(self.act_bits), "scale": self.scale, "rounding": self.rounding,
                "per_channel": self.per_channel,
                "accumulator_bits": self.accumulator_bits, "min_bits": self.min_bits,
                "binary_decomposed": self.binary_decomposed, "default_bits": list(self.default_bits),
                "ladder": [list(x) for x in self.ladder]}


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("npu8", "8-bit NPU: weights 8/4 bit, activations 16/8 bit, power-of-two scales, int32 accumulators",
           weight_bits=(8, 4), act_bits=(16, 8), min_bits=4, default_bits=(8, 8),
           ladder=((8, 16), (8, 8), (4, 8))),
    Target("npu4", "low-bit NPU: weights 8/4/2 bit, activations 8/4 bit, power-of-two scales",
           weight_bits=(8, 4, 2), act_bits=(8, 4), min_bits=2, default_bits=(8, 8),
           ladder=((8, 8), (4, 8), (4, 4), (2, 4))),
    Target("bdcnn", "binary-decomposed weights (k bases), activations as Q bit-planes (Q in 2..8), popcount",
           weight_bits=(8,), act_bits=(8, 7, 6, 5, 4, 3, 2), min_bits=2, binary_decomposed=True,
           default_bits=(8, 8), ladder=tuple((8, q) for q in range(8, 1, -1))),
    Target("ort-int8", "onnxruntime CPU int8 path: float scales, symmetric int8 weights, asymmetric uint8 "
           "activations (min/max), round half to even",
           weight_bits=(8,), act_bits=(8,), scale="float", rounding="half-even", min_bits=8,
           default_bits=(8, 8),
           ladder=((8, 8),)),
]}


def get_target(name: str) -> Target:
    t = TARGETS.get(name)
    if t is None:
        raise OptionError(f"unknown --target {name!r}; choose one of {', '.join(TARGETS)} (see 'mpqc targets')")
    return t
