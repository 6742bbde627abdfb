"""Small SVG plots built from numbers: grouped bars and lines, with axes, ticks, a legend and a
tooltip (``<title>``) on every mark. Enough for a report; no plotting library needed."""

from __future__ import annotations

import math
from html import escape

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
HEIGHT, TOP, BOTTOM, LEFT, RIGHT = 260, 16, 48, 52, 12
BAR, GAP = 18, 22


def nice_max(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2, 2.5 or 5 times a power of ten)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value)


def palette(names: list[str], colours: dict[str, str] | None = None) -> dict[str, str]:
    """A colour for each name: the one ``colours`` gives it (so a model keeps its colour from plot to
    plot, whichever models a plot shows), else the next unused one."""
    chosen = dict(colours or {})
    spare = [c for c in COLOURS if c not in chosen.values()] or list(COLOURS)
    for name in names:
        if name not in chosen:
            chosen[name] = spare.pop(0) if spare else COLOURS[len(chosen) % len(COLOURS)]
    return {name: chosen[name] for name in names}


def bar_chart(title: str, categories: list[str], series: dict[str, list[float | None]],
              percent: bool = True, colours: dict[str, str] | None = None) -> str:
    """Grouped bars: one cluster per category, one bar per series; None draws no bar."""
    colours = palette(list(series), colours)
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    top = 1.0 if percent else nice_max(max(values, default=1.0))
    cluster = max(1, len(series)) * BAR + GAP
    width = LEFT + RIGHT + max(1, len(categories)) * cluster
    plot_h = HEIGHT - TOP - BOTTOM
    parts = _y_axis(top, width, plot_h, percent)
    for c, category in enumerate(categories):
        x0 = LEFT + c * cluster + GAP / 2
        parts.append(f"<text x='{x0 + (cluster - GAP) / 2:.1f}' y='{HEIGHT - BOTTOM + 16}' "
                     f"text-anchor='middle' font-size='11'>{escape(_short(category))}</text>")
        for s, (name, vs) in enumerate(series.items()):
            value = vs[c]
            if value is None or not math.isfinite(value):
                continue
            h = plot_h * min(value, top) / top
            shown = f"{100 * value:.1f}%" if percent else f"{value:.4g}"
            parts.append(f"<rect x='{x0 + s * BAR:.1f}' y='{TOP + plot_h - h:.1f}' width='{BAR - 2}' "
                         f"height='{max(h, 0.5):.1f}' fill='{colours[name]}'>"
                         f"<title>{escape(name)} · {escape(category)}: {shown}</title></rect>")
    return _figure(title, width, parts, colours)


def line_chart(title: str, curves: dict[str, list[list[float]]], x_label: str = "", y_label: str = "",
               colours: dict[str, str] | None = None, dashed: frozenset[str] = frozenset()) -> str:
    """Lines through ``[[x, y], ...]`` points, one per curve, on shared axes starting at 0; the
    curves named in ``dashed`` are drawn dashed."""
    colours = palette(list(curves), colours)
    points = [p for curve in curves.values() for p in curve]
    x_top = nice_max(max((p[0] for p in points), default=1.0))
    y_top = nice_max(max((p[1] for p in points), default=1.0))
    width, plot_h = 520, HEIGHT - TOP - BOTTOM
    plot_w = width - LEFT - RIGHT
    parts = _y_axis(y_top, width, plot_h, percent=False)
    for i in range(5):
        x = LEFT + plot_w * i / 4
        parts.append(f"<text x='{x:.1f}' y='{HEIGHT - BOTTOM + 16}' text-anchor='middle' font-size='11'>"
                     f"{x_top * i / 4:g}</text>")
    parts.append(f"<text x='{LEFT + plot_w / 2:.1f}' y='{HEIGHT - 8}' text-anchor='middle' font-size='11'>"
                 f"{escape(x_label)}</text>")
    parts.append(f"<text x='12' y='{TOP + plot_h / 2:.1f}' font-size='11' transform='rotate(-90 12 "
                 f"{TOP + plot_h / 2:.1f})' text-anchor='middle'>{escape(y_label)}</text>")
    for name, curve in curves.items():
        coords = " ".join(f"{LEFT + plot_w * x / x_top:.1f},{TOP + plot_h * (1 - y / y_top):.1f}"
                          for x, y in curve)
        dash = " stroke-dasharray='5 3'" if name in dashed else ""
        if curve:
            parts.append(f"<polyline points='{coords}' fill='none' stroke='{colours[name]}' stroke-width='1.8'"
                         f"{dash}><title>{escape(name)}: last {curve[-1][1]:.4g}</title></polyline>")
    return _figure(title, width, parts, colours)


def compact(value: float) -> str:
    """A short tick label: 0.25, 7.5, 120, 12.5k, 3M."""
    for limit, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _y_axis(top: float, width: float, plot_h: float, percent: bool) -> list[str]:
    parts = []
    for i in range(5):
        value = top * i / 4
        y = TOP + plot_h * (1 - i / 4)
        label = f"{100 * value:.0f}%" if percent else compact(value)
        parts.append(f"<line x1='{LEFT}' x2='{width - RIGHT}' y1='{y:.1f}' y2='{y:.1f}' stroke='#e5e5e5'/>"
                     f"<text x='{LEFT - 6}' y='{y + 4:.1f}' text-anchor='end' font-size='11'>{label}</text>")
    parts.append(f"<line x1='{LEFT}' x2='{LEFT}' y1='{TOP}' y2='{TOP + plot_h}' stroke='#999'/>")
    return parts


def _figure(title: str, width: float, parts: list[str], colours: dict[str, str]) -> str:
    legend = "".join(f"<span style='margin-right:1em'><span style='display:inline-block;width:10px;"
                     f"height:10px;background:{colour};margin-right:4px'></span>"
                     f"{escape(name)}</span>"
                     for name, colour in colours.items())
    svg = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{HEIGHT}' "
           f"viewBox='0 0 {width:.0f} {HEIGHT}' role='img' aria-label='{escape(title, quote=True)}'>"
           + "".join(parts) + "</svg>")
    return f"<figure><figcaption>{escape(title)}</figcaption>{svg}<div class='legend'>{legend}</div></figure>"


def _short(text: str, limit: int = 14) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
