"""mpqc: mixed-precision quantization and pruning compiler for ONNX CNNs.

Python API (mirrors the CLI)::

    import mpqc
    g = mpqc.load("model.onnx")              # canonicalized IR Graph (-O0)
    res = mpqc.compile("model.onnx", level=2, target="npu8",
                       calib="data.npz:calib", eval="data.npz:eval", output="q.onnx")
    res.graph, res.report
    y = mpqc.run(g, x)                       # float runtime
"""
from __future__ import annotations

__version__ = "0.1.0"

from mpqc.compiler.driver import CompileResult, Diagnostics, Outputs, compile_model
from mpqc.compiler.options import CompileOptions
from mpqc.core.errors import (CompilerError, DataError, ModelError, OptionError, PassError,
                                  TargetError, UnsupportedOpError, VerifyError)
from mpqc.core.ir import Graph, Node, Value


def load(path, *, canonicalize: bool = True) -> Graph:
    """Import an ONNX model; with ``canonicalize`` (default) run the -O0 pipeline on it."""
    from mpqc.compiler.frontend import load_graph
    from mpqc.compiler.passes import PassContext, PassManager
    from mpqc.compiler.pipelines import build_pipeline
    g = load_graph(path)
    if canonicalize:
        PassManager(build_pipeline(0)).run(g, PassContext())
    return g


def compile(model, *, output=None, report=None, html=None, bundle=None, verify_each: bool = False,
            print_after=(), time_passes: bool = False, **kwargs) -> CompileResult:  # noqa: A001 - the CLI verb
    """Compile a model, as the ``mpqc`` command does.

    ``output``/``report``/``html``/``bundle``: files to write (``-o``, ``--report``, ``--html``,
    ``--emit-bundle``); ``verify_each``/``print_after``/``time_passes``: diagnostics; every other
    keyword is ``compiler.driver.compile_model``'s (``level``, ``target``, ``calib``, ``eval``,
    ``train``, ``metric``, ``passes``, ``options`` -- a ``CompileOptions`` or a dict of its fields
    such as ``{"max_drop": 0.01}`` --, ``seed``, ``quiet``, ``batch_size``)."""
    return compile_model(model, outputs=Outputs(output, report, html, bundle),
                         diagnostics=Diagnostics(verify_each, frozenset(print_after), time_passes), **kwargs)


def run(graph: Graph, x, *, batch_size: int = 64):
    """Float-runtime outputs of ``graph`` on ``x`` (first output)."""
    from mpqc.runtime.executor import run_batched
    return run_batched(graph, x, batch_size=batch_size)[0]


def save(graph: Graph, path) -> None:
    """Export ``graph`` to ONNX (atomically)."""
    from mpqc.compiler.export import save_onnx
    save_onnx(graph, path)


__all__ = ["load", "compile", "run", "save", "Graph", "Node", "Value", "CompileResult", "CompileOptions",
           "Outputs", "Diagnostics", "CompilerError",
           "DataError", "ModelError", "OptionError", "PassError", "TargetError", "UnsupportedOpError",
           "VerifyError", "__version__"]
