"""mpqc's intermediate representation: Value, Node, Graph.

* A ``Value`` is a tensor: name, shape (ints for static dims, strings for symbolic
  ones such as the batch ``"N"``, ``None`` for unknown), dtype, the node that
  produces it (``producer``) and the places that read it (``uses``, a list of
  ``(node, input_index)``). A value with ``const`` set is a constant tensor
  (an initializer); constant arrays are read-only and shared between clones, so a
  pass that changes weights assigns a new array.
* A ``Node`` is an operator: ``op_type``, typed ``attrs`` (int, float, str,
  lists of those, numpy arrays for tensor attributes), ``inputs`` (``None`` marks
  an omitted optional input) and ``outputs``.
* A ``Graph`` owns an ordered node list, graph inputs and outputs. It keeps the
  use-def links consistent through its mutation methods; ``verify()`` checks them.

Values and nodes compare and hash by identity: analyses key on them, never on
names. Decisions that later passes consume and that are exported are typed fields
(``Node.qconfig``, ``Value.qformat``, ``Node.prune``); recomputable facts belong
in analyses (``compiler.passes.Analysis``).
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import VerifyError

Dim = int | str | None

#: op types whose second input is a weight tensor: the "layers" of the methods.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Value:
    """A tensor in the graph (activation, graph input or constant)."""

    __slots__ = ("name", "shape", "dtype", "const", "producer", "uses", "qformat", "__weakref__")

    def __init__(self, name: str, shape: Sequence[Dim] | None = None, dtype=np.float32,
                 const: np.ndarray | None = None):
        self.name = name
        self.dtype = np.dtype(dtype)
        self.const: np.ndarray | None = None
        self.shape: tuple[Dim, ...] | None = tuple(shape) if shape is not None else None
        self.producer: Node | None = None
        self.uses: list[tuple[Node, int]] = []
        self.qformat = None  # core.qformat.QFormat once the value is quantized
        if const is not None:
            self.set_const(const)

    # --- constants -------------------------------------------------------------
    def set_const(self, array: np.ndarray) -> None:
        arr = np.array(array, copy=True) if not isinstance(array, np.ndarray) else array
        if arr.flags.writeable:
            arr = arr.copy()
            arr.flags.writeable = False
        self.const = arr
        self.dtype = arr.dtype
        self.shape = tuple(int(d) for d in arr.shape)

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def static_shape(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def consumers(self) -> list["Node"]:
        seen: dict[int, Node] = {}
        for n, _ in self.uses:
            seen.setdefault(id(n), n)
        return list(seen.values())

    def __repr__(self) -> str:
        kind = "const " if self.is_const else ""
        return f"<Value {kind}{self.name!r} {self.shape} {self.dtype}>"


class Node:
    """An operator application."""

    __slots__ = ("op_type", "name", "domain", "attrs", "inputs", "outputs", "qconfig", "prune",
                 "__weakref__")

    def __init__(self, op_type: str, name: str = "", attrs: dict[str, Any] | None = None,
                 domain: str = ""):
        self.op_type = op_type
        self.name = name
        self.domain = domain
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.inputs: list[Value | None] = []
        self.outputs: list[Value] = []
        self.qconfig = None  # core.qformat.LayerQConfig once bits are decided
        self.prune = None  # pruning decision record, set by pruning passes

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def input(self, i: int) -> Value | None:
        return self.inputs[i] if i < len(self.inputs) else None

    @property
    def weight(self) -> Value | None:
        """The constant weight of a layer (Conv/Gemm/MatMul second input), else None."""
        if self.op_type in LAYER_OPS and len(self.inputs) > 1:
            w = self.inputs[1]
            if w is not None and w.is_const:
                return w
        return None

    @property
    def bias(self) -> Value | None:
        if self.op_type in ("Conv", "ConvTranspose", "Gemm") and len(self.inputs) > 2:
            b = self.inputs[2]
            if b is not None and b.is_const:
                return b
        return None

    @property
    def is_layer(self) -> bool:
        """A node with weights: Conv/ConvTranspose/Gemm/MatMul with a constant weight."""
        return self.weight is not None

    def __repr__(self) -> str:
        return f"<Node {self.op_type} {self.name!r}>"


@dataclass
class Graph:
    """An ordered list of nodes with graph inputs and outputs."""

    name: str = "graph"
    nodes: list[Node] = field(default_factory=list)
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    opset: int = 17
    metadata: dict[str, str] = field(default_factory=dict)

    # identity semantics: a dataclass would otherwise compare field by field
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    # --- construction -----------------------------------------------------------
    def unique_name(self, prefix: str) -> str:
        taken = self.names()
        if prefix not in taken:
            return prefix
        for i in itertools.count(1):
            cand = f"{prefix}_{i}"
            if cand not in taken:
                return cand
        raise AssertionError  # pragma: no cover

    def names(self) -> set[str]:
        """Every value and node name in use (for picking fresh ones in bulk; see ``unique_name``)."""
        names = {v.name for v in self.inputs} | {v.name for v in self.outputs}
        for n in self.nodes:
            names.add(n.name)
            names.update(v.name for v in n.inputs if v is not None)
            names.update(v.name for v in n.outputs)
        return names

    def constant(self, name: str, array: np.ndarray) -> Value:
        """A new constant value (not yet used by any node)."""
        return Value(self.unique_name(name), const=np.asarray(array))

    def add_node(self, op_type: str, inputs: Sequence[Value | None], outputs: Sequence[Value] | int = 1,
                 attrs: dict[str, Any] | None = None, name: str | None = None,
                 index: int | None = None, domain: str = "") -> Node:
        """Create a node, wire its inputs and outputs, insert it at ``index`` (default: end).

        ``outputs`` is either a list of fresh Values or a count, in which case values
        named after the node are created.
        """
        node = Node(op_type, name or self.unique_name(op_type.lower()), attrs, domain)
        if isinstance(outputs, int):
            outputs = [Value(self.unique_name(f"{node.name}_out{i}" if outputs > 1 else f"{node.name}_out"))
                       for i in range(outputs)]
        for v in outputs:  # check before wiring anything, so a refusal leaves the graph as it was
            if v.producer is not None:
                raise VerifyError(f"value {v.name!r} already produced by node {v.producer.name!r}")
        for v in inputs:
            self.append_input(node, v)
        for v in outputs:
            v.producer = node
            node.outputs.append(v)
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return node

    def append_input(self, node: Node, v: Value | None) -> None:
        """Add ``v`` as the next input of ``node`` (None: an omitted optional input)."""
        node.inputs.append(v)
        if v is not None:
            v.uses.append((node, len(node.inputs) - 1))

    def set_input(self, node: Node, index: int, value: Value | None) -> None:
        """Rewire ``node.inputs[index]`` to ``value`` (extending with None if needed)."""
        while len(node.inputs) <= index:
            node.inputs.append(None)
        old = node.inputs[index]
        if old is not None:
            old.uses.remove((node, index))
        node.inputs[index] = value
        if value is not None:
            value.uses.append((node, index))

    def remove_node(self, node: Node, *, force: bool = False) -> None:
        """Detach ``node`` from its inputs and drop it. Its outputs must be unused unless ``force``."""
        if not any(n is node for n in self.nodes):
            raise VerifyError(f"cannot remove node {node.name!r}: it is not in graph {self.name!r}")
        if not force:
            for v in node.outputs:
                if v.uses or v in self.outputs:
                    raise VerifyError(f"cannot remove node {node.name!r}: output {v.name!r} is still used")
        for i, v in enumerate(node.inputs):
            if v is not None:
                v.uses.remove((node, i))
        node.inputs = []
        for v in node.outputs:
            v.producer = None
        self.nodes.remove(node)

    def replace_all_uses_with(self, old: Value, new: Value) -> None:
        """Every reader of ``old`` (nodes and graph outputs) reads ``new`` instead."""
        if old is new:
            return
        for node, idx in list(old.uses):
            node.inputs[idx] = new
            new.uses.append((node, idx))
        old.uses = []
        self.outputs = [new if o is old else o for o in self.outputs]

    def bypass(self, node: Node, input_index: int = 0) -> None:
        """Remove a single-output node, forwarding its input to its readers (Identity-like)."""
        src = node.inputs[input_index]
        out = node.outputs[0]
        if src is None:
            return  # nothing to forward
        if out in self.outputs:
            if src.producer is None or src in self.outputs:
                # a graph input, a constant or another graph output cannot take the output's name:
                # keep the node so the graph keeps its interface
                return
            # keep the graph output's name: rename the forwarded value
            src.name, out.name = out.name, src.name
        self.replace_all_uses_with(out, src)
        self.remove_node(node)

    # --- queries ----------------------------------------------------------------
    def values(self) -> list[Value]:
        """All values used or produced in the graph, each once, in a stable order."""
        seen: dict[int, Value] = {}
        for v in self.inputs:
            seen.setdefault(id(v), v)
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    seen.setdefault(id(v), v)
            for v in n.outputs:
                seen.setdefault(id(v), v)
        for v in self.outputs:
            seen.setdefault(id(v), v)
        return list(seen.values())

    def constants(self) -> list[Value]:
        return [v for v in self.values() if v.is_const]

    def value_by_name(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(name)

    def node_by_name(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def layers(self) -> list[Node]:
        """Nodes with weights, in graph order."""
        return [n for n in self.nodes if n.is_layer]

    def iter_ops(self, *op_types: str) -> Iterator[Node]:
        for n in list(self.nodes):
            if n in self.nodes and (not op_types or n.op_type in op_types):
                yield n

    # --- ordering and checks ------------------------------------------------------
    def toposort(self) -> None:
        """Stable topological sort (Kahn, ties broken by current order)."""
        order = {id(n): i for i, n in enumerate(self.nodes)}
        indeg: dict[int, int] = {}
        succ: dict[int, list[Node]] = {id(n): [] for n in self.nodes}
        for n in self.nodes:
            preds = {id(v.producer) for v in n.inputs
                     if v is not None and v.producer is not None and id(v.producer) in order}
            indeg[id(n)] = len(preds)
            for p in preds:
                succ[p].append(n)
        ready = [(order[id(n)], n) for n in self.nodes if indeg[id(n)] == 0]
        heapq.heapify(ready)
        out: list[Node] = []
        while ready:
            _, n = heapq.heappop(ready)
            out.append(n)
            for s in succ[id(n)]:
                indeg[id(s)] -= 1
                if indeg[id(s)] == 0:
                    heapq.heappush(ready, (order[id(s)], s))
        if len(out) != len(self.nodes):
            stuck = [n.name for n in self.nodes if indeg[id(n)] > 0][:5]
            raise VerifyError(f"graph {self.name!r} has a cycle through nodes {stuck}")
        self.nodes = out

    def verify(self) -> None:
        """Check use-def consistency, topological order, unique names; raise VerifyError."""
        defined: set[int] = {id(v) for v in self.inputs}
        node_ids = {id(n) for n in self.nodes}
        if len(node_ids) != len(self.nodes):
            raise VerifyError("a node appears twice in the node list")
        produced_names: dict[str, Node | None] = {v.name: None for v in self.inputs}
        for n in self.nodes:
            for i, v in enumerate(n.inputs):
                if v is None:
                    continue
                if (n, i) not in v.uses:
                    raise VerifyError(f"node {n.name!r} input {i} ({v.name!r}) is missing from the value's uses")
                if not v.is_const and id(v) not in defined:
                    where = "a later node" if v.producer is not None and id(v.producer) in node_ids else "nothing in the graph"
                    raise VerifyError(f"node {n.name!r} ({n.op_type}) reads {v.name!r}, produced by {where}")
            for v in n.outputs:
                if v.producer is not n:
                    raise VerifyError(f"value {v.name!r} lists the wrong producer (expected node {n.name!r})")
                if v.name in produced_names:
                    raise VerifyError(f"value name {v.name!r} is defined twice")
                produced_names[v.name] = n
                defined.add(id(v))
        for v in self.values():
            for (n, i) in v.uses:
                if id(n) not in node_ids or i >= len(n.inputs) or n.inputs[i] is not v:
                    raise VerifyError(f"value {v.name!r} has a stale use by node {n.name!r}")
        for v in self.outputs:
            if not v.is_const and id(v) not in defined:
                raise VerifyError(f"graph output {v.name!r} is not produced by any node")
        by_name: dict[str, Value] = {}
        for v in self.values():  # export addresses tensors by name: constants included
            if by_name.setdefault(v.name, v) is not v:
                raise VerifyError(f"two different tensors are named {v.name!r}")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            dup = sorted({x for x in names if names.count(x) > 1})[:3]
            raise VerifyError(f"node names are not unique: {dup}")

    # --- copying ---------------------------------------------------------------------
    def clone(self) -> tuple["Graph", dict[int, Any]]:
        """Deep copy of the structure (constant arrays are shared, they are read-only).

        Returns the copy and a map from ``id(old value or node)`` to the new object.
        """
        vmap: dict[int, Any] = {}

        def cv(v: Value | None) -> Value | None:
            if v is None:
                return None
            nv = vmap.get(id(v))
            if nv is None:
                nv = Value(v.name, v.shape, v.dtype)
                nv.const = v.const
                nv.qformat = v.qformat
                vmap[id(v)] = nv
            return nv

        g = Graph(self.name, [], [cv(v) for v in self.inputs], [], self.opset, dict(self.metadata))
        for n in self.nodes:
            nn = Node(n.op_type, n.name, {k: (list(a) if isinstance(a, list) else a.copy()
                                              if isinstance(a, np.ndarray) else a) for k, a in n.attrs.items()},
                      n.domain)
            nn.qconfig = n.qconfig
            nn.prune = n.prune
            vmap[id(n)] = nn
            for v in n.inputs:
                g.append_input(nn, cv(v))
            for v in n.outputs:
                o = cv(v)
                o.producer = nn
                nn.outputs.append(o)
            g.nodes.append(nn)
        g.outputs = [cv(v) for v in self.outputs]
        return g, vmap

    def copy(self) -> "Graph":
        return self.clone()[0]

    # --- statistics ----------------------------------------------------------------------
    def num_params(self) -> int:
        return int(sum(v.const.size for v in self.constants() if v.const.dtype.kind == "f"))

    def summary(self) -> str:
        lines = [f"graph {self.name} (opset {self.opset}): {len(self.nodes)} nodes"]
        for v in self.inputs:
            lines.append(f"  input  {v.name}: {list(v.shape or [])} {v.dtype}")
        for n in self.nodes:
            ins = ", ".join("-" if v is None else (f"#{v.name}" if v.is_const else v.name) for v in n.inputs)
            outs = ", ".join(f"{v.name}{list(v.shape) if v.shape else ''}" for v in n.outputs)
            extra = f"  q={n.qconfig}" if n.qconfig is not None else ""
            lines.append(f"  {outs} = {n.op_type}({ins}){extra}")
        for v in self.outputs:
            lines.append(f"  output {v.name}: {list(v.shape or [])}")
        return "\n".join(lines)


def topo_values(graph: Graph) -> list[Value]:
    """Non-constant values in the order they become available (inputs first)."""
    out = list(graph.inputs)
    for n in graph.nodes:
        out.extend(n.outputs)
    return out


def iter_consts(values: Iterable[Value | None]) -> Iterator[Value]:
    for v in values:
        if v is not None and v.is_const:
            yield v
