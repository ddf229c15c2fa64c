"""Plugin passes: a package declares passes in the entry-point group ``mpqc.passes``; they join
``mpqc passes``, ``--passes`` and ``mpqc opt`` with the built-in passes' option parsing and contracts.

The plugin is "installed" as a package plus its ``.dist-info`` folder (what pip writes) in a
temporary folder put on PYTHONPATH of a subprocess, so the test needs no network and leaves the
shared environment untouched (nothing to clean up)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = '''\
"""mpqc-demo-plugin: rename every node with a prefix (a pass of a third-party package)."""
from dataclasses import dataclass

from mpqc.compiler.passes import Pass, PassContext, PassResult
from mpqc.core.ir import Graph


@dataclass(frozen=True)
class PrefixNodesPass(Pass):
    name = "prefix-nodes"
    requires = ("folded-batchnorm",)
    prefix: str = "p_"
    times: int = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        for n in graph.nodes:
            n.name = self.prefix * self.times + n.name
        return PassResult(bool(graph.nodes), {"renamed": len(graph.nodes)})
'''

INPUT = """\
graph @g opset 17 {
  input %x: float32[N,4]
  %y: float32[N,4] = Relu "relu"(%x)
  output %y
}
"""


def install_plugin(site: Path, entry: str = "prefix-nodes = mpqc_demo_plugin:PrefixNodesPass",
                   source: str = PLUGIN) -> Path:
    """Write the plugin package and its dist-info (METADATA, entry_points.txt) into ``site``."""
    (site / "mpqc_demo_plugin").mkdir(parents=True)
    (site / "mpqc_demo_plugin" / "__init__.py").write_text(source)
    info = site / "mpqc_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mpqc-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[mpqc.passes]\n{entry}\n")
    (info / "RECORD").write_text("")
    return site


def mpqc(site: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mpqc", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300)


def test_plugin_pass_runs_through_mpqc_opt(tmp_path):
    site = install_plugin(tmp_path / "site")
    src = tmp_path / "in.mir"
    src.write_text(INPUT)
    res = mpqc(site, "passes")
    assert res.returncode == 0, res.stderr
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("prefix-nodes")]
    assert line and "rename every node with a prefix" in line[0]
    assert "prefix='p_', times=1" in res.stdout
    # options are parsed like a built-in pass's (typed: times is an int)
    res = mpqc(site, "opt", str(src), "--passes", "prefix-nodes{prefix=q_,times=2},remove-identity")
    assert res.returncode == 0, res.stderr
    assert res.stdout == INPUT.replace('"relu"', '"q_q_relu"')
    res = mpqc(site, "opt", str(src), "--passes", "prefix-nodes{times=two}")
    assert res.returncode == 2 and "option times='two' is not a valid int" in res.stderr
    res = mpqc(site, "opt", str(src), "--passes", "prefix-nodes{colour=red}")
    assert res.returncode == 2 and "has no option 'colour'; its options: prefix, times" in res.stderr
    # contracts: the pass's requires are checked like a built-in pass's
    bn = INPUT.replace('Relu "relu"(%x)', 'BatchNormalization "bn"(%x, #s, #s, #s, #s)').replace(
        "  %y", "  const #s: float32[4] = dense<[1.0, 1.0, 1.0, 1.0]>\n  %y")
    res = mpqc(site, "opt", "-", "--passes", "prefix-nodes", stdin=bn)
    assert res.returncode == 2 and "[prefix-nodes] needs BatchNormalization folded" in res.stderr


def test_broken_plugin_is_one_clear_error(tmp_path):
    site = install_plugin(tmp_path / "site", source="raise ImportError('no numpy here')\n")
    res = mpqc(site, "passes")
    assert res.returncode == 2 and res.stdout == ""
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("mpqc: error: plugin pass 'prefix-nodes' (mpqc_demo_plugin:PrefixNodesPass, "
                          "from mpqc-demo-plugin) cannot be loaded: ImportError: no numpy here"), err


@pytest.mark.parametrize("entry, message", [
    ("prefix-nodes = mpqc_demo_plugin:GraphMissing", "cannot be loaded: AttributeError"),
    ("prefix-nodes = mpqc_demo_plugin:dataclass", "is not a Pass subclass"),
    ("other-name = mpqc_demo_plugin:PrefixNodesPass", "the entry point must be named after the pass"),
])
def test_bad_plugin_entries(tmp_path, entry, message):
    site = install_plugin(tmp_path / "site", entry=entry)
    res = mpqc(site, "opt", "-", "--passes", "remove-identity", stdin=INPUT)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_plugin_in_process(tmp_path, monkeypatch):
    from mpqc.compiler import pipelines
    from mpqc.testing import parse_ir, print_ir, run_pass
    site = install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    try:
        assert "prefix-nodes" in pipelines.reload_plugins()
        g = parse_ir(INPUT)
        assert run_pass(g, "prefix-nodes{prefix=z_}").info == {"renamed": 1}
        assert print_ir(g) == INPUT.replace('"relu"', '"z_relu"')
    finally:
        monkeypatch.undo()
        sys.modules.pop("mpqc_demo_plugin", None)
        assert "prefix-nodes" not in pipelines.reload_plugins()
