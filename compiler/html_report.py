"""HTML report (``--html OUT.html``): the JSON report as a page a person reads at a glance.

``render_html(report) -> str`` draws, with matplotlib (Agg backend, PNG embedded as
base64), whatever the report holds:

* a summary: model, target, pipeline, accuracy (float vs quantized), weight bytes
  against uniform int8, estimated MAC cost, how many evaluations the search spent;
* per layer, side by side on one layer axis: the degree of influence under each
  variant measured on the starting network, and the final bit map (weight and
  activation widths, colour-coded);
* the search along its steps: evaluation value of each candidate (kept or
  rejected) against the goal and the float value, and the weight size;
* tables: layers (shape, MACs, start and final bits, influences) and the full
  search trace.

Output is deterministic: PNG metadata without the software version, fixed DPI and
fonts, no timestamps, so the same report gives a byte-identical page.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

BIT_COLORS = {16: "#1b7837", 8: "#7fbf7b", 4: "#fdb863", 2: "#d7301f", 1: "#67001f"}
VARIANT_COLORS = {"chained": "#2166ac", "isolated": "#b2182b", "reversed": "#8c6bb1"}

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.sub{color:#666;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px}
.card .k{font-size:12px;color:#666}.card .v{font-size:20px;font-weight:600}.card .n{font-size:12px;color:#444}
.good{color:#1b7837}.bad{color:#b2182b}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}
tr.rej td{color:#b2182b}
img{max-width:100%}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;font-size:13px}
code{font-size:12px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return _e(x)
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return _e(x)


def _kb(b: float | None) -> str:
    if b is None:
        return "–"
    return f"{b / 1024:,.1f} KiB" if b >= 1024 else f"{b:,.0f} B"


def _short(name: str, width: int = 34) -> str:
    """Layer names such as '/layers/layers.1/c1/Conv' -> 'layers.1/c1/Conv', cut to ``width``."""
    s = name.strip("/")
    parts = s.split("/")
    if len(parts) > 2 and parts[0] and parts[1].startswith(parts[0]):
        s = "/".join(parts[1:])
    return s if len(s) <= width else "…" + s[-(width - 1):]


# ---------------------------------------------------------------------------- plots
def _plt():
    import matplotlib  # start-up: matplotlib loads in ~0.3 s and only --html needs it
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # start-up (see above)
    matplotlib.rcParams.update({"svg.hashsalt": "mpqc", "font.size": 9, "axes.titlesize": 10,
                                "font.family": "DejaVu Sans", "path.simplify": False})
    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None}, bbox_inches="tight")
    import matplotlib.pyplot as plt  # start-up (see above)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_layers(rows: list[dict], influence: dict[str, dict[str, float]], goal_drop: float | None) -> str:
    """Influence per layer (one bar per variant) beside the final bit map, layers top to bottom."""
    plt = _plt()
    names = [r["layer"] for r in rows]
    n = len(names)
    variants = [v for v in ("chained", "isolated", "reversed") if v in influence] + \
        sorted(v for v in influence if v not in ("chained", "isolated", "reversed"))
    h = max(2.6, 0.26 * n + 1.2)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.5, h), sharey=True,
                                 gridspec_kw={"width_ratios": [3.2, 1.3], "wspace": 0.04})
    ys = list(range(n))
    if variants:
        bw = 0.8 / len(variants)
        for j, v in enumerate(variants):
            vals = [influence[v].get(nm) for nm in names]
            off = -0.4 + bw * (j + 0.5)
            ax.barh([y + off for y, x in zip(ys, vals) if x is not None],
                    [x for x in vals if x is not None], height=bw * 0.92,
                    color=VARIANT_COLORS.get(v, "#777"), label=v)
        ax.axvline(0, color="#444", lw=0.8)
        if goal_drop is not None and goal_drop > 0:
            ax.axvline(goal_drop, color="#b2182b", lw=0.8, ls="--", label="allowed total drop")
        ax.legend(loc="lower right", fontsize=8, frameon=True)
        ax.set_xlabel("degree of influence (drop of the evaluation value when the layer is reduced)")
    else:
        ax.text(0.5, 0.5, "no influence measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{i:>2} {_short(nm)}" for i, nm in enumerate(names)], fontsize=8, family="DejaVu Sans Mono")
    ax.set_ylim(n - 0.5, -0.5)
    ax.grid(axis="x", color="#eee")
    ax.set_title("influence per layer (measured on the starting network)")
    # bit map: two columns, weights and activations, coloured by width
    for y, r in enumerate(rows):
        for x, key in enumerate(("weight_bits", "act_bits")):
            b = r.get(key)
            col = BIT_COLORS.get(b, "#bbbbbb") if b is not None else "#ffffff"
            bx.add_patch(plt.Rectangle((x, y - 0.5), 1, 1, color=col, ec="white", lw=1))
            start = (r.get("start_bits") or [None, None])[x]
            label = "–" if b is None else (f"{b}" if start in (None, b) else f"{start}→{b}")
            bx.text(x + 0.5, y, label, ha="center", va="center", fontsize=8,
                    color="white" if b in (16, 2, 1) else "black")
    bx.set_xlim(0, 2)
    bx.set_xticks([0.5, 1.5])
    bx.set_xticklabels(["weights", "activations"])
    bx.xaxis.tick_top()
    bx.tick_params(axis="y", left=False)
    for s in bx.spines.values():
        s.set_visible(False)
    bx.set_title("final bits", pad=18)
    return _png(fig)


def _ranking_note(search: dict) -> str:
    """What the influences were measured in and on, and what early stop skipped (one sentence each)."""
    out = ""
    rk = search.get("ranking") or {}
    if rk.get("sweeps"):
        sig = {"metric": _e(search.get("metric")), "kl": "KL divergence from the float outputs",
               "mse": "mean squared error against the float outputs"}.get(rk.get("signal"), _e(rk.get("signal")))
        out += f" Influences measured in {sig} on {rk.get('samples')} of {rk.get('of')} samples ({rk['sweeps']} sweeps)."
    es = search.get("early_stop") or {}
    if es.get("evaluations"):
        out += (f" Early stop: {es['evaluations']} candidate(s) stopped once they could only miss the goal, "
                f"{es['samples_skipped']} samples not run.")
    return out


def plot_trace(trace: list[dict], goal: float | None, float_value: float | None, int8_bytes: float | None) -> str:
    """Evaluation value of each candidate and the weight size along the search steps."""
    plt = _plt()
    steps = [t for t in trace if t.get("action") != "raise-threshold"]
    fig, ax = plt.subplots(figsize=(10.5, 3.6))
    xs = list(range(len(steps)))
    vals = [t["value"] for t in steps]
    acc = [t["accepted"] for t in steps]
    kept_x = [x for x, a in zip(xs, acc) if a]
    kept_v = [v for v, a in zip(vals, acc) if a]
    ax.plot(kept_x, kept_v, "-o", color="#2166ac", ms=4, lw=1.4, label="kept (new NN_T)")
    rej = [(x, v) for x, v, a in zip(xs, vals, acc) if not a]
    if rej:
        ax.plot([x for x, _ in rej], [v for _, v in rej], "X", color="#b2182b", ms=9, label="rejected: below goal")
    if goal is not None:
        ax.axhline(goal, color="#b2182b", ls="--", lw=1, label=f"goal {goal:.4f}")
    if float_value is not None and math.isfinite(float_value):
        ax.axhline(float_value, color="#555", ls=":", lw=1, label=f"float {float_value:.4f}")
    ax.set_xlabel("search step")
    ax.set_ylabel("evaluation value")
    ax.grid(color="#eee")
    bx = ax.twinx()
    wb = [t["weight_bytes"] / 1024 for t in steps]
    kept_wb, last = [], None
    for w, a in zip(wb, acc):  # the size of NN_T after each step (a rejected step leaves it unchanged)
        last = w if a or last is None else last
        kept_wb.append(last)
    bx.step(xs, kept_wb, where="post", color="#e08214", lw=1.4, alpha=0.9, label="weight KiB (kept network)")
    if rej:
        bx.plot([x for x, a in zip(xs, acc) if not a], [w for w, a in zip(wb, acc) if not a], "x",
                color="#e08214", ms=7, label="weight KiB (rejected)")
    if int8_bytes:
        bx.axhline(int8_bytes / 1024, color="#e08214", ls="--", lw=0.8, alpha=0.6, label="uniform int8 KiB")
    bx.set_ylabel("weight size (KiB)", color="#b35806")
    bx.set_ylim(0, max(wb + [int8_bytes / 1024 if int8_bytes else 0]) * 1.08 or 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = bx.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=4,
              frameon=False)
    ax.set_zorder(bx.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_title("search: evaluation value and size after each step")
    return _png(fig)


# ---------------------------------------------------------------------------- page
def plot_pro_curves(curves: list[dict], kept: dict[str, int]) -> str:
    """PRO's measurement: per prunable layer, the error at the network output against the MACs
    saved over the grid of ratios; the marker is each layer's chosen point."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10.5, 3.8))
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(curves):
        xs = [m / 1e6 for m in c["macs_saved"]]
        ax.plot(xs, c["errors"], marker=".", lw=1, color=cmap(i % 20), label=_short(c["unit"], 28))
        if c["unit"] in kept and kept[c["unit"]] in c["n_keep"]:
            j = c["n_keep"].index(kept[c["unit"]])
            ax.plot([xs[j]], [c["errors"][j]], marker="o", ms=7, mfc="none", color=cmap(i % 20))
    ax.set_xlabel("MACs saved per sample (millions)")
    ax.set_ylabel("mean squared error of the output")
    ax.set_title("PRO: error against MACs saved when each layer alone is pruned (circles: chosen ratios)")
    ax.grid(color="#eee")
    if len(curves) <= 20:
        ax.legend(fontsize=7, ncol=2, loc="upper left")
    return _png(fig)


def _structure_sections(report: dict) -> list[str]:
    """Stages (MACs, weights, accuracy), residual serialization, channel pruning with PRO's curves."""
    parts: list[str] = []
    passes = report.get("passes") or {}
    stages = report.get("stages")
    if stages:
        parts.append("<h2>Stages: MACs, weights and accuracy</h2>")
        parts.append(_table(["stage", "MACs", "of float", "parameters", "weight bytes", "accuracy"],
                            [[_e(r["stage"]), f"{r['macs']:,}", _num(r.get("macs_fraction"), 3), f"{r['params']:,}",
                              _kb(r.get("weight_bytes")), _num(r.get("accuracy"))] for r in stages], left={0}))
    srn = passes.get("serialize-residual")
    if srn and (srn.get("serialized") or srn.get("refused")):
        parts.append("<h2>Residual blocks serialized (SRN)</h2>")
        rows = [[_e(b), "serialized", ""] for b in srn.get("serialized", [])]
        rows += [[_e(r["block"]), "left as is", _e(r["reason"])] for r in srn.get("refused", [])]
        parts.append(_table(["block (Add node)", "result", "reason"], rows, left={0, 1, 2}))
    pr = passes.get("prune-channels")
    if pr and "kept" in pr:
        parts.append("<h2>Channel pruning</h2>")
        parts.append(f'<div class="sub">selection <b>{_e(pr.get("method"))}</b>, ratios <b>{_e(pr.get("ratios"))}</b>, '
                     f'MACs {pr["macs_before"]:,} → {pr["macs_after"]:,} '
                     f'({_num(pr.get("macs_fraction_of_float"), 3)} of the float model, budget {_e(pr.get("flops"))})</div>')
        if pr.get("curves"):
            parts.append(f'<img alt="PRO curves" src="{plot_pro_curves(pr["curves"], pr["kept"])}">')
        parts.append(_table(["layer", "channels", "kept", "pruned"],
                            [[_e(u), str(pr["channels"][u]), str(k), f"{1 - k / pr['channels'][u]:.0%}"]
                             for u, k in pr["kept"].items()], left={0}))
        if pr.get("refused"):
            parts.append('<details><summary>layers left unpruned</summary><ul>'
                         + "".join(f"<li>{_e(r)}</li>" for r in pr["refused"]) + "</ul></details>")
    bd = report.get("bdcnn")
    if bd:
        sz = bd["sizes"]
        a = bd.get("accuracy") or {}
        parts.append("<h2>Binary decomposition</h2>")
        parts.append(f'<div class="sub">bases + coefficients {_kb(sz["bytes"])}: {sz["vs_float"]:.1%} of float, '
                     f'{sz["vs_int8"]:.1%} of int8; Q {_e(bd["q_mode"])}'
                     + (f'; Algorithm 1 predicted {_num(a.get("predicted"))}, measured (popcount runtime) '
                        f'{_num(a.get("measured (popcount runtime)"))}' if "predicted" in a else "") + "</div>")
        parts.append(_table(["layer", "op", "k", "Q", "rel. error", "min", "delta", "bytes"],
                            [[_e(r["layer"]), _e(r["op"]), str(r["k"]), str(r["Q"]), _num(r["rel_error"], 3),
                              _num(r["min"]), _num(r["delta"], 5), _kb(r["bytes"])] for r in bd["layers"]],
                            left={0, 1}))
        if bd.get("not_decomposed"):
            parts.append(_table(["layer not decomposed", "reason", "path"],
                                [[_e(r["layer"]), _e(r["reason"]), _e(r["path"])] for r in bd["not_decomposed"]],
                                left={0, 1, 2}))
    return parts


def _card(k: str, v: str, n: str = "", cls: str = "") -> str:
    return f'<div class="card"><div class="k">{_e(k)}</div><div class="v {cls}">{v}</div><div class="n">{n}</div></div>'


def _table(headers: list[str], rows: list[list[str]], left: set[int] = frozenset(), row_cls=None) -> str:
    th = "".join(f'<th class="{"l" if i in left else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = []
    for j, r in enumerate(rows):
        cls = f' class="{row_cls[j]}"' if row_cls and row_cls[j] else ""
        body.append(f"<tr{cls}>" + "".join(f'<td class="{"l" if i in left else ""}">{c}</td>'
                                            for i, c in enumerate(r)) + "</tr>")
    return f"<table><tr>{th}</tr>{''.join(body)}</table>"


def _layer_rows_from_model(report: dict) -> list[dict]:
    cm = report.get("compiled_model") or {}
    return [{"index": i, "layer": l["name"], "op": l["op"], "params": l.get("params"), "macs": l.get("macs"),
             "weight_bits": l.get("weight_bits"), "act_bits": l.get("act_bits"), "start_bits": None,
             "weight_bytes": l.get("weight_bytes")} for i, l in enumerate(cm.get("layers", []))]


def render_html(report: dict) -> str:
    passes = report.get("passes") or {}
    search = passes.get("assign-bit-widths")
    infl_pass = passes.get("layer-influence") or {}
    tgt = report.get("target") or {}
    parts: list[str] = []
    title = f"mpqc report: {report.get('model', '?')}"
    parts.append(f"<h1>{_e(title)}</h1>")
    lvl = report.get("level")
    parts.append(f'<div class="sub">target <b>{_e(tgt.get("name", "none"))}</b>'
                 + (f" ({_e(tgt.get('description', ''))})" if tgt else "")
                 + (f" · -O{lvl}" if lvl is not None else " · custom pass list")
                 + f" · mpqc {_e(report.get('mpqc_version', ''))}</div>")
    parts.append(f'<div class="sub">pipeline: <code>{_e(", ".join(report.get("pipeline", [])))}</code></div>')

    # ---- summary cards
    cards = []
    acc = report.get("accuracy") or {}
    if acc:
        fv = acc.get("float")
        qv = acc.get("quantized (emulator)")
        metric = acc.get("metric", "")
        cards.append(_card(f"float {metric}", _num(fv), _e(acc.get("data", ""))))
        if qv is not None:
            cls = "good" if fv is None or not isinstance(fv, float) or qv >= fv - 0.015 else "bad"
            cards.append(_card(f"quantized {metric} (emulator)", _num(qv),
                               f"{(qv - fv) * 100:+.2f} points" if isinstance(fv, float) else "", cls))
    fm, cm = report.get("float_model") or {}, report.get("compiled_model") or {}
    if search:
        cards.append(_card(f"search {search.get('metric')} on {search.get('data', {}).get('split')}",
                           _num(search.get("final_value")),
                           f"goal {_num(search.get('goal'))}, float {_num(search.get('float_value'))}",
                           "good" if (search.get("final_value") or 0) >= (search.get("goal") or 0) else "bad"))
        ratio = search.get("weight_ratio_int8")
        cards.append(_card("weight bytes", _kb(search.get("weight_bytes")),
                           f"{ratio * 100:.1f}% of uniform int8 ({_kb(search.get('weight_bytes_int8'))})"
                           if ratio is not None else "", "good" if ratio is not None and ratio <= 1 else ""))
        mc, mc8 = search.get("mac_cost"), search.get("mac_cost_int8")
        if mc and mc8:
            cards.append(_card("estimated MAC cost", f"{mc / mc8 * 100:.1f}%", "of uniform w8a8 (cost ∝ w·a bits)"))
        cards.append(_card("search effort", f"{search.get('evaluations', 0)} evals",
                           f"{search.get('influence_sweeps', 0)} influence sweeps, "
                           f"{search.get('suffix_runs', 0)} suffix runs"))
        cards.append(_card("strategy", _e(search.get("strategy")),
                           f"influence variant {_e(search.get('variant'))}, ranking {_e(search.get('rank'))}"))
    elif cm:
        cards.append(_card("weight bytes", _kb(cm.get("weight_bytes")),
                           f"float model {_kb(fm.get('weight_bytes'))}"))
    if cards:
        parts.append('<div class="cards">' + "".join(cards) + "</div>")
    if search and search.get("note"):
        parts.append(f'<div class="note">{_e(search["note"])}</div>')

    # ---- per-layer plot and table
    if search:
        rows = search.get("layers", [])
        influence = search.get("influence") or {}
    else:
        rows = _layer_rows_from_model(report)
        influence = {v: d.get("influence", {}) for v, d in infl_pass.items() if isinstance(d, dict)}
    if rows:
        parts.append("<h2>Layers: influence and final bit widths</h2>")
        drop = None
        if search and search.get("goal") is not None and search.get("float_value") is not None:
            try:
                drop = float(search["float_value"]) - float(search["goal"])
            except (TypeError, ValueError):
                drop = None
        parts.append(f'<img alt="influence per layer and final bits" src="{plot_layers(rows, influence, drop)}">')
        if search:
            parts.append(f'<div class="sub">Influence: how much the evaluation value drops when the layer goes '
                         f'one rung down the ladder {_e(" → ".join("w%da%d" % tuple(x) for x in search.get("ladder", [])))} '
                         f'(chained: the patent\'s default; isolated and reversed: [0167]). '
                         f'Cells show start→final widths.</div>')
        variants = [v for v in ("chained", "isolated", "reversed") if v in influence]
        headers = ["#", "layer", "op", "params", "MACs", "start", "final", "bytes"] + [f"I {v}" for v in variants]
        trs = []
        for r in rows:
            sb = r.get("start_bits")
            trs.append([str(r.get("index", "")), _e(r["layer"]), _e(r.get("op", "")), _num(r.get("params")),
                        _num(r.get("macs")), "–" if not sb else f"w{sb[0]}a{sb[1]}",
                        f"w{r.get('weight_bits')}a{r.get('act_bits')}",
                        "–" if r.get("weight_bytes") is None else f"{r['weight_bytes']:,.0f}"]
                       + [_num((r.get("influence") or {}).get(v) if search else influence[v].get(r["layer"]))
                          for v in variants])
        parts.append(_table(headers, trs, left={1, 2}))

    # ---- search trace
    if search and search.get("trace"):
        tr = search["trace"]
        parts.append("<h2>Search</h2>")
        parts.append(f'<img alt="search trace" src="{plot_trace(tr, search.get("goal"), search.get("float_value"), search.get("weight_bytes_int8"))}">')
        parts.append(f'<div class="sub">Each step reduces the layer(s) shown by one rung and evaluates the result on '
                     f'{_e(search.get("data", {}).get("source", ""))} ({search.get("data", {}).get("samples", "?")} '
                     f'samples, {_e(search.get("metric"))}). Above the goal the reduced network becomes NN_T; the first '
                     f'step below it ends the search and NN* (the last kept network) is the result.'
                     + _ranking_note(search) + '</div>')
        trs, cls = [], []
        for t in tr:
            bits = t.get("bits", {})
            changed = ", ".join(f"{_e(_short(l, 40))} → w{bits[l][0]}a{bits[l][1]}" for l in t.get("layers", [])
                                if l in bits)
            extra = t.get("threshold")
            es = t.get("early_stop")
            value = _num(t["value"]) if not es else f'≤ {_num(t["value"])} (stopped after {es["samples"]} of {es["of"]})'
            trs.append([str(t["step"]), _e(t["action"]), changed or "–", value,
                        "yes" if t["accepted"] else "no", _kb(t.get("weight_bytes")),
                        _num(t.get("score")) if not isinstance(t.get("score"), dict) else "–",
                        _num(extra) if extra is not None else ""])
            cls.append("" if t["accepted"] else "rej")
        parts.append("<details open><summary>full trace</summary>"
                     + _table(["step", "action", "layers → bits", "value", "kept", "weights", "influence", "K"],
                              trs, left={1, 2}, row_cls=cls) + "</details>")
        parts.append(f'<div class="sub">Final: {_num(search.get("final_value"))} (start {_num(search.get("start_value"))}); '
                     f'weights {_kb(search.get("weight_bytes"))} (start {_kb(search.get("weight_bytes_start"))}, '
                     f'uniform int8 {_kb(search.get("weight_bytes_int8"))}).</div>')
    parts.extend(_structure_sections(report))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
