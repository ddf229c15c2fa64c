"""Target bundle of a quantized graph: its integer program, serialized (format: core/program.py)."""
from __future__ import annotations

from ..core.ir import Graph
from ..core.program import program_bundle_bytes
from .lowering import load_program


def bundle_bytes(graph: Graph, report: dict | None = None) -> tuple[bytes, bytes]:
    """(npz bytes, manifest JSON bytes) of the quantized ``graph``."""
    return program_bundle_bytes(load_program(graph), report)
