"""HTML report: plots and tables of the -O2 search, deterministic bytes, escaping, reports without a search."""
from __future__ import annotations

import base64
import re

import numpy as np

from mpqc.compiler.html_report import render_html


def search_report():
    layers = [{"index": i, "layer": name, "op": "Conv", "params": 100 * (i + 1), "macs": 1000 * (i + 1),
               "start_bits": [8, 8], "weight_bits": wb, "act_bits": ab, "weight_bytes": 100 * (i + 1) * wb / 8,
               "in_range": True, "influence": {"chained": ci, "isolated": ii, "reversed": ri}}
              for i, (name, wb, ab, ci, ii, ri) in enumerate([
                  ("/stem/Conv", 8, 8, 0.02, 0.03, 0.05), ("/b1/<script>x</script>", 4, 8, 0.0, 0.0, 0.001),
                  ("/fc/Gemm", 2, 4, 0.003, -0.002, 0.0)])]
    trace = [
        {"step": 0, "action": "start", "layers": [], "bits": {l["layer"]: [8, 8] for l in layers}, "value": 0.99,
         "accepted": True, "weight_bytes": 600.0, "goal": 0.98},
        {"step": 1, "action": "reduce", "layers": ["/fc/Gemm"], "bits": {}, "value": 0.99, "accepted": True,
         "weight_bytes": 450.0, "score": 0.0},
        {"step": 2, "action": "reduce", "layers": ["/stem/Conv"], "bits": {}, "value": 0.95, "accepted": False,
         "weight_bytes": 400.0, "score": 0.02},
    ]
    return {
        "model": "toy", "level": 2, "mpqc_version": "0.1.0", "pipeline": ["choose-formats{start=ladder}",
                                                                           "assign-bit-widths"],
        "target": {"name": "npu4", "description": "low-bit NPU"},
        "accuracy": {"metric": "top1", "data": "d.npz:eval (10 samples)", "float": 1.0,
                     "quantized (emulator)": 0.99},
        "compiled_model": {"weight_bytes": 450.0, "layers": []}, "float_model": {"weight_bytes": 2400.0},
        "passes": {"assign-bit-widths": {
            "strategy": "influence-update", "variant": "chained", "rank": "influence", "metric": "top1",
            "data": {"split": "eval", "source": "d.npz:eval", "samples": 10}, "note": None,
            "goal": 0.98, "float_value": 1.0, "start_value": 0.99, "final_value": 0.99,
            "ladder": [[8, 8], [4, 8], [4, 4], [2, 4]], "layers": layers,
            "influence": {v: {l["layer"]: l["influence"][v] for l in layers} for v in ("chained", "isolated",
                                                                                         "reversed")},
            "trace": trace, "weight_bytes": 450.0, "weight_bytes_start": 600.0, "weight_bytes_int8": 600.0,
            "weight_ratio_int8": 0.75, "mac_cost": 10.0, "mac_cost_int8": 20.0, "evaluations": 3,
            "influence_sweeps": 2, "suffix_runs": 8}},
    }


def pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]


def test_search_report_has_both_plots_and_tables():
    page = render_html(search_report())
    imgs = pngs(page)
    assert len(imgs) == 2 and all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in imgs)
    assert b"Software" not in imgs[0] and b"matplotlib" not in imgs[0]  # no version in the PNG metadata
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "75.0% of uniform int8" in text and "50.0%" in text  # size and MAC cost against int8
    assert "w8a8 → w4a8 → w4a4 → w2a4" in text
    assert "<script>" not in text and "&lt;script&gt;" in text  # layer names are escaped
    # layer table: start and final bits, influences of the three variants
    row = re.search(r"<tr><td class=\"\">2</td>.*?</tr>", text).group(0)
    assert "w8a8" in row and "w2a4" in row and "0.0030" in row and "-0.0020" in row
    # trace table: the rejected step is marked
    assert text.count('class="rej"') == 1


def test_page_is_byte_identical_across_renders():
    assert render_html(search_report()) == render_html(search_report())


def test_report_without_a_search_shows_the_compiled_layers():
    rep = {"model": "m", "level": 1, "pipeline": ["choose-formats"], "target": {"name": "npu8"},
           "float_model": {"weight_bytes": 800.0},
           "compiled_model": {"weight_bytes": 200.0, "layers": [
               {"name": "c1", "op": "Conv", "params": 100, "macs": 900, "weight_bits": 8, "act_bits": 8,
                "weight_bytes": 100.0}, {"name": "fc", "op": "Gemm", "params": 100, "macs": 100,
                                         "weight_bits": 8, "act_bits": 16, "weight_bytes": 100.0}]},
           "passes": {}}
    page = render_html(rep)
    assert len(pngs(page)) == 1 and "<h2>Search</h2>" not in page
    assert ">c1<" in page and "w8a16" in page


def test_compile_writes_the_html(tmp_path):
    from mpqc import compile as compile_model
    from tests.passes.test_assign_bit_widths import classifier
    x = np.random.default_rng(0).standard_normal((24, 2, 6, 6)).astype(np.float32)
    out = tmp_path / "r.html"
    res = compile_model(classifier(), target="npu4", calib=x[:12], eval=x[12:], html=out,
                        passes="choose-formats{start=ladder},layer-influence,assign-bit-widths{max_drop=0.1}")
    page = out.read_text()
    assert len(pngs(page)) == 2 and "influence-update" in page
    assert page == render_html(__import__("mpqc.compiler.driver", fromlist=["_clean_nan"])._clean_nan(res.report))


def test_early_stop_and_ranking_signal_are_shown():
    rep = search_report()
    sec = rep["passes"]["assign-bit-widths"]
    sec["trace"][2]["early_stop"] = {"samples": 4, "of": 10, "value_at_most": 0.95}
    sec["ranking"] = {"signal": "kl", "samples": 5, "of": 10, "subset": 5, "sweeps": 2, "sample_runs": 40,
                      "sample_runs_skipped": 40}
    sec["early_stop"] = {"enabled": True, "evaluations": 1, "samples_run": 4, "samples_skipped": 6}
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", render_html(rep))
    assert "≤ 0.9500 (stopped after 4 of 10)" in text
    assert "Influences measured in KL divergence from the float outputs on 5 of 10 samples (2 sweeps)." in text
    assert "Early stop: 1 candidate(s) stopped once they could only miss the goal, 6 samples not run." in text
    plain = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", render_html(search_report()))
    assert "Influences measured" not in plain and "Early stop" not in plain
