"""Writes the peer bench's results: peers.json (everything), peers.md (one table per model and a regc vs
best-peer summary) and peers_pareto.svg (one panel per model: weight-bytes ratio against quality, the
marker's area growing with the latency ratio, the Pareto front of all entries drawn as a line).

"Best" is decided within a quality tolerance of fp32 (TOLERANCE: 1 accuracy point, or a mean cosine
>= 0.99): the smallest weight bytes, and separately the lowest latency ratio, among the entries that
keep quality within it.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

TOLERANCE = {"accuracy": 0.01, "cosine": 0.01}  # allowed drop below fp32 (cosine: below 1.0)


def within(row: dict, metric: str, fp32_quality: float) -> bool:
    ok = row.get("status") == "ok"
    if not ok:
        return False
    if metric == "accuracy":
        return row["quality"] >= fp32_quality - TOLERANCE[metric]
    return row["quality"] >= 1.0 - TOLERANCE[metric]


def best(rows: list[dict], metric: str, fp32_quality: float, by: str) -> dict:
    keep = [r for r in rows if r["by"] == by and within(r, metric, fp32_quality)]
    lat = [r for r in keep if r.get("latency_backend") == "onnxruntime"]
    return {"smallest": min(keep, key=lambda r: r["bytes_ratio"], default=None),
            "fastest": min(lat, key=lambda r: r["latency"]["ratio"], default=None)}


def _cell(r: dict | None, key: str) -> str:
    if r is None:
        return "none within tolerance"
    v = r["bytes_ratio"] if key == "smallest" else r["latency"]["ratio"]
    return f"{r['entry']} ({v:.3f}x, q {r['quality']:.4f})"


def markdown(result: dict) -> str:
    lines = ["# regc vs peers", "",
             f"{result['machine']}; {'quick' if result['quick'] else 'full'} run, {result['total_s']:.0f} s "
             "in all.", "",
             "bytes = weight bytes / fp32's (zeros counted as a 1-bit mask plus the non-zero values where "
             "smaller; `onnx` = as stored, dense); latency = median / fp32's median, the two interleaved in "
             "one onnxruntime process, 1 thread (torch eager for entries without an ONNX form, marked *); "
             "compress = seconds of the compression step alone.", ""]
    summary = ["## Best regc entry vs best peer (within tolerance of fp32: 1 accuracy point, or cosine "
               ">= 0.99)", "", "| model | regc smallest | peer smallest | regc fastest | peer fastest |",
               "|---|---|---|---|---|"]
    for model, m in result["models"].items():
        unit = "accuracy" if m["metric"] == "accuracy" else "cosine to fp32"
        lines += [f"## {model} ({unit}; fp32 quality {m['fp32_quality']:.4f}, "
                  f"{m['fp32_weight_bytes']} weight bytes; latency batch {m['latency_batch']}; "
                  f"{m['total_s']:.0f} s in all)", "",
                  "| entry | bytes | onnx | quality (min) | latency | compress s | trains | config |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in m["entries"]:
            if r["status"] != "ok":
                lines.append(f"| {r['entry']} | {r['status']}: {r['reason']} | | | | | | |")
                continue
            star = "" if r["latency_backend"] == "onnxruntime" else "*"
            lines.append(
                f"| {r['entry']} | {r['bytes_ratio']:.3f} | {r['onnx_bytes_ratio']:.3f} | {r['quality']:.4f} "
                f"({r['quality_min']:.4f}) | {r['latency']['ratio']:.2f}{star} | {r['compress_s']:.1f} | "
                f"{r['trains'] or ''} | {r['config']} |")
        lines.append("")
        b = m["best"]
        cells = [_cell(b[by][key], key) for key in ("smallest", "fastest") for by in ("regc", "peer")]
        summary.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines + summary) + "\n"


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto front: no other point is both at most as large and at least as good."""
    front, best_q = [], -math.inf
    for x, q in sorted(points, key=lambda p: (p[0], -p[1])):
        if q > best_q:
            front.append((x, q))
            best_q = q
    return front


def svg(result: dict) -> str:
    """Panels of 520 x 340 px, two per row; x: bytes ratio in [0, 1.1], y: quality from the worst entry
    (clipped at fp32 - 0.3: such entries sit on the axis, their quality in their label) to the best.
    Labels are staggered over three lines, so that entries of about the same size stay readable."""
    models = list(result["models"].items())
    w, h, pad = 520, 340, 48
    cols = 2
    rows_n = math.ceil(len(models) / cols)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * w}" height="{rows_n * h + 30}" '
           'font-family="sans-serif" font-size="10">',
           f'<rect width="{cols * w}" height="{rows_n * h + 30}" fill="white"/>',
           f'<text x="10" y="{rows_n * h + 20}" font-size="11">blue: regc, orange: peers, grey: fp32; marker '
           'area ~ latency ratio vs fp32 (onnxruntime, 1 thread; hollow: torch eager); line: Pareto front'
           '</text>']
    for i, (model, m) in enumerate(models):
        ox, oy = (i % cols) * w, (i // cols) * h
        ok = [r for r in m["entries"] if r["status"] == "ok"]
        q_hi = max([r["quality"] for r in ok] + [m["fp32_quality"]])
        q_lo = max(min(r["quality"] for r in ok), m["fp32_quality"] - 0.3)
        span = max(q_hi - q_lo, 1e-3)
        q_lo, q_hi = q_lo - 0.05 * span, q_hi + 0.05 * span

        def px(x: float, ox=ox) -> float:
            return ox + pad + (min(x, 1.1) / 1.1) * (w - pad - 12)

        def py(q: float, oy=oy, q_lo=q_lo, q_hi=q_hi) -> float:
            return oy + 22 + (1 - (max(q, q_lo) - q_lo) / (q_hi - q_lo)) * (h - pad - 22)

        x0, y0, y1 = px(0), py(q_lo), py(q_hi)
        out += [f'<text x="{ox + pad}" y="{oy + 14}" font-size="12" font-weight="bold">{html.escape(model)} '
                f'({m["metric"]})</text>',
                f'<line x1="{x0}" y1="{y0}" x2="{px(1.1)}" y2="{y0}" stroke="black"/>',
                f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>',
                f'<text x="{px(0.55)}" y="{y0 + 28}" text-anchor="middle">weight bytes / fp32</text>']
        for t in (0, 0.25, 0.5, 0.75, 1.0):
            out.append(f'<text x="{px(t)}" y="{y0 + 13}" text-anchor="middle">{t:g}</text>')
        for k in range(5):
            q = q_lo + (q_hi - q_lo) * k / 4
            out.append(f'<text x="{x0 - 4}" y="{py(q) + 3}" text-anchor="end">{q:.3f}</text>')
        front = _front([(r["bytes_ratio"], r["quality"]) for r in ok])
        out.append('<polyline fill="none" stroke="#999" stroke-dasharray="4 3" points="'
                   + " ".join(f"{px(x):.1f},{py(q):.1f}" for x, q in front) + '"/>')
        for k, r in enumerate(sorted(ok, key=lambda r: (r["bytes_ratio"], -r["quality"]))):
            color = {"regc": "#1f77b4", "peer": "#ff7f0e"}.get(r["by"], "#777")
            radius = 3 + 4 * math.sqrt(max(r["latency"]["ratio"], 0.05))
            fill = color if r["latency_backend"] == "onnxruntime" else "none"
            cx, cy = px(r["bytes_ratio"]), py(r["quality"])
            clipped = f' (q {r["quality"]:.2f})' if r["quality"] < q_lo else ""
            label = r["entry"].removeprefix("regc:") + clipped
            out += [f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{radius:.1f}" fill="{fill}" fill-opacity="0.6" '
                    f'stroke="{color}"><title>{html.escape(r["entry"])}: bytes {r["bytes_ratio"]:.3f}, '
                    f'quality {r["quality"]:.4f}, latency {r["latency"]["ratio"]:.2f}x</title></circle>',
                    f'<text x="{cx + radius + 2:.1f}" y="{cy + 3 + 9 * (k % 3 - 1):.1f}" font-size="8" '
                    f'fill="{color}">{html.escape(label)}</text>']
    return "\n".join(out + ["</svg>"]) + "\n"


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "peers.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "peers.md").write_text(markdown(result))
    (out_dir / "peers_pareto.svg").write_text(svg(result))
