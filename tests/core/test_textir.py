"""core/textir: print_graph / parse_graph round-trip every field of the IR; errors name line and column."""
from __future__ import annotations

import numpy as np
import pytest

from mpqc.core.errors import ModelError
from mpqc.core.ir import Graph, Value
from mpqc.core.qformat import LayerQConfig, QFormat
from mpqc.core.textir import Record, TextIRError, parse_graph, print_graph, register_record, split_input
from mpqc.testing import GraphBuilder, register_compiler_records

from tests.conftest import bench_path


def tiny() -> Graph:
    b = GraphBuilder("tiny")
    x = b.input("x", ["N", 1, 2, 2])
    w = b.const("w", np.array([0.5, -1.0], np.float32).reshape(2, 1, 1, 1))
    y = b.op("Conv", [x, w], name="conv", kernel_shape=[1, 1])
    y.shape = ("N", 2, 2, 2)
    return b.output(b.op("Relu", [y], name="relu"))


TINY = """\
graph @tiny opset 17 {
  input %x: float32[N,1,2,2]
  const #w: float32[2,1,1,1] = dense<[0.5, -1.0]>
  %conv_out: float32[N,2,2,2] = Conv "conv"(%x, #w) {kernel_shape = [1, 1]}
  %relu_out: float32 = Relu "relu"(%conv_out)
  output %relu_out
}
"""


def roundtrip(text: str, **kw) -> Graph:
    g = parse_graph(text)
    g.verify()
    assert print_graph(g, **kw) == text
    return g


def test_tiny_graph_exact_text():
    assert print_graph(tiny()) == TINY
    g = roundtrip(TINY)
    assert [n.op_type for n in g.nodes] == ["Conv", "Relu"]
    conv = g.nodes[0]
    assert conv.inputs[0] is g.inputs[0] and conv.outputs[0].uses == [(g.nodes[1], 0)]
    assert conv.attrs == {"kernel_shape": [1, 1]} and conv.weight.const.dtype == np.float32
    assert g.outputs[0].shape is None


def test_decisions_print_and_parse():
    register_compiler_records()
    from mpqc.compiler.channel_prune import PruneRecord
    g = tiny()
    conv = g.nodes[0]
    conv.qconfig = LayerQConfig(4, 8, QFormat(4, (2, 3), True, 0), QFormat(16, 10),
                                [{"by": "assign-bit-widths", "from": [8, 8], "to": [4, 8]}])
    conv.prune = PruneRecord((0, 2), 3, "reap")
    g.inputs[0].qformat = QFormat(8, 7, False)
    conv.outputs[0].qformat = QFormat(8, 0, True, None, fscale=0.0123, zero_point=-3)
    conv.weight.qformat = QFormat(8, (0, 0), True, 0, fscale=(0.5, 1e-3))
    g.metadata["mpqc.bdcnn.conv"] = '{"k": 2, "bases_plus": "AAE="}'
    text = print_graph(g)
    assert text == """\
graph @tiny opset 17 {
  meta "mpqc.bdcnn.conv" = "{\\"k\\": 2, \\"bases_plus\\": \\"AAE=\\"}"
  input %x: float32[N,1,2,2] q<u8 frac=7>
  const #w: float32[2,1,1,1] q<s8 frac=[0, 0] axis=0 scale=[0.5, 0.001]> = dense<[0.5, -1.0]>
  %conv_out: float32[N,2,2,2] q<s8 frac=0 scale=0.0123 zp=-3> = Conv "conv"(%x, #w) {kernel_shape = [1, 1]} \
qconfig<w=4 a=8 weight=q<s4 frac=[2, 3] axis=0> bias=q<s16 frac=10> \
history=[{"by": "assign-bit-widths", "from": [8, 8], "to": [4, 8]}]> \
prune<kept = [0, 2], original_channels = 3, method = "reap">
  %relu_out: float32 = Relu "relu"(%conv_out)
  output %relu_out
}
"""
    g2 = roundtrip(text)
    c2 = g2.nodes[0]
    assert c2.prune == conv.prune and isinstance(c2.prune, PruneRecord)
    q = c2.qconfig
    assert (q.weight_bits, q.act_bits, q.weight_format, q.bias_format, q.history) == \
        (4, 8, conv.qconfig.weight_format, conv.qconfig.bias_format, conv.qconfig.history)
    assert g2.inputs[0].qformat == g.inputs[0].qformat
    assert c2.outputs[0].qformat == conv.outputs[0].qformat and c2.weight.qformat == conv.weight.qformat
    assert g2.metadata == g.metadata


def test_unregistered_record_parses_generically():
    text = TINY.replace('{kernel_shape = [1, 1]}', '{kernel_shape = [1, 1]} prune<kept = [1], original_channels = 2, '
                        'method = "l1">')
    from mpqc.core import textir
    saved = textir._RECORDS.pop("prune", None)
    try:
        g = roundtrip(text)
        rec = g.nodes[0].prune
        assert isinstance(rec, Record) and rec.kept == [1] and rec.original_channels == 2 and rec.method == "l1"
        register_record("prune", lambda f: ("custom", f["kept"]))
        assert parse_graph(text).nodes[0].prune == ("custom", [1])
    finally:
        if saved is not None:
            textir._RECORDS["prune"] = saved


def test_shapes_dtypes_names_attrs_roundtrip():
    g = Graph("odd name", opset=13)
    x = Value("in put", ("batch", None, "h w", 3), np.float16)
    s = Value("s", None, np.int64)
    g.inputs += [x, s]
    consts = [Value("b", const=np.array([True, False])), Value("i8", const=np.array([-128, 127], np.int8)),
              Value("u", const=np.array([[0, 255]], np.uint8)), Value("e", const=np.zeros((0, 3), np.float32)),
              Value("sc", const=np.array(np.float64(np.pi))),
              Value("f", const=np.array([np.inf, -np.inf, np.nan, 1e-38, 3.4028235e38, -0.0], np.float32))]
    n = g.add_node("Custom", [x, None, s, *consts], 2, name="n 1", domain="com.example",
                   attrs={"i": -3, "f": 0.1, "big": 1e300, "s": 'q"uote\n', "ints": [1, 2], "floats": [0.5, 2.0],
                          "strs": ["a", "b"], "empty": [], "t": np.array([[1.5, 2]], np.float32),
                          "flag": True, "weird key": 1})
    n.outputs[0].shape = ()
    m = g.add_node("Sink", [n.outputs[1]], 0, name="sink")
    assert m.outputs == []
    g.outputs += [n.outputs[0], consts[0]]
    text = print_graph(g, elide_above=None)
    g2 = roundtrip(text, elide_above=None)
    n2 = g2.nodes[0]
    assert (n2.domain, n2.op_type, n2.name, n2.inputs[1]) == ("com.example", "Custom", "n 1", None)
    assert g2.inputs[0].shape == ("batch", None, "h w", 3) and g2.inputs[0].dtype == np.float16
    assert g2.inputs[1].shape is None and n2.outputs[0].shape == ()
    for a, b in zip(consts, n2.inputs[3:]):
        assert a.const.dtype == b.const.dtype and a.const.shape == b.const.shape
        np.testing.assert_array_equal(a.const, b.const)
    assert np.signbit(n2.inputs[-1].const[-1])
    for k, v in n.attrs.items():
        v2 = n2.attrs[k]
        assert type(v2) is type(v), k
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, v2)
        else:
            assert v2 == v
    assert g2.outputs[1] is n2.inputs[3] and g2.name == "odd name" and g2.opset == 13


def test_elided_constants(tmp_path):
    big = np.arange(40, dtype=np.float32).reshape(4, 10)
    b = GraphBuilder("e")
    x = b.input("x", ["N", 10])
    y = b.op("MatMul", [x, b.const("w", big.T.copy())], name="mm")
    y = b.op("Add", [y, b.const("zeros", np.zeros(4, np.float32))], name="add")
    g = b.output(y)
    text = print_graph(g, elide_above=3)
    assert "const #zeros: float32[4] = dense<splat=0.0>" in text
    seeded = [line for line in text.splitlines() if "#w:" in line][0]
    assert seeded.startswith("  const #w: float32[10,4] = dense<seed=") and seeded.endswith(">")
    g2 = roundtrip(text, elide_above=3)  # the seeded array keeps its seed while unchanged
    w2 = g2.nodes[0].weight.const
    assert w2.shape == (10, 4) and w2.dtype == np.float32 and not w2.flags.writeable
    np.testing.assert_array_equal(parse_graph(text).nodes[0].weight.const, w2)  # deterministic
    np.testing.assert_array_equal(g2.nodes[1].inputs[1].const, np.zeros(4, np.float32))
    # a changed constant prints afresh
    g2.nodes[0].inputs[1].set_const(w2 * 2)
    assert print_graph(g2, elide_above=3) != text
    # named initializer file
    np.savez(tmp_path / "w.npz", mm_w=big.T)
    ftext = text.replace(seeded.split(" = ")[1], 'dense<file="w.npz:mm_w">')
    g3 = parse_graph(ftext, base_dir=tmp_path)
    np.testing.assert_array_equal(g3.nodes[0].weight.const, big.T)
    assert print_graph(g3, elide_above=3) == ftext
    with pytest.raises(TextIRError, match=r"float32\[10,4\]"):
        parse_graph(ftext.replace("float32[10,4]", "float32[4,10]"), base_dir=tmp_path)


@pytest.mark.parametrize("line, bad, at, message", [
    # ``at``: the text the error points at (its first character is the reported column)
    (3, "const #w: float32[2,1,1,1] = dense<[0.5]>", "dense<[", "dense data has 1 elements"),
    (4, '%conv_out: float32[N,2,2,2] = Conv "conv"(%x, #v) {kernel_shape = [1, 1]}', "#v",
     "use of undefined value #v"),
    (4, '%conv_out: float32[N,2,2,2] = Conv "conv"(%x, #w {kernel_shape = [1, 1]}', "{", "expected ')' or ','"),
    (4, '%conv_out: flot32[N,2,2,2] = Conv "conv"(%x, #w)', "flot32", "expected a dtype"),
    (4, '%conv_out: float32[N,2,2,2] = Conv "conv"(%x, %w)', "%w", "constants are written #name"),
    (5, '%conv_out: float32 = Relu "relu"(%conv_out)', "%conv_out:", "defined twice"),
    (4, '%conv_out: float32[N,2,2,2] = Conv "conv"(%x, #w) {kernel_shape = [1, 1]} qconfig<w=4>', ">",
     "needs w=... and a="),
    (4, '%conv_out: float32[N,2,2,2] q<s8> = Conv "conv"(%x, #w)', "s8", "needs frac"),
    (4, '%conv_out: float32[N,2,2,2] = Conv "conv"(%x, #w) {k = $}', "$", "unexpected character '$'"),
    (4, '%conv_out: float32[N,2,2,2] = Conv "conv"(%x, #w) {k = 1, k = 2}', "k = 2", "given twice"),
    (4, '%conv_out: float32[N,2,2,2] = Conv "conv"(%x, #w) prune<kept = [1,>', "[1,", "bad JSON"),
    (6, "output %nope", "%nope", "undefined value %nope"),
])
def test_parse_errors_name_line_and_column(line, bad, at, message):
    lines = TINY.splitlines()
    lines[line - 1] = "  " + bad
    col = lines[line - 1].rindex(at) + 1
    with pytest.raises(TextIRError) as ei:
        parse_graph("\n".join(lines) + "\n", filename="t.mir")
    err = ei.value
    assert isinstance(err, ModelError) and message in str(err), str(err)
    assert (err.line, err.col) == (line, col), str(err)
    assert str(err).startswith(f"t.mir:{line}:{col}: ")


def test_parse_errors_misc():
    with pytest.raises(TextIRError, match=r"line 1:1: expected 'graph'"):
        parse_graph("grph @g opset 1 {}")
    with pytest.raises(TextIRError, match=r"line 2:1: expected '\}' to close the graph, found end of input"):
        parse_graph("graph @g opset 1 {\n")
    with pytest.raises(TextIRError, match="line 13:"):
        parse_graph("graph @g opset 1 {\n  output %y\n}", line_offset=11)
    with pytest.raises(TextIRError, match="expected end of input"):
        parse_graph(TINY + TINY)


def test_split_input():
    text = TINY + "// -----\n" + TINY.replace("@tiny", "@two")
    parts = split_input(text)
    assert [off for off, _ in parts] == [0, 8]
    assert [parse_graph(t, line_offset=o).name for o, t in parts] == ["tiny", "two"]


def test_comments_and_layout_are_free():
    text = "// a comment\ngraph @tiny   opset 17 {  // trailing\n" + "\n".join(TINY.splitlines()[1:])
    assert print_graph(parse_graph(text)) == TINY


# ---------------------------------------------------------------------------- bench models at every -O2 boundary
def _same_graph(a: Graph, b: Graph, *, consts: bool) -> None:
    assert (a.name, a.opset, a.metadata) == (b.name, b.opset, b.metadata)
    assert [v.name for v in a.inputs] == [v.name for v in b.inputs]
    assert [v.name for v in a.outputs] == [v.name for v in b.outputs]
    assert len(a.nodes) == len(b.nodes)
    for n, m in zip(a.nodes, b.nodes):
        assert (n.op_type, n.name, n.domain) == (m.op_type, m.name, m.domain)
        assert [v and v.name for v in n.inputs] == [v and v.name for v in m.inputs]
        assert [(v.name, v.shape, v.dtype, v.qformat) for v in n.outputs] == \
            [(v.name, v.shape, v.dtype, v.qformat) for v in m.outputs]
        assert (n.prune is None) == (m.prune is None) and (n.prune is None or n.prune == m.prune)
        if n.qconfig is not None:
            q, r = n.qconfig, m.qconfig
            assert (q.weight_bits, q.act_bits, q.weight_format, q.bias_format) == \
                (r.weight_bits, r.act_bits, r.weight_format, r.bias_format)
    for v, w in zip(a.constants(), b.constants()):
        assert (v.name, v.shape, v.dtype, v.qformat) == (w.name, w.shape, w.dtype, w.qformat)
        if consts:
            np.testing.assert_array_equal(v.const, w.const)


def _o2_roundtrips(model: str, ctx, *, full_after: tuple[str, ...] = ()) -> list[str]:
    from mpqc.compiler.frontend import load_graph
    from mpqc.compiler.passes import PassManager
    from mpqc.compiler.pipelines import build_pipeline
    from mpqc.compiler.targets import get_target
    register_compiler_records()
    g = load_graph(bench_path(model))
    done = []

    def check(tag: str) -> None:
        text = print_graph(g)
        g2 = parse_graph(text)
        g2.verify()
        assert print_graph(g2) == text, f"{model}: the IR after {tag} does not round-trip"
        _same_graph(g, g2, consts=False)
        if tag in full_after:  # every constant inline: the parsed graph is the same graph
            full = print_graph(g, elide_above=None)
            g3 = parse_graph(full)
            assert print_graph(g3, elide_above=None) == full
            _same_graph(g, g3, consts=True)
        done.append(tag)

    check("import")
    for p in build_pipeline(2, get_target("npu4")):
        PassManager([p], verify_each=True).run(g, ctx)
        check(p.name)
    return done


@pytest.mark.parametrize("model", ["digits_resnet.onnx", "digits_vgg.onnx", "digits_alexnet.onnx"])
def test_bench_digits_o2_every_pass_boundary(model):
    from mpqc.compiler.data import Dataset
    from mpqc.compiler.passes import PassContext
    from mpqc.compiler.targets import get_target
    d = np.load(bench_path("digits.npz"))
    ctx = PassContext(target=get_target("npu4"), calib=Dataset(d["x_calib"], d["y_calib"], "digits.npz:calib"),
                      eval=Dataset(d["x_eval"][:100], d["y_eval"][:100], "digits.npz:eval[:100]"))
    full = ("import", "fold-batchnorm", "assign-bit-widths", "insert-qdq") if model == "digits_resnet.onnx" else ()
    done = _o2_roundtrips(model, ctx, full_after=full)
    assert done[-1] == "insert-qdq" and "assign-bit-widths" in done and len(done) == 17


@pytest.mark.slow
def test_bench_efficientnet_o2_every_pass_boundary():
    from mpqc.compiler.data import Dataset
    from mpqc.compiler.passes import PassContext
    from mpqc.compiler.targets import get_target
    photos = np.load(bench_path("photos.npz"))
    ctx = PassContext(target=get_target("npu4"), batch_size=8,
                      calib=Dataset(photos["x_calib"][:8].astype(np.float32), None, "photos.npz:calib[:8]"),
                      eval=Dataset(photos["x_eval"][:8].astype(np.float32), None, "photos.npz:eval[:8]"))
    done = _o2_roundtrips("efficientnet_lite0.onnx", ctx)
    assert done[-1] == "insert-qdq"


# ---------------------------------------------------------------------------- mpqc.testing (the users' helpers)
def test_mpqc_testing_helpers():
    from mpqc.testing import assert_ir, assert_matches_ort, assert_roundtrip, parse_ir, randn, run_float, run_pass
    b = GraphBuilder("h")
    x = b.input("x", ["N", 3])
    y = b.op("Gemm", [b.op("Identity", [x], name="id"), b.const("w", randn(2, 3, seed=1))], name="fc", transB=1)
    g = b.output(y)
    x0 = randn(4, 3, seed=2)
    before = run_float(g, x0)[0]
    res = run_pass(g, "remove-identity,infer-shapes", all_results=True)
    assert [r.modified for r in res][0] is True
    assert_ir(g, """
        graph @h opset 17 {
          input %x: float32[N,3]
          const #w: float32[2,3] = dense<[0.34558418, 0.82161814, 0.33043706, -1.3031572, 0.9053559, 0.44637457]>
          %fc_out: float32[N,2] = Gemm "fc"(%x, #w) {transB = 1}
          output %fc_out
        }""")
    with pytest.raises(AssertionError, match=r"(?s)-  output %nope.*\+  output %fc_out"):
        assert_ir(g, print_graph(g).replace("output %fc_out", "output %nope"))
    assert assert_roundtrip(g) == print_graph(g)
    np.testing.assert_array_equal(run_float(g, x0)[0], before)
    assert_matches_ort(g, x0)
    g2 = parse_ir(print_graph(g, elide_above=None))
    np.testing.assert_array_equal(run_float(g2, x0)[0], before)
    with pytest.raises(Exception, match="needs a --target"):
        run_pass(g2, "choose-formats", calib=x0)
    assert run_pass(g2, "choose-formats", target="npu8", calib=x0).modified
    assert g2.nodes[0].qconfig.weight_bits == 8
