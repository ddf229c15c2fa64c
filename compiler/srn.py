"""SRN: serialize residual blocks so that their channels can be pruned.

From Kamma & Wada's serialized residual network (summarized with "REAP: A method for
pruning convolutional neural networks with performance preservation", IEICE Trans.
Inf. & Syst. E104-D(1), 2021, whose channel pruning cannot touch the layers joined by a
residual Add): a block ``y = [relu](conv2(relu(conv1(x))) + sc(x))`` with ``x >= 0`` (a
previous ReLU's output), after BatchNorm folding, equals a plain two-layer chain:

* layer A = conv1 with ``C_in`` extra output channels, each a Dirac kernel (1 at the tap
  of input channel i that lines up with the shortcut, bias 0, conv1's stride); the ReLU
  passes them unchanged because ``x >= 0``;
* layer B = conv2 with ``C_in`` extra input channels carrying the shortcut: a Dirac from
  extra channel i to output i (identity shortcut) or the folded 1x1 projection kernel at
  the aligned tap (projection shortcut, strided like conv1), its bias added to conv2's.

The Add (and the projection conv) disappear; the MACs roughly double until channel
pruning (``compiler.channel_prune``) removes the carried channels it does not need.
A block whose ``x`` may be negative is refused with a one-line error naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mpqc.core.errors import CompilerError
from mpqc.core.ir import Graph, Node, Value
from mpqc.runtime.ops import conv_params

__all__ = ["ResidualBlock", "SrnReport", "find_residual_blocks", "is_nonnegative", "serialize_block",
           "serialize_residual"]


@dataclass
class ResidualBlock:
    """``add(conv2(relu1(conv1(x))), shortcut(x))``; ``shortcut`` is None for the identity."""

    add: Node
    conv1: Node
    relu1: Node
    conv2: Node
    shortcut: Node | None
    x: Value

    @property
    def name(self) -> str:
        return self.add.name


@dataclass
class SrnReport:
    """Which residual blocks were serialized (Add node names) and which were refused, and why."""

    serialized: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def _single_use(graph: Graph, v: Value) -> bool:
    return len(v.uses) == 1 and not any(o is v for o in graph.outputs)


def _plain_conv(n: Node | None) -> bool:
    return (n is not None and n.op_type == "Conv" and n.is_layer and int(n.attr("group", 1)) == 1
            and n.weight.const.ndim == 4 and (len(n.inputs) < 3 or n.inputs[2] is None or n.inputs[2].is_const))


def _match(graph: Graph, add: Node, bi: int) -> ResidualBlock | None:
    branch, other = add.inputs[bi], add.inputs[1 - bi]
    conv2 = branch.producer
    if not _plain_conv(conv2) or not _single_use(graph, branch):
        return None
    h = conv2.inputs[0]
    relu1 = h.producer
    if relu1 is None or relu1.op_type != "Relu" or not _single_use(graph, h):
        return None
    m = relu1.inputs[0]
    conv1 = m.producer
    if not _plain_conv(conv1) or not _single_use(graph, m):
        return None
    x = conv1.inputs[0]
    if other is x:
        return ResidualBlock(add, conv1, relu1, conv2, None, x)
    sc = other.producer
    if (_plain_conv(sc) and sc.inputs[0] is x and tuple(sc.weight.const.shape[2:]) == (1, 1)
            and _single_use(graph, other)):
        return ResidualBlock(add, conv1, relu1, conv2, sc, x)
    return None


def find_residual_blocks(graph: Graph) -> list[ResidualBlock]:
    """Residual blocks ``Add(conv2(Relu(conv1 x)), x or conv1x1(x))`` of ``graph`` (BN already folded),
    in graph order; the intermediate tensors must have no other reader."""
    out = []
    for n in graph.nodes:
        if n.op_type != "Add" or len(n.inputs) != 2 or any(v is None or v.is_const for v in n.inputs):
            continue
        blk = _match(graph, n, 0) or _match(graph, n, 1)
        if blk is not None:
            out.append(blk)
    return out


def is_nonnegative(v: Value, _depth: int = 0) -> bool:
    """Whether ``v`` is provably >= 0 (a ReLU's output, possibly through pooling and the like)."""
    if _depth > 64:
        return False
    if v.is_const:
        return bool(np.all(v.const >= 0))
    p = v.producer
    if p is None:
        return False
    op = p.op_type
    if op in ("Relu", "Sigmoid", "Softmax", "Abs", "Exp"):
        return True
    if op == "Clip":
        lo = p.input(1)
        if lo is not None and lo.is_const:
            return bool(np.all(lo.const >= 0))
        return p.attr("min") is not None and float(p.attr("min")) >= 0
    if op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Identity", "Dropout", "Flatten",
              "Reshape"):
        return is_nonnegative(p.inputs[0], _depth + 1)
    if op in ("Concat", "Max", "Add", "Mul", "Sum"):
        return all(u is None or is_nonnegative(u, _depth + 1) for u in p.inputs)
    return False


def _taps(blk: ResidualBlock) -> tuple[list[int], list[int]]:
    """The taps (t1 per spatial dim of conv1, t2 of conv2) where the carried channels line up with the
    shortcut; raise CompilerError when no such taps exist."""
    x = blk.x
    shapes = [v.shape for v in (x, blk.conv1.outputs[0], blk.add.outputs[0])]
    if any(s is None or len(s) != 4 or not all(isinstance(d, int) for d in s[1:]) for s in shapes):
        raise CompilerError(f"SRN: residual block at Add node {blk.name!r} has tensors of unknown shape "
                            "(run shape inference first)")
    xs = (1,) + tuple(x.shape[1:])
    hs = (1,) + tuple(blk.conv1.outputs[0].shape[1:])
    ys = tuple(blk.add.outputs[0].shape[1:])
    w1, w2 = blk.conv1.weight.const, blk.conv2.weight.const
    s1, p1, d1 = conv_params(blk.conv1, xs, w1.shape)
    s2, p2, d2 = conv_params(blk.conv2, hs, w2.shape)
    if blk.shortcut is None:
        ssc, psc = [1, 1], [0, 0, 0, 0]
    else:
        ssc, psc, _ = conv_params(blk.shortcut, xs, blk.shortcut.weight.const.shape)
    t1s, t2s = [], []
    for i in range(2):
        found = None
        if s1[i] * s2[i] == ssc[i]:
            c1, c2 = (w1.shape[2 + i] - 1) / 2, (w2.shape[2 + i] - 1) / 2
            for t1 in sorted(range(w1.shape[2 + i]), key=lambda t: abs(t - c1)):
                for t2 in sorted(range(w2.shape[2 + i]), key=lambda t: abs(t - c2)):
                    if s1[i] * (t2 * d2[i] - p2[i]) + t1 * d1[i] - p1[i] != -psc[i]:
                        continue
                    lo = t2 * d2[i] - p2[i]
                    hi = s2[i] * (ys[1 + i] - 1) + lo
                    if lo >= 0 and hi <= hs[2 + i] - 1:
                        found = (t1, t2)
                        break
                if found:
                    break
        if found is None:
            raise CompilerError(f"SRN: residual block at Add node {blk.name!r}: the shortcut's sampling grid "
                                "does not line up with a tap of conv1 and conv2")
        t1s.append(found[0])
        t2s.append(found[1])
    return t1s, t2s


def serialize_block(graph: Graph, blk: ResidualBlock) -> None:
    """Replace ``blk`` in place by the serial chain A -> ReLU -> B (the Add and the projection go).

    Raises CompilerError (one line, naming the block) when ``x`` may be negative, when the
    geometry does not line up, or when an identity shortcut changes the channel count."""
    if not is_nonnegative(blk.x):
        raise CompilerError(f"SRN: residual block at Add node {blk.name!r}: its input {blk.x.name!r} may be "
                            "negative, so a ReLU would not carry it through (only blocks fed by a ReLU are serialized)")
    c1, c2 = blk.conv1, blk.conv2
    w1, w2 = c1.weight.const, c2.weight.const
    cin, cmid, cout = int(w1.shape[1]), int(w1.shape[0]), int(w2.shape[0])
    if blk.shortcut is None and cin != cout:
        raise CompilerError(f"SRN: residual block at Add node {blk.name!r}: identity shortcut with {cin} "
                            f"input and {cout} output channels")
    (t1h, t1w), (t2h, t2w) = _taps(blk)
    dt = w1.dtype
    dirac = np.zeros((cin, cin) + tuple(w1.shape[2:]), dt)
    dirac[np.arange(cin), np.arange(cin), t1h, t1w] = 1
    wa = np.concatenate([w1, dirac], axis=0)
    b1 = c1.bias.const if c1.bias is not None else np.zeros(cmid, dt)
    ba = np.concatenate([b1.astype(dt), np.zeros(cin, dt)])
    extra = np.zeros((cout, cin) + tuple(w2.shape[2:]), dt)
    b2 = (c2.bias.const if c2.bias is not None else np.zeros(cout, dt)).astype(np.float64)
    if blk.shortcut is None:
        extra[np.arange(cout), np.arange(cin), t2h, t2w] = 1
    else:
        sc = blk.shortcut
        extra[:, :, t2h, t2w] = sc.weight.const[:, :, 0, 0]
        if sc.bias is not None:
            b2 = b2 + sc.bias.const.astype(np.float64)
    wb = np.concatenate([w2, extra], axis=1)
    graph.set_input(c1, 1, graph.constant(f"{c1.weight.name}_srn", wa))
    graph.set_input(c1, 2, graph.constant(f"{c1.name}_bias_srn", ba))
    graph.set_input(c2, 1, graph.constant(f"{c2.weight.name}_srn", wb))
    graph.set_input(c2, 2, graph.constant(f"{c2.name}_bias_srn", b2.astype(dt)))
    for v in (c1.outputs[0], blk.relu1.outputs[0]):
        if v.shape is not None and len(v.shape) > 1 and isinstance(v.shape[1], int):
            v.shape = (v.shape[0], v.shape[1] + cin) + tuple(v.shape[2:])
    out, y = blk.add.outputs[0], c2.outputs[0]
    graph.remove_node(blk.add, force=True)
    graph.replace_all_uses_with(out, y)
    y.name, out.name = out.name, y.name  # B's output keeps the block output's name
    if blk.shortcut is not None:
        graph.remove_node(blk.shortcut)


def serialize_residual(graph: Graph, *, strict: bool = True) -> SrnReport:
    """Serialize every residual block of ``graph`` in place (BatchNorm must already be folded).

    ``strict``: a block that cannot be serialized raises its CompilerError; otherwise it is left
    as it is and listed in the report's ``refused``."""
    rep = SrnReport()
    for blk in find_residual_blocks(graph):
        try:
            serialize_block(graph, blk)
        except CompilerError as e:
            if strict:
                raise
            rep.refused.append((blk.name, str(e)))
            continue
        rep.serialized.append(blk.name)
    graph.verify()
    return rep
