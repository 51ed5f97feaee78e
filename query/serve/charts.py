"""Charts as inline SVG built on the server: a histogram, a line chart over steps and a heatmap whose cells carry
their value and pair on hover (`<title>`) and open the pair on click (`<a>`). No JavaScript, so the page's
Content-Security-Policy can forbid scripts altogether."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, PAD = 420, 160, 32


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.4g}"


def histogram(counts: Sequence[int], edges: Sequence[float], label: str) -> Markup:
    """Bars of `counts` between `edges` (len(counts) + 1); each bar's hover names its range and count."""
    if not counts:
        return Markup("")
    top = max(max(counts), 1)
    w = (WIDTH - 2 * PAD) / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = (HEIGHT - 2 * PAD) * (math.log1p(c) / math.log1p(top))  # log heights: the tail stays visible
        x, y = PAD + i * w, HEIGHT - PAD - h
        tip = f"[{_fmt(edges[i])}, {_fmt(edges[i + 1])}): {c} tokens"
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w - 1, 1):.1f}" height="{h:.1f}" class="bar">'
            f"<title>{escape(tip)}</title></rect>"
        )
    axis = (
        f'<text x="{PAD}" y="{HEIGHT - 8}" class="tick">{escape(_fmt(edges[0]))}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" class="tick" text-anchor="end">{escape(_fmt(edges[-1]))}</text>'
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" class="tick" text-anchor="middle">{escape(label)}</text>'
    )
    return Markup(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}">'
        + "".join(bars)
        + axis
        + "</svg>"
    )


@dataclass(frozen=True)
class Series:
    name: str
    points: list[tuple[float, float | None]]  # (x, y); y None is a gap
    links: list[str | None] | None = None  # the page each point opens


def line_chart(series: Sequence[Series], x_label: str, y_label: str, y_max: float | None = None) -> Markup:
    """Lines over a shared x axis (steps); each point's hover shows its series, x and y, and links where given.
    The y axis runs from min(0, lowest) to `y_max` (default: the highest value)."""
    xs = [x for s in series for x, _y in s.points]  # every step on the axis, also those without a value
    ys = [y for s in series for _x, y in s.points if y is not None and math.isfinite(y)]
    if not xs or not ys:
        return Markup("")
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(min(ys), 0.0), max(max(ys), 1e-9) if y_max is None else max(max(ys), y_max)

    def px(x: float) -> float:
        return PAD + (WIDTH - 2 * PAD) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def py(y: float) -> float:
        return HEIGHT - PAD - (HEIGHT - 2 * PAD) * (y - y0) / (y1 - y0)

    parts = []
    for k, s in enumerate(series):
        shown = [(x, y) for x, y in s.points if y is not None and math.isfinite(y)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in shown)
        parts.append(f'<polyline points="{path}" class="line s{k % 4}"/>')
        for i, (x, y) in enumerate(s.points):
            if y is None or not math.isfinite(y):
                continue
            dot = (
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" class="dot s{k % 4}">'
                f"<title>{escape(f'{s.name}: {x_label} {x:g}, {y_label} {_fmt(y)}')}</title></circle>"
            )
            link = s.links[i] if s.links else None
            parts.append(f'<a href="{escape(link)}">{dot}</a>' if link else dot)
    legend = "".join(
        f'<text x="{PAD + 4}" y="{14 + 12 * k}" class="tick s{k % 4}">{escape(s.name)}</text>'
        for k, s in enumerate(series)
    )
    axis = (
        f'<text x="{PAD}" y="{HEIGHT - 8}" class="tick">{escape(_fmt(x0))}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" class="tick" text-anchor="end">{escape(_fmt(x1))}</text>'
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" class="tick" text-anchor="middle">{escape(x_label)}</text>'
        f'<text x="{WIDTH - 6}" y="14" class="tick" text-anchor="end">{escape(y_label)}</text>'
        f'<text x="4" y="{PAD}" class="tick">{escape(_fmt(y1))}</text>'
        f'<text x="4" y="{HEIGHT - PAD}" class="tick">{escape(_fmt(y0))}</text>'
    )
    return Markup(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(y_label)} over {escape(x_label)}">' + "".join(parts) + legend + axis + "</svg>"
    )


def heatmap(labels: Sequence[str], values: dict[tuple[int, int], float], links: dict[tuple[int, int], str]) -> Markup:
    """A square matrix over `labels`; cell (i, j) is coloured by its value in [0, 1], names the pair and value on
    hover and opens `links[(i, j)]` on click."""
    n = len(labels)
    if n == 0:
        return Markup("")
    cell, left, top = 28, 120, 110
    size_w, size_h = left + n * cell + 8, top + n * cell + 8
    parts = []
    for i, name in enumerate(labels):
        parts.append(
            f'<text x="{left - 4}" y="{top + i * cell + cell * 0.65:.1f}" class="tick" text-anchor="end">'
            f"{escape(name)}</text>"
        )
        x = left + i * cell + cell * 0.6
        parts.append(
            f'<text x="{x:.1f}" y="{top - 4}" class="tick" transform="rotate(-60 {x:.1f} {top - 4})">'
            f"{escape(name)}</text>"
        )
    for (i, j), value in values.items():
        shade = 0.0 if value is None or not math.isfinite(value) else max(0.0, min(1.0, value))
        light = 95 - 60 * shade
        tip = f"{labels[i]} vs {labels[j]}: {_fmt(value)}"
        rect = (
            f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell - 1}" height="{cell - 1}" '
            f'fill="hsl(215,70%,{light:.0f}%)"><title>{escape(tip)}</title></rect>'
        )
        link = links.get((i, j))
        parts.append(f'<a href="{escape(link)}" aria-label="{escape(tip)}">{rect}</a>' if link else rect)
    return Markup(
        f'<svg class="heatmap" viewBox="0 0 {size_w} {size_h}" width="{size_w}" height="{size_h}" role="img" '
        f'aria-label="similarity heatmap">' + "".join(parts) + "</svg>"
    )
