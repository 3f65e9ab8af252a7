"""Inline SVG charts for ``report.html``, drawn from numbers alone (no plotting library, no script).

Every chart maps data to pixels linearly: ``px = x0 + (v - lo) / (hi - lo) * width``; bar charts
start at zero, scatter axes pad the data range by 10% each side.
"""

from __future__ import annotations

from html import escape

__all__ = ["bar_chart", "histogram_pair", "scatter"]

_FONT = 'font-family="sans-serif" font-size="11"'
BEFORE, AFTER = "#9aa5b1", "#1f6feb"


def _svg(w: int, h: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>'
            f'<rect width="{w}" height="{h}" fill="#fff"/>' + "".join(body) + "</svg>")


def _text(x: float, y: float, s: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {_FONT} {extra}>{escape(s)}</text>'


def bar_chart(items: list[tuple[str, float]], title: str, fmt: str = "{:.3g}", width: int = 640) -> str:
    """Horizontal bars, one per (label, value >= 0), labelled with the value."""
    label_w, row, top = 180, 18, 26
    h = top + row * len(items) + 8
    plot_w = width - label_w - 70
    hi = max((v for _, v in items), default=0.0) or 1.0
    body = [_text(8, 16, title, extra='font-weight="bold"')]
    for i, (label, v) in enumerate(items):
        y = top + i * row
        w = max(v, 0.0) / hi * plot_w
        body.append(_text(label_w - 6, y + 12, label[-28:], "end"))
        body.append(f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="{AFTER}"/>')
        body.append(_text(label_w + w + 4, y + 12, fmt.format(v)))
    return _svg(width, h, body, title)


def histogram_pair(hist: dict, title: str, width: int = 300, height: int = 150) -> str:
    """Two histograms on shared bins ``{"lo", "hi", "before": counts, "after": counts}``: the
    original's as grey bars, the compiled one's as a blue outline; each scaled to its own peak."""
    x0, y0, pw, ph = 8, 22, width - 16, height - 44
    body = [_text(8, 14, title, extra='font-weight="bold"'),
            f'<line x1="{x0}" y1="{y0 + ph}" x2="{x0 + pw}" y2="{y0 + ph}" stroke="#333"/>']
    for key, color in (("before", BEFORE), ("after", AFTER)):
        counts = hist.get(key) or []
        if not counts:
            continue
        peak, bw = max(max(counts), 1), pw / len(counts)
        if key == "before":
            for i, c in enumerate(counts):
                bh = c / peak * ph
                body.append(f'<rect x="{x0 + i * bw:.1f}" y="{y0 + ph - bh:.1f}" width="{bw:.1f}" '
                            f'height="{bh:.1f}" fill="{color}"/>')
        else:
            pts = []
            for i, c in enumerate(counts):
                y = y0 + ph - c / peak * ph
                pts += [f"{x0 + i * bw:.1f},{y:.1f}", f"{x0 + (i + 1) * bw:.1f},{y:.1f}"]
            body.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" '
                        'stroke-width="1.5"/>')
    body.append(_text(x0, height - 8, f"{hist.get('lo', 0):.3g}"))
    body.append(_text(x0 + pw, height - 8, f"{hist.get('hi', 0):.3g}", "end"))
    body.append(_text(x0 + pw / 2, height - 8, "grey: before, blue: after", "middle"))
    return _svg(width, height, body, title)


def scatter(points: list[tuple[str, float, float, float]], title: str, xlabel: str, ylabel: str,
            width: int = 420, height: int = 300) -> str:
    """Labelled points (label, x, y, radius in px)."""
    x0, y0, pw, ph = 60, 28, width - 90, height - 80

    def span(vals: list[float]) -> tuple[float, float]:
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad

    (xl, xh), (yl, yh) = span([p[1] for p in points]), span([p[2] for p in points])
    body = [_text(8, 16, title, extra='font-weight="bold"'),
            f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>',
            _text(x0 + pw / 2, height - 12, xlabel, "middle"),
            _text(14, y0 + ph / 2, ylabel, "middle", f'transform="rotate(-90 14 {y0 + ph / 2})"'),
            _text(x0, y0 + ph + 14, f"{xl:.4g}"), _text(x0 + pw, y0 + ph + 14, f"{xh:.4g}", "end"),
            _text(x0 - 4, y0 + ph, f"{yl:.4g}", "end"), _text(x0 - 4, y0 + 10, f"{yh:.4g}", "end")]
    for i, (label, x, y, r) in enumerate(points):
        px = x0 + (x - xl) / (xh - xl) * pw
        py = y0 + ph - (y - yl) / (yh - yl) * ph
        color = BEFORE if i == 0 else AFTER
        body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{r:.1f}" fill="{color}" fill-opacity="0.7"/>')
        anchor = "start" if px < x0 + pw / 3 else "end" if px > x0 + 2 * pw / 3 else "middle"
        body.append(_text(px, py - r - 4, label, anchor))
    return _svg(width, height, body, title)
