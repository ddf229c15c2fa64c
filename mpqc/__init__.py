"""mpqc: mixed-precision quantization and pruning compiler for ONNX CNNs.

Python API (mirrors the CLI)::

    import mpqc
    g = mpqc.load("model.onnx")              # canonicalized IR Graph (-O0)
    res = mpqc.compile("model.onnx", level=2, target="npu8", calib="data.npz:calib",
                       eval="data.npz:eval", options={"max_drop": 0.01}, output="q.onnx")
    res.graph, res.report
    y = mpqc.run(g, x)                       # float runtime

Importing ``mpqc`` loads only the core (IR and errors); the compiler, onnx and numba load on
the first call that needs them, so ``mpqc --help`` answers at once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mpqc.core.errors import (CompilerError, DataError, ModelError, OptionError, PassError, TargetError,
                              UnsupportedOpError, VerifyError)
from mpqc.core.ir import Graph, Node, Value

if TYPE_CHECKING:
    from mpqc.compiler.driver import CompileResult, Diagnostics, Outputs
    from mpqc.compiler.options import CompileOptions

__version__ = "0.1.0"

#: names loaded on first use (start-up: the compiler pulls in onnx, onnxruntime and numba)
_LAZY = {"CompileResult": "mpqc.compiler.driver", "Outputs": "mpqc.compiler.driver",
         "Diagnostics": "mpqc.compiler.driver", "CompileOptions": "mpqc.compiler.options"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'mpqc' has no attribute {name!r}")
    import importlib  # start-up: see _LAZY
    return getattr(importlib.import_module(mod), name)


def load(path, *, canonicalize: bool = True, input_shape=()) -> Graph:
    """Import an ONNX model; with ``canonicalize`` (default) run the -O0 pipeline on it.
    ``input_shape``: ``--input-shape`` specs (``["x:1x3x48x192"]``) or ``{"x": (1, 3, 48, 192)}``
    fixing symbolic input dims before folding (docs/DYNAMIC_SHAPES.md)."""
    from mpqc.compiler.frontend import load_graph  # start-up: see _LAZY
    from mpqc.compiler.options import CompileOptions  # start-up
    from mpqc.compiler.passes import PassContext, PassManager  # start-up
    from mpqc.compiler.pipelines import build_pipeline  # start-up
    g = load_graph(path, input_shapes=CompileOptions.from_dict({"input_shape": input_shape}).input_shapes)
    if canonicalize:
        PassManager(build_pipeline(0)).run(g, PassContext())
    return g


def compile(model, *, output=None, report=None, html=None, bundle=None, verify_each: bool = False,
            print_after=(), time_passes: bool = False, **kwargs) -> "CompileResult":  # noqa: A001 - the CLI verb
    """Compile a model, as the ``mpqc`` command does.

    ``output``/``report``/``html``/``bundle``: files to write (``-o``, ``--report``, ``--html``,
    ``--emit-bundle``); ``verify_each``/``print_after``/``time_passes``: diagnostics; every other
    keyword is ``compiler.driver.compile_model``'s (``level``, ``target``, ``calib``, ``eval``,
    ``train``, ``metric``, ``passes``, ``options`` -- a ``CompileOptions`` or a dict of its fields
    such as ``{"max_drop": 0.01}`` or ``{"input_shape": {"x": (1, 3, 48, 192)}}`` --, ``seed``, ``quiet``, ``batch_size``, ``cache`` -- a folder
    for the result cache, True for the CLI's default one; none by default; docs/BUILD.md)."""
    from mpqc.compiler.driver import Diagnostics, Outputs, compile_model  # start-up: see _LAZY
    return compile_model(model, outputs=Outputs(output, report, html, bundle),
                         diagnostics=Diagnostics(verify_each, frozenset(print_after), time_passes), **kwargs)


def run(graph: Graph, x, *, batch_size: int = 64):
    """Float-runtime outputs of ``graph`` on ``x`` (first output)."""
    from mpqc.runtime.executor import run_batched  # start-up: see _LAZY
    return run_batched(graph, x, batch_size=batch_size)[0]


def save(graph: Graph, path) -> None:
    """Export ``graph`` to ONNX (atomically)."""
    from mpqc.compiler.export import save_onnx  # start-up: see _LAZY
    save_onnx(graph, path)


__all__ = ["load", "compile", "run", "save", "Graph", "Node", "Value", "CompileResult", "CompileOptions",
           "Outputs", "Diagnostics", "CompilerError", "DataError", "ModelError", "OptionError", "PassError",
           "TargetError", "UnsupportedOpError", "VerifyError", "__version__"]
