#!/usr/bin/env python3
"""Check mpqc's import structure: no cycles, layers one way, justified local imports.

Usage::

    python tools/check_layers.py [--root DIR] [--json]

The source folders of the installed package ``mpqc`` are read from ``pyproject.toml``
(``[tool.setuptools] package-dir``); without that table the default layout is assumed::

    mpqc/ -> mpqc    core/ -> mpqc.core    runtime/ -> mpqc.runtime
    compiler/ -> mpqc.compiler    passes/ -> mpqc.passes

A folder of the default layout that exists but is missing from ``package-dir`` is still
checked under its default name (noted in the summary).

Every ``.py`` file is parsed with :mod:`ast` and EVERY import is collected: module level,
inside functions, methods and class bodies, ``import a.b``, ``from a import b`` (``b`` may
be a submodule), relative imports resolved against the file's package, and
``importlib.import_module(...)`` calls whose argument is a literal (or an f-string over
``__package__``/``__name__`` and a loop over literal names). Imports naming mpqc modules
are resolved to the module they name: ``from mpqc.core import ir`` ->
``mpqc.core.ir``; ``from mpqc.core.ir import Graph`` -> ``mpqc.core.ir``;
importing a package means its ``__init__``.

Rules (each violation is printed as ``file:line: [rule] message``; exit status 1):

``cycle``
    No import cycle between modules (a strongly connected component of more than one
    module, or a module importing itself), counting function-local imports. Imports under
    ``if TYPE_CHECKING:`` never execute, so they are left out of the cycle graph.
``layers``
    Layers go one way: ``core`` imports nothing of mpqc outside ``core``; ``runtime``
    imports only ``core`` and ``runtime``; ``compiler`` only ``core``, ``runtime``,
    ``compiler`` and the pass registry module ``mpqc.passes.registry``; ``passes`` only
    ``core``, ``runtime``, ``compiler``, ``passes``. None of them imports the CLI/API
    (``mpqc``, ``mpqc.cli``, ``mpqc.__main__``, anything in the ``mpqc/`` folder).
    ``TYPE_CHECKING`` imports count here: a type dependency is a dependency.
``local-import``
    An import that is not at module top level (inside a function, method or class body;
    a module-level ``try:``/``if``/``with`` is top level) needs a justification comment on
    the same line or in the comment lines directly above it containing ``optional`` or
    ``start-up``/``startup`` (case-insensitive). Third-party, standard-library and mpqc
    imports all count; imports under ``if TYPE_CHECKING:`` are exempt.
``passes-registry``
    No module outside ``mpqc.passes`` imports a pass module (or the ``mpqc.passes``
    package) other than ``mpqc.passes.registry``.

A summary is always printed: modules, mpqc import edges, cross-package edges by package
pair, function-local imports (mpqc, third-party, standard library). ``--json`` prints the
summary and the violations as one JSON object instead.

The functions are importable (e.g. by a test through importlib from this file's path):
:func:`check` returns a :class:`Report`; :func:`main` is the command line.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - optional fallback for Python 3.10
    tomllib = None

TOP = "mpqc"
DEFAULT_PACKAGE_DIR: dict[str, str] = {
    "mpqc": "mpqc",
    "mpqc.core": "core",
    "mpqc.compiler": "compiler",
    "mpqc.passes": "passes",
    "mpqc.runtime": "runtime",
}
# Which layers a layer may import ("api" is the CLI/API in the mpqc/ folder: unconstrained).
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset({"core"}),
    "runtime": frozenset({"core", "runtime"}),
    "compiler": frozenset({"core", "runtime", "compiler"}),
    "passes": frozenset({"core", "runtime", "compiler", "passes"}),
}
# Single modules a layer may import although their layer is not allowed.
EXCEPTIONS: dict[str, frozenset[str]] = {
    "compiler": frozenset({"mpqc.passes.registry"}),
}
REGISTRY = "mpqc.passes.registry"
JUSTIFICATION_WORDS = ("optional", "start-up", "startup")
SKIP_DIRS = {"__pycache__", "tests", "test", "node_modules", "build", "dist"}
RULES = ("cycle", "layers", "local-import", "passes-registry", "syntax")


@dataclass(frozen=True)
class Module:
    name: str          # dotted name, e.g. "mpqc.core.ir"
    path: Path         # absolute path of the file
    rel: str           # path relative to the root, with "/" separators
    is_package: bool   # an __init__.py
    layer: str         # "api", "core", "runtime", "compiler", "passes" or another package's last name


@dataclass(frozen=True)
class Import:
    src: str           # importing module
    target: str        # the mpqc module named (resolved), or the top-level name of a non-mpqc import
    line: int
    end_line: int
    local: bool        # not at module top level
    type_checking: bool
    is_mpqc: bool
    known: bool        # the target is a module file of the tree (always False for non-mpqc)
    kind: str          # "import", "from", "dynamic"
    text: str          # the import as written, for messages


@dataclass
class Violation:
    file: str
    line: int
    rule: str
    message: str

    def format(self) -> str:
        return f"{self.file}:{self.line}: [{self.rule}] {self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "rule": self.rule, "message": self.message}


@dataclass
class Report:
    root: Path
    package_dir: dict[str, str]
    notes: list[str] = field(default_factory=list)
    modules: dict[str, Module] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)
    unresolved_dynamic: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    # ---- summary -------------------------------------------------------------------------
    def edges(self, *, include_type_checking: bool = True) -> dict[tuple[str, str], Import]:
        """Unique (importer, imported) mpqc module pairs with the first import that makes each."""
        out: dict[tuple[str, str], Import] = {}
        for imp in self.imports:
            if not imp.is_mpqc or (imp.type_checking and not include_type_checking):
                continue
            out.setdefault((imp.src, imp.target), imp)
        return out

    def summary(self) -> dict:
        layers_count: dict[str, int] = {}
        for m in self.modules.values():
            layers_count[m.layer] = layers_count.get(m.layer, 0) + 1
        edges = self.edges()
        cross: dict[str, int] = {}
        for (src, dst) in edges:
            a, b = self.modules[src].layer, layer_of(dst, self.package_dir)
            if a != b:
                key = f"{a} -> {b}"
                cross[key] = cross.get(key, 0) + 1
        local = [i for i in self.imports if i.local and not i.type_checking]
        stdlib = set(getattr(sys, "stdlib_module_names", ()))
        by_rule = {r: 0 for r in RULES}
        for v in self.violations:
            by_rule[v.rule] = by_rule.get(v.rule, 0) + 1
        return {
            "root": str(self.root),
            "package_dir": dict(sorted(self.package_dir.items())),
            "notes": list(self.notes),
            "modules": len(self.modules),
            "modules_by_package": dict(sorted(layers_count.items())),
            "mpqc_import_statements": sum(1 for i in self.imports if i.is_mpqc),
            "mpqc_import_edges": len(edges),
            "type_checking_edges": len(edges) - len(self.edges(include_type_checking=False)),
            "cross_package_edges": dict(sorted(cross.items())),
            "function_local_imports": {
                "mpqc": sum(1 for i in local if i.is_mpqc),
                "third_party": sum(1 for i in local if not i.is_mpqc and i.target not in stdlib),
                "stdlib": sum(1 for i in local if not i.is_mpqc and i.target in stdlib),
                "unjustified": by_rule.get("local-import", 0),
            },
            "unresolved_dynamic_imports": list(self.unresolved_dynamic),
            "violations": len(self.violations),
            "violations_by_rule": by_rule,
        }

    def format_summary(self) -> str:
        s = self.summary()
        fl = s["function_local_imports"]
        lines = [f"mpqc layer check of {s['root']}"]
        lines += [f"note: {n}" for n in s["notes"]]
        by_pkg = ", ".join(f"{k} {v}" for k, v in s["modules_by_package"].items())
        lines.append(f"modules: {s['modules']} ({by_pkg})")
        lines.append(f"mpqc import edges: {s['mpqc_import_edges']} unique module pairs "
                     f"({s['type_checking_edges']} only under TYPE_CHECKING), "
                     f"from {s['mpqc_import_statements']} import statements")
        lines.append("cross-package edges:" + ("" if s["cross_package_edges"] else " none"))
        lines += [f"  {k}: {v}" for k, v in s["cross_package_edges"].items()]
        lines.append(f"function-local imports: mpqc {fl['mpqc']}, third-party {fl['third_party']}, "
                     f"stdlib {fl['stdlib']} ({fl['unjustified']} without a justification)")
        if s["unresolved_dynamic_imports"]:
            lines.append("dynamic imports not resolved (not checked): "
                         + ", ".join(s["unresolved_dynamic_imports"]))
        rules = ", ".join(f"{k} {v}" for k, v in s["violations_by_rule"].items())
        lines.append(f"violations: {s['violations']} ({rules})")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


# ---- the tree -------------------------------------------------------------------------------

def read_package_dir(root: Path) -> tuple[dict[str, str], list[str]]:
    """The ``package-dir`` mapping of ``root/pyproject.toml`` (mpqc packages only), and notes."""
    notes: list[str] = []
    mapping: dict[str, str] | None = None
    pp = root / "pyproject.toml"
    if pp.is_file() and tomllib is not None:
        try:
            data = tomllib.loads(pp.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            notes.append(f"pyproject.toml unreadable ({e}); default layout assumed")
            data = {}
        pd = data.get("tool", {}).get("setuptools", {}).get("package-dir")
        if isinstance(pd, dict) and pd:
            mapping = {}
            for pkg, folder in pd.items():
                if pkg == "":  # src layout: every mpqc package lives under folder/
                    for name in sorted(DEFAULT_PACKAGE_DIR):
                        sub = Path(folder, *name.split("."))
                        if (root / sub).is_dir():
                            mapping.setdefault(name, sub.as_posix())
                elif pkg == TOP or pkg.startswith(TOP + "."):
                    mapping[pkg] = str(folder)
    if not mapping:
        notes.append("no [tool.setuptools] package-dir in pyproject.toml; default layout assumed")
        return dict(sorted(DEFAULT_PACKAGE_DIR.items())), notes
    for pkg, folder in DEFAULT_PACKAGE_DIR.items():
        if pkg not in mapping and (root / folder).is_dir() and folder not in mapping.values():
            mapping[pkg] = folder
            notes.append(f"{folder}/ is not in pyproject.toml's package-dir; checked as {pkg}")
    return dict(sorted(mapping.items())), notes


def layer_of(module: str, package_dir: dict[str, str]) -> str:
    """The layer of an mpqc module name: the last part of the longest mapped package holding it."""
    best = None
    for pkg in package_dir:
        if module == pkg or module.startswith(pkg + "."):
            if best is None or len(pkg) > len(best):
                best = pkg
    if best is None:
        # not mapped: mpqc.<x>... belongs to layer <x> when <x> is a known layer, else the API
        parts = module.split(".")
        if len(parts) > 1 and parts[1] in ALLOWED:
            return parts[1]
        return "api"
    return "api" if best == TOP else best.split(".")[-1]


def discover(root: Path, package_dir: dict[str, str]) -> dict[str, Module]:
    """Every module file of the mapped folders, by dotted name."""
    mapped_dirs = {(root / d).resolve() for d in package_dir.values()}
    modules: dict[str, Module] = {}

    def walk(folder: Path, pkg: str) -> None:
        for f in sorted(folder.iterdir()):
            if f.is_dir():
                if (f.name in SKIP_DIRS or f.name.startswith(".") or not f.name.isidentifier()
                        or f.resolve() in mapped_dirs):
                    continue
                if any(f.rglob("*.py")):
                    walk(f, f"{pkg}.{f.name}")
            elif f.suffix == ".py" and f.stem.isidentifier():
                is_pkg = f.name == "__init__.py"
                name = pkg if is_pkg else f"{pkg}.{f.stem}"
                rel = f.resolve().relative_to(root.resolve()).as_posix() if _inside(f, root) else str(f)
                modules[name] = Module(name, f, rel, is_pkg, layer_of(name, package_dir))

    for pkg, d in package_dir.items():
        folder = root / d
        if folder.is_dir():
            walk(folder, pkg)
    return dict(sorted(modules.items()))


def _inside(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


# ---- imports of one file --------------------------------------------------------------------

def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return False


def _is_import_module_call(node: ast.Call) -> bool:
    f = node.func
    if isinstance(f, ast.Attribute) and f.attr == "import_module":
        return isinstance(f.value, ast.Name) and f.value.id == "importlib"
    return isinstance(f, ast.Name) and f.id == "import_module"


class _Collector(ast.NodeVisitor):
    """Raw imports of one module: (absolute-or-relative name, names, line, flags)."""

    def __init__(self, module: Module):
        self.module = module
        self.depth = 0             # > 0 inside a def or class body
        self.tc = 0                # > 0 inside `if TYPE_CHECKING:`
        self.loops: list[dict[str, list[str]]] = []   # loop variables over literal strings
        self.raw: list[tuple] = []
        self.unresolved: list[int] = []

    # scopes
    def _scoped(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _scoped

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.tc += 1
            for s in node.body:
                self.visit(s)
            self.tc -= 1
            for s in node.orelse:
                self.visit(s)
        else:
            self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:
        bound: dict[str, list[str]] = {}
        if (isinstance(node.target, ast.Name) and isinstance(node.iter, (ast.Tuple, ast.List))
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.iter.elts)):
            bound[node.target.id] = [e.value for e in node.iter.elts]
        self.loops.append(bound)
        self.generic_visit(node)
        self.loops.pop()

    def _flags(self):
        return self.depth > 0, self.tc > 0

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.raw.append(("import", alias.name, 0, None, node, *self._flags()))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "__future__":
            return
        names = [a.name for a in node.names]
        self.raw.append(("from", node.module or "", node.level, names, node, *self._flags()))

    def visit_Call(self, node: ast.Call) -> None:
        if _is_import_module_call(node) and node.args:
            values = self._literal_values(node.args[0])
            if values is None:
                self.unresolved.append(node.lineno)
            else:
                for v in values:
                    self.raw.append(("dynamic", v, 0, None, node, *self._flags()))
        self.generic_visit(node)

    def _literal_values(self, arg: ast.expr) -> list[str] | None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return [arg.value] if not arg.value.startswith(".") else None
        if not isinstance(arg, ast.JoinedStr):
            return None
        outs = [""]
        pkg = self.module.name if self.module.is_package else self.module.name.rpartition(".")[0]
        for part in arg.values:
            if isinstance(part, ast.Constant):
                outs = [o + str(part.value) for o in outs]
            elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name):
                n = part.value.id
                if n == "__package__":
                    outs = [o + pkg for o in outs]
                elif n == "__name__":
                    outs = [o + self.module.name for o in outs]
                else:
                    vals = next((b[n] for b in reversed(self.loops) if n in b), None)
                    if vals is None:
                        return None
                    outs = [o + v for o in outs for v in vals]
            else:
                return None
        return outs


def _comments(source: str) -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def is_justified(lines: list[str], comments: dict[int, str], line: int, end_line: int) -> bool:
    """A justification word in a comment on the import's lines or the comment lines just above."""
    def has_word(c: str) -> bool:
        c = c.lower()
        return any(w in c for w in JUSTIFICATION_WORDS)

    if any(has_word(comments.get(n, "")) for n in range(line, end_line + 1)):
        return True
    n = line - 1
    while n >= 1 and lines[n - 1].strip().startswith("#"):
        if has_word(lines[n - 1]):
            return True
        n -= 1
    return False


def resolve_base(module: Module, name: str, level: int) -> str | None:
    """Absolute module name of ``from <level dots><name> import ...`` in ``module``."""
    if level == 0:
        return name
    pkg = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = pkg.split(".")
    if level - 1 > len(parts) - 1:
        return None
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_mpqc(name: str) -> bool:
    return name == TOP or name.startswith(TOP + ".")


def module_imports(module: Module, modules: dict[str, Module], report: Report) -> list[Import]:
    """Every import of one module file, mpqc ones resolved to the module they name."""
    source = module.path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(module.path))
    except SyntaxError as e:
        report.violations.append(Violation(module.rel, e.lineno or 1, "syntax", f"cannot parse: {e.msg}"))
        return []
    col = _Collector(module)
    col.visit(tree)
    report.unresolved_dynamic += [f"{module.rel}:{n}" for n in col.unresolved]
    out: list[Import] = []
    for kind, name, level, names, node, local, tc in col.raw:
        line, end = node.lineno, getattr(node, "end_lineno", node.lineno) or node.lineno
        text = ast.get_source_segment(source, node) or name
        text = " ".join(text.split())
        base = resolve_base(module, name, level)
        if base is None:
            report.violations.append(Violation(module.rel, line, "syntax",
                                               f"relative import beyond the top package: {text}"))
            continue
        if not _is_mpqc(base):
            out.append(Import(module.name, base.split(".")[0], line, end, local, tc, False, False, kind, text))
            continue
        targets: list[str] = []
        if kind == "from":
            for n in names:
                sub = f"{base}.{n}"
                targets.append(sub if n != "*" and sub in modules else base)
        else:
            targets.append(base)
        for t in dict.fromkeys(targets):
            out.append(Import(module.name, t, line, end, local, tc, True, t in modules, kind, text))
    return out


# ---- rules ----------------------------------------------------------------------------------

def strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in a deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                comps.append(sorted(comp))
    return sorted(comps)


def shortest_cycle(graph: dict[str, list[str]], start: str, members: set[str]) -> list[str]:
    """Shortest path start -> ... -> start inside ``members`` (breadth first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w in members and w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start, start]


def check_cycles(report: Report) -> None:
    edges = report.edges(include_type_checking=False)
    graph: dict[str, list[str]] = {m: [] for m in report.modules}
    for (src, dst) in edges:
        if dst in report.modules:
            graph[src].append(dst)
    for comp in strongly_connected(graph):
        members = set(comp)
        if len(comp) == 1 and comp[0] not in graph[comp[0]]:
            continue
        start = comp[0]
        path = shortest_cycle(graph, start, members)
        hops = []
        for a, b in zip(path, path[1:]):
            imp = edges[(a, b)]
            where = f"{report.modules[a].rel}:{imp.line}"
            hops.append(f"{a} ({where}{', local' if imp.local else ''})")
        msg = "import cycle: " + " -> ".join(hops + [path[-1]])
        if len(comp) > len(path) - 1:
            msg += f"; strongly connected component of {len(comp)} modules: {', '.join(comp)}"
        first = edges[(path[0], path[1])]
        report.violations.append(Violation(report.modules[start].rel, first.line, "cycle", msg))


def check_layers(report: Report) -> None:
    for imp in report.imports:
        if not imp.is_mpqc:
            continue
        src = report.modules[imp.src]
        dst_layer = layer_of(imp.target, report.package_dir)
        rel = src.rel
        where = " (under TYPE_CHECKING)" if imp.type_checking else ""
        if src.layer in ALLOWED:
            if dst_layer == "api":
                report.violations.append(Violation(rel, imp.line, "layers",
                    f"{src.layer} module {src.name} imports the CLI/API module {imp.target}{where}: "
                    f"`{imp.text}`; move what it needs into {src.layer} or a lower layer"))
            elif dst_layer in ALLOWED and dst_layer not in ALLOWED[src.layer] \
                    and imp.target not in EXCEPTIONS.get(src.layer, ()):
                allowed = ", ".join(sorted(ALLOWED[src.layer], key=list(ALLOWED).index))
                extra = EXCEPTIONS.get(src.layer)
                if extra:
                    allowed += " and " + ", ".join(sorted(extra))
                report.violations.append(Violation(rel, imp.line, "layers",
                    f"{src.layer} module {src.name} imports {dst_layer} module {imp.target}{where}: "
                    f"`{imp.text}`; {src.layer} may import only {allowed}"))
        if src.layer != "passes" and dst_layer == "passes" and imp.target != REGISTRY:
            report.violations.append(Violation(rel, imp.line, "passes-registry",
                f"{src.name} imports {imp.target}{where}: `{imp.text}`; outside mpqc.passes, "
                f"pass modules are reached only through {REGISTRY}"))


def check_local_imports(report: Report) -> None:
    cache: dict[str, tuple[list[str], dict[int, str]]] = {}
    for imp in report.imports:
        if not imp.local or imp.type_checking or imp.kind == "dynamic":
            continue
        mod = report.modules[imp.src]
        if mod.name not in cache:
            src = mod.path.read_text(encoding="utf-8")
            cache[mod.name] = (src.splitlines(), _comments(src))
        lines, comments = cache[mod.name]
        if not is_justified(lines, comments, imp.line, imp.end_line):
            report.violations.append(Violation(mod.rel, imp.line, "local-import",
                f"function-local import `{imp.text}` needs a justification comment ('optional' "
                f"or 'start-up') on its line or the line above, or move it to the module top"))


def check(root: Path | str = ".") -> Report:
    """Check the tree at ``root``; the violations are in ``Report.violations``."""
    root = Path(root).resolve()
    package_dir, notes = read_package_dir(root)
    report = Report(root=root, package_dir=package_dir, notes=notes)
    report.modules = discover(root, package_dir)
    if not report.modules:
        report.notes.append("no module found")
    seen: set[tuple] = set()
    for m in report.modules.values():
        for imp in module_imports(m, report.modules, report):
            key = (imp.src, imp.target, imp.line, imp.kind)
            if key not in seen:   # one statement importing two names of one module counts once
                seen.add(key)
                report.imports.append(imp)
    check_cycles(report)
    check_layers(report)
    check_local_imports(report)
    # a `from x import a, b` line with several imports of one kind is reported once per rule
    uniq: dict[tuple, Violation] = {}
    for v in report.violations:
        uniq.setdefault((v.file, v.line, v.rule, v.message), v)
    report.violations = sorted(uniq.values(), key=lambda v: (RULES.index(v.rule) if v.rule in RULES else 99,
                                                           v.file, v.line, v.message))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="check_layers.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None,
                    help="tree to check (default: the repository holding this script)")
    ap.add_argument("--json", action="store_true", help="print the summary and violations as JSON")
    args = ap.parse_args(argv)
    root = Path(args.root) if args.root else Path(__file__).resolve().parents[1]
    if not root.is_dir():
        print(f"check_layers.py: --root {root} is not a folder", file=sys.stderr)
        return 2
    report = check(root)
    if args.json:
        print(json.dumps({"summary": report.summary(),
                          "violations": [v.to_dict() for v in report.violations]}, indent=2))
    else:
        for v in report.violations:
            print(v.format())
        if report.violations:
            print()
        print(report.format_summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
