"""mpqc's textual IR: ``print_graph`` writes a Graph as text, ``parse_graph`` reads it back.

The text holds everything the IR holds: the graph's name, opset and metadata, its inputs and
outputs, every node (op type, domain, name, attributes, inputs, outputs), every value's dtype
and shape, constants (inline, or elided above ``elide_above`` elements), and the compiler's
decisions: ``Value.qformat`` (``QFormat``), ``Node.qconfig`` (``LayerQConfig``, its history
included) and ``Node.prune`` (a record such as ``compiler.channel_prune.PruneRecord``).
``print_graph(parse_graph(text))`` is byte-identical to ``text`` for any text ``print_graph``
wrote. The grammar is in docs/TEXTUAL_IR.md; an example::

    graph @tiny opset 17 {
      input %x: float32[N,1,4,4]
      const #w: float32[2,1,1,1] = dense<[0.5, -1.0]>
      %y: float32[N,2,4,4] = Conv "conv"(%x, #w) {kernel_shape = [1, 1]}
      output %y
    }

Elided constants are ``dense<splat=V>`` (every element V: exact), ``dense<seed=S>`` (parsed as seeded random values; the printer uses a
CRC-32 of the data as S) or ``dense<file="w.npz:key">`` (an array of an ``.npz`` file, relative
to ``base_dir``). A constant parsed from an elided form prints back as the same form for as
long as its array is unchanged (passes that change weights assign new arrays).

``Node.prune`` records: core imports nothing of the compiler, so a record prints generically as
``prune<field = value, ...>`` (the record's ``to_json()``) and parses into the factory registered
for its tag with ``register_record`` (``mpqc.testing`` and ``mpqc opt`` register
``compiler.channel_prune.PruneRecord``); without one it parses into a ``Record``.

Malformed text raises ``TextIRError`` (a ``ModelError``) naming the line and column.
"""
from __future__ import annotations

import json
import re
import weakref
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ModelError
from .ir import Graph, Node, Value
from .qformat import LayerQConfig, QFormat

__all__ = ["print_graph", "parse_graph", "split_input", "TextIRError", "Record", "register_record",
           "SPLIT_MARKER", "DEFAULT_ELIDE"]

#: separator of several graphs in one file (``mpqc opt --split-input-file``)
SPLIT_MARKER = "// -----"
#: ``print_graph``'s default: constants with more elements are elided
DEFAULT_ELIDE = 16


class TextIRError(ModelError):
    """Malformed textual IR: ``line``/``col`` (1-based) locate the fault."""

    def __init__(self, message: str, line: int, col: int, *, filename: str | None = None):
        self.line, self.col, self.filename = line, col, filename
        where = f"{filename}:{line}:{col}" if filename else f"line {line}:{col}"
        super().__init__(f"{where}: {message}")


class Record:
    """A parsed ``prune<...>`` record whose tag has no registered factory: fields as attributes."""

    def __init__(self, tag: str, fields: dict[str, Any]):
        self.tag = tag
        self.fields = dict(fields)

    def __getattr__(self, key):
        try:
            return self.__dict__["fields"][key]
        except KeyError:
            raise AttributeError(key) from None

    def to_json(self) -> dict:
        return dict(self.fields)

    def __eq__(self, other):
        return isinstance(other, Record) and (self.tag, self.fields) == (other.tag, other.fields)

    def __repr__(self) -> str:
        return f"Record({self.tag!r}, {self.fields!r})"


_RECORDS: dict[str, Callable[[dict], Any]] = {}


def register_record(tag: str, factory: Callable[[dict], Any]) -> None:
    """Parse ``tag<...>`` records (tag ``prune``: ``Node.prune``) with ``factory(fields_dict)``."""
    _RECORDS[tag] = factory


# ---------------------------------------------------------------------------- elided constants
#: id(array) -> (weak reference to the array, the elided form it was parsed from)
_ELIDED: dict[int, tuple[Any, str]] = {}


def _remember(arr: np.ndarray, token: str) -> None:
    key = id(arr)
    _ELIDED[key] = (weakref.ref(arr, lambda _r, key=key: _ELIDED.pop(key, None)), token)


def _elided_form(arr: np.ndarray) -> str:
    hit = _ELIDED.get(id(arr))
    if hit is not None and hit[0]() is arr:
        return hit[1]
    return f"dense<seed={zlib.crc32(np.ascontiguousarray(arr).tobytes())}>"


def seeded_array(seed: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The values of ``dense<seed=S>``: standard normal (floats), integers in [-8, 8) or bools."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind == "u":
        return rng.integers(0, 16, shape).astype(dtype)
    return rng.integers(-8, 8, shape).astype(dtype)


# ---------------------------------------------------------------------------- printing
_NAME_RE = re.compile(r"[A-Za-z0-9_.$/-]+\Z")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KEYWORDS = {"true", "false", "inf", "nan", "none"}


def _name(sigil: str, name: str) -> str:
    return sigil + (name if _NAME_RE.match(name) else json.dumps(name))


def _fmt_scalar(x, dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "true" if x else "false"
    if dtype.kind in "iu":
        return str(int(x))
    s = str(x)  # numpy scalars print their shortest round-tripping form
    return s if any(c in s for c in ".eni") else s + ".0"


def _fmt_dense(arr: np.ndarray) -> str:
    dt = arr.dtype
    if dt.kind == "f":
        items = [_fmt_scalar(x, dt) for x in arr.reshape(-1)]
    elif dt.kind == "b":
        items = ["true" if x else "false" for x in arr.reshape(-1).tolist()]
    else:
        items = [str(x) for x in arr.reshape(-1).tolist()]
    return "dense<[" + ", ".join(items) + "]>"


def _fmt_type(dtype: np.dtype, shape) -> str:
    if shape is None:
        return np.dtype(dtype).name
    dims = []
    for d in shape:
        if d is None:
            dims.append("?")
        elif isinstance(d, str):
            dims.append(d if _IDENT_RE.match(d) and d not in _KEYWORDS else json.dumps(d))
        else:
            dims.append(str(int(d)))
    return f"{np.dtype(dtype).name}[{','.join(dims)}]"


def _fmt_float(x) -> str:
    return repr(float(x))


def _fmt_qformat(f: QFormat) -> str:
    parts = [f"{'s' if f.signed else 'u'}{int(f.bits)}"]
    frac = f.frac
    if isinstance(frac, (tuple, list, np.ndarray)):
        parts.append("frac=[" + ", ".join(str(int(x)) for x in np.asarray(frac).reshape(-1)) + "]")
    else:
        parts.append(f"frac={int(frac)}")
    if f.axis is not None:
        parts.append(f"axis={int(f.axis)}")
    if f.fscale is not None:
        sc = f.fscale
        if isinstance(sc, (tuple, list, np.ndarray)):
            parts.append("scale=[" + ", ".join(_fmt_float(x) for x in np.asarray(sc).reshape(-1)) + "]")
        else:
            parts.append(f"scale={_fmt_float(sc)}")
    if f.zero_point:
        parts.append(f"zp={int(f.zero_point)}")
    return "q<" + " ".join(parts) + ">"


def _fmt_json_value(v) -> str:
    """A record/history field: JSON (keys sorted, no NaN surprises)."""
    return json.dumps(v, sort_keys=True, separators=(", ", ": "))


def _fmt_qconfig(c: LayerQConfig) -> str:
    parts = [f"w={int(c.weight_bits)}", f"a={int(c.act_bits)}"]
    if c.weight_format is not None:
        parts.append(f"weight={_fmt_qformat(c.weight_format)}")
    if c.bias_format is not None:
        parts.append(f"bias={_fmt_qformat(c.bias_format)}")
    if c.history:
        parts.append(f"history={_fmt_json_value(_jsonable(c.history))}")
    return "qconfig<" + " ".join(parts) + ">"


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    return v


def _fmt_record(tag: str, rec) -> str:
    if hasattr(rec, "to_json"):
        fields = rec.to_json()
    elif isinstance(rec, dict):
        fields = rec
    else:
        raise ModelError(f"cannot print {tag} record {rec!r}: it has no to_json()")
    return f"{tag}<" + ", ".join(f"{k} = {_fmt_json_value(_jsonable(v))}" for k, v in fields.items()) + ">"


def _fmt_attr(v, elide_above: int | None) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return _fmt_float(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bytes):
        return json.dumps(v.decode("utf-8", "surrogateescape"))
    if isinstance(v, np.ndarray):
        return _fmt_type(v.dtype, v.shape) + " " + _fmt_const_data(v, elide_above)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_attr(x, elide_above) for x in v) + "]"
    raise ModelError(f"cannot print attribute value of type {type(v).__name__}")


def _fmt_const_data(arr: np.ndarray, elide_above: int | None) -> str:
    if elide_above is not None and arr.size > elide_above:
        flat = arr.reshape(-1)
        if flat.size and not (flat.dtype.kind == "f" and np.isnan(flat[0])) and np.all(flat == flat[0]):
            return f"dense<splat={_fmt_scalar(flat[0], arr.dtype)}>"
        return _elided_form(arr)
    return _fmt_dense(arr)


def _fmt_value_def(sigil: str, v: Value, decisions: bool = True) -> str:
    s = f"{_name(sigil, v.name)}: {_fmt_type(v.dtype, v.shape)}"
    if decisions and v.qformat is not None:
        s += " " + _fmt_qformat(v.qformat)
    return s


def _ref(v: Value | None) -> str:
    if v is None:
        return "_"
    return _name("#" if v.is_const else "%", v.name)


def print_graph(graph: Graph, *, elide_above: int | None = DEFAULT_ELIDE, decisions: bool = True) -> str:
    """The textual IR of ``graph`` (ends with a newline). Constants with more than ``elide_above``
    elements print as ``dense<seed=...>`` (``None``: every constant inline, exact). ``decisions=False``
    leaves out the quantization decisions (formats, bit widths): the float network only."""
    lines = [f"graph {_name('@', graph.name)} opset {int(graph.opset)} {{"]
    for k in sorted(graph.metadata):
        lines.append(f"  meta {json.dumps(k)} = {json.dumps(graph.metadata[k])}")
    for v in graph.inputs:
        if v.is_const:
            lines.append(f"  input {_fmt_value_def('#', v, decisions)} = {_fmt_const_data(v.const, elide_above)}")
        else:
            lines.append(f"  input {_fmt_value_def('%', v, decisions)}")
    inputs = {id(v) for v in graph.inputs}
    for v in graph.values():
        if v.is_const and id(v) not in inputs:
            lines.append(f"  const {_fmt_value_def('#', v, decisions)} = {_fmt_const_data(v.const, elide_above)}")
    for n in graph.nodes:
        outs = ", ".join(_fmt_value_def("%", v, decisions) for v in n.outputs)
        op = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
        s = f"  {outs} = " if n.outputs else "  "
        s += f"{op} {json.dumps(n.name)}({', '.join(_ref(v) for v in n.inputs)})"
        if n.attrs:
            s += " {" + ", ".join(f"{k if _IDENT_RE.match(k) else json.dumps(k)} = {_fmt_attr(a, elide_above)}"
                                  for k, a in n.attrs.items()) + "}"
        if decisions and n.qconfig is not None:
            s += " " + _fmt_qconfig(n.qconfig)
        if n.prune is not None:
            s += " " + _fmt_record("prune", n.prune)
        lines.append(s)
    for v in graph.outputs:
        lines.append(f"  output {_ref(v)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- lexing
_TOKEN_RE = re.compile(r"""
    (?P<ws>[ \t\r\n]+|//[^\n]*)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<sym>[%\#@](?:[A-Za-z0-9_.$/-]+|"(?:[^"\\\n]|\\.)*"))
  | (?P<num>[-+]?(?:inf|nan)(?![A-Za-z0-9_])|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![A-Za-z_]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>::|[{}()\[\]<>,=:?_])
""", re.VERBOSE)

_DTYPES = {"float32", "float16", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16",
           "uint32", "uint64", "bool"}


class _Tok:
    __slots__ = ("kind", "text", "pos")

    def __init__(self, kind, text, pos):
        self.kind, self.text, self.pos = kind, text, pos


class _Parser:
    def __init__(self, text: str, filename: str | None, line_offset: int, base_dir: Path | None):
        self.text = text
        self.filename = filename
        self.line_offset = line_offset
        self.base_dir = base_dir
        self.toks: list[_Tok] = []
        self.i = 0
        self._lex()

    # --- errors and positions
    def loc(self, pos: int) -> tuple[int, int]:
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return line + self.line_offset, col

    def error(self, msg: str, pos: int | None = None) -> TextIRError:
        if pos is None:
            pos = self.peek().pos
        line, col = self.loc(pos)
        return TextIRError(msg, line, col, filename=self.filename)

    def _lex(self) -> None:
        text, pos, toks = self.text, 0, self.toks
        n = len(text)
        while pos < n:
            if text.startswith("dense<[", pos):  # inline data: one token up to the closing "]>"
                end = text.find("]>", pos)
                if end < 0:
                    raise self.error("unterminated dense<[...]>: expected ']>'", pos)
                toks.append(_Tok("dense", text[pos:end + 2], pos))
                pos = end + 2
                continue
            m = _TOKEN_RE.match(text, pos)
            if m is None:
                raise self.error(f"unexpected character {text[pos]!r}", pos)
            kind = m.lastgroup
            if kind != "ws":
                toks.append(_Tok(kind, m.group(), pos))
            pos = m.end()
        toks.append(_Tok("eof", "", n))

    # --- token helpers
    def peek(self, k: int = 0) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> _Tok:
        t = self.peek()
        self.i += 1
        return t

    def at(self, text: str) -> bool:
        t = self.peek()
        return t.kind in ("punct", "ident") and t.text == text

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.i += 1
            return True
        return False

    def expect(self, text: str, what: str | None = None) -> _Tok:
        t = self.peek()
        if not self.at(text):
            raise self.error(f"expected {what or repr(text)}, found {self._desc(t)}")
        self.i += 1
        return t

    @staticmethod
    def _desc(t: _Tok) -> str:
        if t.kind == "eof":
            return "end of input"
        s = t.text if len(t.text) <= 30 else t.text[:27] + "..."
        return repr(s)

    def string(self) -> str:
        t = self.next()
        if t.kind != "str":
            raise self.error(f"expected a quoted string, found {self._desc(t)}", t.pos)
        return json.loads(t.text)

    def ident(self, what: str = "a name") -> str:
        t = self.next()
        if t.kind != "ident":
            raise self.error(f"expected {what}, found {self._desc(t)}", t.pos)
        return t.text

    def integer(self, what: str = "an integer") -> int:
        t = self.next()
        if t.kind != "num" or not re.fullmatch(r"[-+]?\d+", t.text):
            raise self.error(f"expected {what}, found {self._desc(t)}", t.pos)
        return int(t.text)

    def number(self) -> float | int:
        t = self.next()
        if t.kind != "num":
            raise self.error(f"expected a number, found {self._desc(t)}", t.pos)
        return int(t.text) if re.fullmatch(r"[-+]?\d+", t.text) else float(t.text)

    def sym(self, sigil: str, what: str) -> tuple[str, int]:
        t = self.next()
        if t.kind != "sym" or t.text[0] != sigil:
            raise self.error(f"expected {what}, found {self._desc(t)}", t.pos)
        body = t.text[1:]
        return (json.loads(body) if body.startswith('"') else body), t.pos

    # --- grammar
    def parse(self) -> Graph:
        self.expect("graph", "'graph'")
        name, _ = self.sym("@", "a graph name such as @model")
        self.expect("opset", "'opset'")
        g = Graph(name=name, opset=self.integer("an opset number"))
        self.expect("{")
        self.values: dict[str, Value] = {}
        while not self.at("}"):
            t = self.peek()
            if t.kind == "eof":
                raise self.error("expected '}' to close the graph, found end of input")
            if t.kind == "ident" and t.text == "meta":
                self.next()
                k = self.string()
                self.expect("=")
                g.metadata[k] = self.string()
            elif t.kind == "ident" and t.text == "input":
                self.next()
                if self.peek().kind == "sym" and self.peek().text.startswith("#"):
                    g.inputs.append(self.const_def())
                else:
                    g.inputs.append(self.value_def("%", fresh=True))
            elif t.kind == "ident" and t.text == "const":
                self.next()
                self.const_def()
            elif t.kind == "ident" and t.text == "output":
                self.next()
                g.outputs.append(self.ref(allow_none=False))
            else:
                self.node(g)
        self.next()
        if self.peek().kind != "eof":
            raise self.error(f"expected end of input after the graph, found {self._desc(self.peek())}")
        return g

    def define(self, v: Value, pos: int) -> Value:
        if v.name in self.values:
            raise self.error(f"value {v.name!r} is defined twice", pos)
        self.values[v.name] = v
        return v

    def value_def(self, sigil: str, *, fresh: bool) -> Value:
        name, pos = self.sym(sigil, f"a value name such as {sigil}x")
        self.expect(":")
        dtype, shape = self.type_()
        v = Value(name, shape, dtype)
        if self.at("q"):
            v.qformat = self.qformat()
        return self.define(v, pos) if fresh else v

    def const_def(self) -> Value:
        name, pos = self.sym("#", "a constant name such as #w")
        self.expect(":")
        tpos = self.peek().pos
        dtype, shape = self.type_()
        qf = self.qformat() if self.at("q") else None
        self.expect("=")
        if shape is None or not all(isinstance(d, int) for d in shape):
            raise self.error("a constant needs a static shape such as float32[2,3]", tpos)
        arr = self.dense(dtype, tuple(shape))
        v = Value(name, const=arr)
        v.qformat = qf
        return self.define(v, pos)

    def type_(self) -> tuple[np.dtype, tuple | None]:
        t = self.next()
        if t.kind != "ident" or t.text not in _DTYPES:
            raise self.error(f"expected a dtype ({', '.join(sorted(_DTYPES))}), found {self._desc(t)}", t.pos)
        try:
            dtype = np.dtype(t.text)
        except TypeError:
            raise self.error(f"dtype {t.text} is not available in this numpy", t.pos) from None
        if not self.accept("["):
            return dtype, None
        dims: list = []
        while not self.at("]"):
            d = self.next()
            if d.kind == "num" and re.fullmatch(r"\d+", d.text):
                dims.append(int(d.text))
            elif d.kind == "punct" and d.text == "?":
                dims.append(None)
            elif d.kind == "ident":
                dims.append(d.text)
            elif d.kind == "str":
                dims.append(json.loads(d.text))
            else:
                raise self.error(f"expected a dimension (a size, a symbol or '?'), found {self._desc(d)}", d.pos)
            if not self.accept(","):
                break
        self.expect("]", "']' or ','")
        return dtype, tuple(dims)

    def dense(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        t = self.next()
        size = int(np.prod(shape, dtype=np.int64))
        if t.kind == "dense":
            body = t.text[len("dense<["):-2].strip()
            items = [s.strip() for s in body.split(",")] if body else []
            if len(items) != size:
                raise self.error(f"dense data has {len(items)} elements, its type {_fmt_type(dtype, shape)} "
                                 f"needs {size}", t.pos)
            try:
                if dtype.kind == "b":
                    bad = [s for s in items if s not in ("true", "false")]
                    if bad:
                        raise ValueError(bad[0])
                    arr = np.array([s == "true" for s in items], dtype=bool)
                elif dtype.kind in "iu":
                    arr = np.array([int(s) for s in items], dtype=dtype)
                else:
                    arr = np.array(items, dtype=np.str_).astype(dtype) if items else np.zeros(0, dtype)
            except (ValueError, OverflowError) as e:
                raise self.error(f"bad {dtype.name} element in dense data: {e}", t.pos) from None
            return arr.reshape(shape)
        if t.kind == "ident" and t.text == "dense":
            self.expect("<")
            key = self.ident("'seed', 'splat' or 'file'")
            self.expect("=")
            if key == "splat":
                vt = self.next()
                try:
                    if dtype.kind == "b" and vt.text in ("true", "false"):
                        val = vt.text == "true"
                    elif vt.kind == "num":
                        val = int(vt.text) if dtype.kind in "iu" else np.array(vt.text, dtype=np.str_).astype(dtype)
                    else:
                        raise ValueError(vt.text)
                except (ValueError, OverflowError):
                    raise self.error(f"bad {dtype.name} splat value {self._desc(vt)}", vt.pos) from None
                self.expect(">")
                return np.full(shape, val, dtype=dtype)
            if key == "seed":
                seed = self.integer("a seed")
                self.expect(">")
                arr = seeded_array(seed, shape, dtype)
                arr.flags.writeable = False
                _remember(arr, f"dense<seed={seed}>")
                return arr
            if key == "file":
                spos = self.peek().pos
                ref = self.string()
                self.expect(">")
                arr = self.load_file(ref, spos, dtype, shape)
                arr.flags.writeable = False
                _remember(arr, f"dense<file={json.dumps(ref)}>")
                return arr
            raise self.error(f"expected 'seed', 'splat' or 'file' in dense<...>, found {key!r}", t.pos)
        raise self.error(f"expected constant data dense<[...]>, dense<seed=N> or dense<file=\"F.npz:key\">, "
                         f"found {self._desc(t)}", t.pos)

    def load_file(self, ref: str, pos: int, dtype, shape) -> np.ndarray:
        path, _, key = ref.rpartition(":")
        if not path or not key:
            raise self.error(f"dense<file=...> takes \"FILE.npz:key\", got {ref!r}", pos)
        p = Path(path)
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        try:
            with np.load(p) as z:
                arr = np.array(z[key])
        except (OSError, KeyError, ValueError) as e:
            raise self.error(f"cannot read {key!r} from {p}: {e}", pos) from None
        if arr.dtype != dtype or tuple(arr.shape) != shape:
            raise self.error(f"{ref} is {_fmt_type(arr.dtype, arr.shape)}, the type says {_fmt_type(dtype, shape)}", pos)
        return arr

    def qformat(self) -> QFormat:
        self.expect("q")
        self.expect("<")
        t = self.next()
        m = re.fullmatch(r"([su])(\d+)", t.text) if t.kind == "ident" else None
        if m is None:
            raise self.error(f"expected a signedness and width such as s8 or u4, found {self._desc(t)}", t.pos)
        kw: dict[str, Any] = {"signed": m.group(1) == "s", "bits": int(m.group(2))}
        while not self.at(">"):
            kt = self.peek()
            key = self.ident("frac, axis, scale or zp")
            self.expect("=")
            if key == "frac":
                kw["frac"] = tuple(int(x) for x in self.num_list(int)) if self.at("[") else self.integer()
            elif key == "axis":
                kw["axis"] = self.integer()
            elif key == "scale":
                kw["fscale"] = tuple(float(x) for x in self.num_list(float)) if self.at("[") else float(self.number())
            elif key == "zp":
                kw["zero_point"] = self.integer()
            else:
                raise self.error(f"unknown qformat field {key!r} (frac, axis, scale, zp)", kt.pos)
        self.expect(">")
        if "frac" not in kw:
            raise self.error("a qformat needs frac=...", t.pos)
        return QFormat(**kw)

    def num_list(self, kind) -> list:
        self.expect("[")
        out = []
        while not self.at("]"):
            out.append(self.number())
            if not self.accept(","):
                break
        self.expect("]", "']' or ','")
        return out

    def qconfig(self) -> LayerQConfig:
        self.expect("qconfig")
        self.expect("<")
        kw: dict[str, Any] = {}
        while not self.at(">"):
            kt = self.peek()
            key = self.ident("w, a, weight, bias or history")
            self.expect("=")
            if key == "w":
                kw["weight_bits"] = self.integer()
            elif key == "a":
                kw["act_bits"] = self.integer()
            elif key == "weight":
                kw["weight_format"] = self.qformat()
            elif key == "bias":
                kw["bias_format"] = self.qformat()
            elif key == "history":
                kw["history"] = self.json_value()
            else:
                raise self.error(f"unknown qconfig field {key!r} (w, a, weight, bias, history)", kt.pos)
        end = self.expect(">")
        if "weight_bits" not in kw or "act_bits" not in kw:
            raise self.error("a qconfig needs w=... and a=...", end.pos)
        return LayerQConfig(**kw)

    def json_value(self):
        """A JSON value (records, history) spread over tokens: re-joined and decoded."""
        start = self.peek()
        depth, parts = 0, []
        while True:
            t = self.next()
            if t.kind == "eof":
                raise self.error("unterminated value", start.pos)
            if t.kind == "dense":
                raise self.error("unexpected dense data", t.pos)
            if t.text in ("[", "{"):
                depth += 1
            elif t.text in ("]", "}"):
                depth -= 1
            parts.append(t.text)
            if depth < 0:
                raise self.error(f"unbalanced {t.text!r}", t.pos)
            if depth == 0:
                break
        text = " ".join(parts)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise self.error(f"bad JSON value: {e.msg}", start.pos) from None

    def record(self, tag: str):
        self.expect(tag)
        self.expect("<")
        fields: dict[str, Any] = {}
        while not self.at(">"):
            key = self.ident("a field name")
            self.expect("=")
            fields[key] = self.json_value()
            if not self.accept(","):
                break
        self.expect(">", "'>' or ','")
        factory = _RECORDS.get(tag)
        if factory is None:
            return Record(tag, fields)
        try:
            return factory(fields)
        except (TypeError, ValueError, KeyError) as e:
            raise self.error(f"bad {tag} record: {e}") from None

    def attr_value(self):
        t = self.peek()
        if t.kind == "str":
            return self.string()
        if t.kind == "num":
            return self.number()
        if t.kind == "ident" and t.text in ("true", "false"):
            self.next()
            return t.text == "true"
        if t.kind == "ident" and t.text in _DTYPES:
            dtype, shape = self.type_()
            if shape is None or not all(isinstance(d, int) for d in shape):
                raise self.error("a tensor attribute needs a static shape such as int64[1]", t.pos)
            arr = self.dense(dtype, tuple(shape))
            return np.array(arr)  # attributes are ordinary (writeable) arrays
        if self.accept("["):
            out = []
            while not self.at("]"):
                out.append(self.attr_value())
                if not self.accept(","):
                    break
            self.expect("]", "']' or ','")
            return out
        raise self.error(f"expected an attribute value (number, string, list, true/false or tensor), "
                         f"found {self._desc(t)}")

    def ref(self, *, allow_none: bool = True) -> Value | None:
        t = self.peek()
        if allow_none and self.accept("_"):
            return None
        if t.kind != "sym" or t.text[0] not in "%#":
            raise self.error(f"expected a value such as %x or #w{' or _' if allow_none else ''}, "
                             f"found {self._desc(t)}")
        name, pos = self.sym(t.text[0], "a value")
        v = self.values.get(name)
        if v is None:
            raise self.error(f"use of undefined value {t.text}", pos)
        if (t.text[0] == "#") != v.is_const:
            raise self.error(f"{t.text}: constants are written #name, other values %name", pos)
        return v

    def node(self, g: Graph) -> None:
        start = self.peek()
        outs: list[tuple[Value, int]] = []
        if start.kind == "sym":
            while True:
                pos = self.peek().pos
                outs.append((self.value_def("%", fresh=False), pos))
                if not self.accept(","):
                    break
            self.expect("=", "'=' or ','")
        t = self.next()
        if t.kind != "ident":
            raise self.error(f"expected an op type or one of graph's statements (input, const, node, output), "
                             f"found {self._desc(t)}", t.pos)
        domain, op = "", t.text
        if self.accept("::"):
            domain, op = t.text, self.ident("an op type")
        node = Node(op, self.string(), None, domain)
        self.expect("(")
        ins = []
        while not self.at(")"):
            ins.append(self.ref())
            if not self.accept(","):
                break
        self.expect(")", "')' or ','")
        if self.accept("{"):
            while not self.at("}"):
                kt = self.next()
                if kt.kind == "ident":
                    key = kt.text
                elif kt.kind == "str":
                    key = json.loads(kt.text)
                else:
                    raise self.error(f"expected an attribute name, found {self._desc(kt)}", kt.pos)
                if key in node.attrs:
                    raise self.error(f"attribute {key!r} given twice", kt.pos)
                self.expect("=")
                node.attrs[key] = self.attr_value()
                if not self.accept(","):
                    break
            self.expect("}", "'}' or ','")
        if self.at("qconfig"):
            node.qconfig = self.qconfig()
        if self.at("prune"):
            node.prune = self.record("prune")
        for v in ins:
            g.append_input(node, v)
        for v, pos in outs:
            self.define(v, pos)
            v.producer = node
            node.outputs.append(v)
        g.nodes.append(node)


def parse_graph(text: str, *, filename: str | None = None, line_offset: int = 0,
                base_dir: str | Path | None = None) -> Graph:
    """Parse the textual IR of one graph (see ``print_graph`` and docs/TEXTUAL_IR.md).

    ``filename``/``line_offset`` only shape error messages (``FILE:LINE:COL: ...``);
    ``base_dir`` resolves relative ``dense<file=...>`` paths (default: the working directory).
    Raises ``TextIRError`` (a ``ModelError``) on malformed text."""
    p = _Parser(text, filename, line_offset, Path(base_dir) if base_dir is not None else None)
    return p.parse()


def split_input(text: str) -> list[tuple[int, str]]:
    """Split ``text`` at lines that start with ``// -----``: ``(line offset, chunk)`` per part."""
    chunks: list[tuple[int, str]] = []
    start, cur = 0, []
    for i, line in enumerate(text.splitlines(keepends=True)):
        if line.lstrip().startswith(SPLIT_MARKER):
            chunks.append((start, "".join(cur)))
            start, cur = i + 1, []
        else:
            cur.append(line)
    chunks.append((start, "".join(cur)))
    return chunks
