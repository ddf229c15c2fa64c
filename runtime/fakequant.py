"""Fake-quantized execution: the float runtime with quantization points rounded.

Numeric modes are injected into the ``Executor`` as node functions; this module
provides the fake-quantizing ones:

* ``fake_quant_node_fn(in_formats, out_formats, params, rounding)``: rounds the given
  input and output values to their formats and substitutes quantized constants. The
  compiler's ``QuantSim`` (``compiler/quantsim.py``) builds one per bit assignment:
  NN_S of the influence method, and what the searches evaluate.
* ``ir_node_fn(graph)``: fake-quantizes by the IR's own annotations (``node.qconfig``,
  ``value.qformat``), for graphs after choose-formats.

``fake_quant_act`` rounds activations with the target's rounding of requantization
shifts (half to even on the npu targets), so the simulated network equals, bit for bit,
what the integer emulator (``runtime/emulator.py``) computes.
"""
from __future__ import annotations

import numpy as np

from ..core.ir import Graph, Node
from ..core.qformat import QFormat, fake_quant
from .executor import float_node_fn


def fake_quant_act(x: np.ndarray, fmt: QFormat, rounding: str = "half-up") -> np.ndarray:
    """``fake_quant`` of an activation with the target's rounding of requantization shifts: the
    emulator (and onnxruntime) round ties to even on the npu targets, so the simulated network is
    the deployed one bit for bit."""
    if rounding != "half-even" or fmt.fscale is not None or fmt.bits > 16:
        return fake_quant(x, fmt)
    lo, hi = fmt.qmin, fmt.qmax
    f = fmt.frac_array()
    if fmt.axis is not None:
        shp = [1] * np.ndim(x)
        shp[fmt.axis % np.ndim(x)] = -1
        f = f.reshape(shp)
    s = np.ldexp(np.float32(1.0), f).astype(np.float32)
    q = np.rint(np.asarray(x, np.float32) * s)
    np.clip(q, lo, hi, out=q)
    np.divide(q, s, out=q)  # float32 throughout: no copy
    return q


def fake_quant_node_fn(in_formats: dict, out_formats: dict, params=None, rounding: str = "half-up",
                       base_fn=float_node_fn):
    """A node function for the ``Executor`` that fake-quantizes around ``base_fn`` (the float kernels):

    * every input value in ``in_formats`` (``{Value: QFormat}``) is rounded to its format when read;
    * ``params(node)`` (optional) gives ``{input index: array}`` replacing the node's constant inputs
      (quantized weights and biases; an index past the node's inputs appends it, e.g. a new bias);
    * every output value in ``out_formats`` is rounded to its format after the node runs.

    Activations round with ``rounding`` (the target's rounding of requantization shifts, see
    ``fake_quant_act``). The caller decides the formats (``compiler/quantsim.py`` derives them
    from a bit assignment); this module only applies them."""
    get_params = params or (lambda node: None)

    def fn(node: Node, args: list):
        args = list(args)
        for i, v in enumerate(node.inputs):
            f = in_formats.get(v) if v is not None else None
            if f is not None:
                args[i] = fake_quant_act(args[i], f, rounding)
        p = get_params(node)
        if p:
            for i, a in sorted(p.items()):
                if i < len(args):
                    args[i] = a
                else:
                    args = args + [None] * (i - len(args)) + [a]
        outs = base_fn(node, args)
        return tuple(fake_quant_act(a, out_formats[v], rounding) if v in out_formats else a
                     for v, a in zip(node.outputs, outs))

    return fn


def ir_node_fn(graph: Graph, rounding: str = "half-up"):
    """Node function that fake-quantizes according to the IR's own annotations
    (``node.qconfig`` formats and ``value.qformat``), for graphs after choose-formats; activations
    round with ``rounding`` (see ``fake_quant_act``), weights and biases half up as the exporter does."""
    layer_fmt = {id(n): n.qconfig for n in graph.layers() if n.qconfig is not None}
    wcache: dict[int, np.ndarray] = {}

    def fn(node: Node, args: list):
        args = list(args)
        for i, v in enumerate(node.inputs):
            if v is not None and not v.is_const and v.qformat is not None:
                # rounding an on-grid value is exact, so reading inputs through their format is safe
                args[i] = fake_quant_act(args[i], v.qformat, rounding)
        q = layer_fmt.get(id(node))
        if q is not None and q.weight_format is not None:
            w = wcache.get(id(node))
            if w is None:
                w = wcache[id(node)] = fake_quant(node.weight.const, q.weight_format)
            args[1] = w
            if q.bias_format is not None and len(args) > 2 and args[2] is not None:
                args[2] = fake_quant(node.bias.const, q.bias_format)
        outs = float_node_fn(node, args)
        return tuple(fake_quant_act(a, v.qformat, rounding) if v.qformat is not None else a
                     for v, a in zip(node.outputs, outs))

    return fn
