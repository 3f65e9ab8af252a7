"""``report.html``: a static, offline view of ``report.json`` (inline CSS and SVG, no script, no
network): summary, the per-layer table, a size/quality/latency plot, per-layer error and latency
bars, and weight histograms before/after for the largest layers."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from regc._report_svg import bar_chart, histogram_pair, scatter

__all__ = ["render"]

TOP_HISTOGRAMS = 8
_CSS = """body{font-family:sans-serif;margin:24px;color:#111}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td{white-space:nowrap}
td:first-child,th{text-align:left}
th{background:#f3f4f6}h2{margin-top:28px}.plots svg{margin:0 12px 12px 0;vertical-align:top}
.note{color:#555;font-size:12px}"""


def _cell(key: str, v: Any) -> str:
    if v is None or v == []:
        return "n/a"
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    if key in ("sparsity", "latency_share") and isinstance(v, (int, float)):
        return f"{100 * v:.1f}%"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.3g}" if key != "output_rel_error" else f"{v:.2e}"
    return str(v)


def _e(v: Any) -> str:
    return escape(str(v))


def _table(head: list[str], rows: list[list[str]], table_id: str) -> str:
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _summary(r: dict[str, Any]) -> list[list[str]]:
    s, q, lat = r["size"], r.get("quality"), r.get("latency")
    rows = [["weight bytes", f"{s['bytes_before']:,}", f"{s['bytes_after']:,}", f"{s['bytes_ratio']:.3f}x"],
            ["parameters", f"{s['params_before']:,}", f"{s['params_after']:,}",
             f"{s['params_after'] / max(s['params_before'], 1):.3f}x"]]
    if q and "accuracy_before" in q:
        rows.append([f"accuracy ({q['samples']} calibration samples)", f"{100 * q['accuracy_before']:.2f}%",
                     f"{100 * q['accuracy_after']:.2f}%", f"{100 * q['accuracy_delta']:+.2f} points"])
    if q:
        rows.append(["output cosine / rel. error vs original", "1", f"{q['output_cosine']:.6f}",
                     f"{q['output_rel_error']:.2e}"])
    if lat:
        rows.append([f"median latency, {lat.get('backend', '')}", f"{lat['baseline_median_ms']:.4f} ms",
                     f"{lat['median_ms']:.4f} ms", f"{lat['ratio']:.3f}x"])
    return rows


def _pareto(r: dict[str, Any]) -> str:
    """Original and compiled model: size (x) vs quality (y); marker radius 4 + 10 sqrt(latency / max)."""
    s, q, lat = r["size"], r.get("quality"), r.get("latency")
    if not q and not lat:
        return '<p class="note">No quality or latency measured: nothing to place besides size.</p>'
    if q and "accuracy_before" in q:
        ys, ylabel = (100 * q["accuracy_before"], 100 * q["accuracy_after"]), "accuracy %"
    elif q:
        ys, ylabel = (1.0, q["output_cosine"]), "output cosine vs original"
    else:
        ys, ylabel = (lat["baseline_median_ms"], lat["median_ms"]), "median latency ms"
    ms = (lat["baseline_median_ms"], lat["median_ms"]) if lat else (1.0, 1.0)
    top = max(ms)
    sizes = (s["bytes_before"], s["bytes_after"])
    pts = [(name + (f" {m:.3g} ms" if lat else ""), b / 1e3, y, 4 + 10 * math.sqrt(m / top))
           for name, b, y, m in zip(("original", "compiled"), sizes, ys, ms, strict=True)]
    return scatter(pts, "size vs quality (marker size grows with latency)", "weight kB", ylabel)


def render(r: dict[str, Any]) -> str:
    table = r.get("per_layer") or {"columns": [], "rows": []}
    cols = table["columns"]
    rows = table["rows"]
    lp = r.get("layer_profile") or {}
    prof = lp.get("layers") or {}
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>regc report: "
             f"{_e(r.get('source'))}</title><style>{_CSS}</style></head><body>",
             f"<h1>regc report</h1><p>{_e(r.get('source'))} ({_e(r.get('origin'))}), pipeline "
             f"<code>{_e(r.get('pipeline'))}</code>, target {_e(r.get('target') or 'onnx only')}</p>",
             "<h2>Summary</h2>",
             _table(["", "original", "compiled", "ratio / delta"], _summary(r), "summary"),
             "<h2>Per-layer table</h2>",
             _table([c[1] for c in cols], [[_cell(c[0], row.get(c[0])) for c in cols] for row in rows],
                    "per-layer")]
    lat_source = (r.get("layer_latency") or {}).get("source", "not measured (--no-bench)")
    parts.append(f'<p class="note">MACs and output error from {lp.get("samples", "n/a")} calibration '
                 "sample(s); output error is the relative L2 distance of the layer block's output (the layer "
                 "and the weight-free ops after it) to the original's, accumulated from the input. "
                 f"Latency share: {_e(lat_source)}.</p>")
    parts.append('<h2>Plots</h2><div class="plots">')
    parts.append(_pareto(r))
    err = [(row["name"], row["output_rel_error"]) for row in rows if row.get("output_rel_error") is not None]
    parts.append(bar_chart(err, "per-layer output relative error", "{:.2e}") if err else
                 '<p class="note">Per-layer output error: not measured.</p>')
    share = (r.get("layer_latency") or {}).get("share") or {}
    order = [row["name"] for row in rows if row["name"] in share]
    order += [k for k in share if k not in order]
    parts.append(bar_chart([(k, share[k] * 100) for k in order], "onnxruntime latency share %", "{:.1f}%")
                 if share else '<p class="note">Latency share: not available (compiled with --no-bench).</p>')
    parts.append("</div><h2>Weight histograms (largest layers)</h2><div class=\"plots\">")
    big = sorted(prof, key=lambda n: -(prof[n].get("params_before") or 0))[:TOP_HISTOGRAMS]
    for name in big:
        h = prof[name].get("weight_histogram")
        if h and (h.get("before") or h.get("after")):
            parts.append(histogram_pair(h, name))
    parts.append("</div><h2>Passes</h2>")
    parts.append(_table(["pass", "as written", "modified", "seconds"],
                        [[p.get("pass", ""), p.get("text", ""), str(p.get("modified")),
                          f"{p.get('seconds', 0):.2f}"] for p in r.get("passes", [])], "passes"))
    env = r.get("environment") or {}
    parts.append(f'<p class="note">python {_e(env.get("python"))}, torch {_e(env.get("torch"))}, '
                 f'{_e(env.get("machine"))}. The data behind this page is report.json.</p></body></html>')
    return "\n".join(parts)
