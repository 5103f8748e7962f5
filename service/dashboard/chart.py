"""The tasks x versions chart as inline SVG, rendered on the server.

Two drawings of one matrix: a heatmap (a row per task, a column per version;
the cell where a task was learned shows its test accuracy, every later cell
the predicted forgetting Ω of that version) and a line chart of Ω over the
versions, one line per task. No JavaScript and no chart library: the page
works offline and under a strict Content-Security-Policy (presentation
attributes only, no inline styles). Every text is escaped: task names come
from uploads.
"""

from __future__ import annotations

import math

from markupsafe import Markup, escape

from service.dashboard.data import LineageView
from service.dashboard.omega import fmt_omega

__all__ = ["forgetting_lines_svg", "matrix_svg"]

# Colour-blind-safe palette (Okabe-Ito) for one line per task.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
LABEL_W, HEAD_H, CELL_W, CELL_H = 150, 34, 72, 34
MAX_LABEL = 22  # characters; the full name is in the row's <title>


def _short(text: str, n: int = MAX_LABEL) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> str:
    t = max(0.0, min(1.0, t))
    r, g, bl = (round(x + (y - x) * t) for x, y in zip(a, b, strict=True))
    return f"#{r:02x}{g:02x}{bl:02x}"


WHITE = (255, 255, 255)
GREEN = (26, 152, 80)  # accuracy 1.0
ORANGE = (215, 48, 39)  # Ω of OMEGA_HIGH or more
# Ω estimates a loss increase (nats per query). Its colour is on a fixed log
# scale, so a small Ω looks small even when it is the lineage's largest.
OMEGA_LOW, OMEGA_HIGH = 1e-3, 1.0


def omega_shade(value: float) -> float:
    """0 at or below OMEGA_LOW, 1 at or above OMEGA_HIGH, log-linear between."""
    if value <= OMEGA_LOW:
        return 0.0
    return min(1.0, math.log10(value / OMEGA_LOW) / math.log10(OMEGA_HIGH / OMEGA_LOW))


def matrix_svg(view: LineageView) -> Markup:
    """The heatmap: accuracy when learned (green) and predicted forgetting (orange)."""
    n, m = len(view.versions), len(view.tasks)
    width = max(LABEL_W + CELL_W * max(n, 1) + 8, LABEL_W + 440)  # room for the legend
    height = HEAD_H + CELL_H * max(m, 1) + 26
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart matrix" id="matrix-chart" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="matrix-title">',
        f'<title id="matrix-title">Tasks by versions of {escape(view.lineage)}: accuracy when '
        "learned, predicted forgetting at later versions</title>",
    ]
    for j, v in enumerate(view.versions):
        x = LABEL_W + j * CELL_W + CELL_W / 2
        mark = " ●" if v.active else (" ✗" if v.state == "failed" else "")
        out.append(
            f'<text x="{x}" y="{HEAD_H - 12}" text-anchor="middle" class="col-head '
            f'state-{escape(v.state)}" data-version="{v.number}">v{v.number}{mark}</text>'
        )
    names = [t.name for t in view.tasks]
    for i, t in enumerate(view.tasks):
        y = HEAD_H + i * CELL_H
        # A task resubmitted after a failed version has two rows: say which is which.
        label = _short(t.name) + (f" (v{t.learned_by})" if names.count(t.name) > 1 else "")
        out.append(
            f'<g class="task-row" data-task="{escape(t.name)}" data-learned-by="{t.learned_by}">'
            f"<title>{escape(t.name)}</title>"
            f'<text x="{LABEL_W - 8}" y="{y + CELL_H / 2 + 4}" text-anchor="end" '
            f'class="row-head">{escape(label)}</text></g>'
        )
        for j, cell in enumerate(t.cells):
            if cell is None:
                continue
            x = LABEL_W + j * CELL_W
            if cell.kind == "learned" and cell.value is not None:
                fill, label = _mix(WHITE, GREEN, cell.value), f"{cell.value:.3f}"
                tip = f"{t.name}: test accuracy {cell.value:.4f} when learned by v{view.versions[j].number}"
            elif cell.kind == "forgetting" and cell.value is not None:
                fill, label = _mix(WHITE, ORANGE, omega_shade(cell.value)), fmt_omega(cell.value)
                tip = f"{t.name}: predicted forgetting Ω = {cell.value:.4g} at v{view.versions[j].number}"
            else:
                fill, label, tip = "#f2f2f2", "–", f"{t.name}: not recorded"
            ink = "#ffffff" if fill != "#f2f2f2" and _dark(fill) else "#222222"
            # A failed version never served: its column is drawn faded.
            fade = ' opacity="0.5"' if view.versions[j].state == "failed" else ""
            out.append(
                f'<g class="cell cell-{cell.kind}" data-task="{escape(t.name)}"{fade} '
                f'data-version="{view.versions[j].number}"><title>{escape(tip)}</title>'
                f'<rect x="{x + 1}" y="{y + 1}" width="{CELL_W - 2}" height="{CELL_H - 2}" '
                f'rx="3" fill="{fill}"/>'
                f'<text x="{x + CELL_W / 2}" y="{y + CELL_H / 2 + 4}" text-anchor="middle" '
                f'fill="{ink}">{escape(label)}</text></g>'
            )
    if not view.tasks:
        out.append(
            f'<text x="{LABEL_W}" y="{HEAD_H + 20}" class="empty">no task learned yet</text>'
        )
    legend_y = height - 8
    out.append(
        f'<rect x="{LABEL_W}" y="{legend_y - 10}" width="12" height="12" fill="{_mix(WHITE, GREEN, 0.8)}"/>'
        f'<text x="{LABEL_W + 16}" y="{legend_y}" class="legend">accuracy when learned</text>'
        f'<rect x="{LABEL_W + 170}" y="{legend_y - 10}" width="12" height="12" '
        f'fill="{_mix(WHITE, ORANGE, 0.8)}"/>'
        f'<text x="{LABEL_W + 186}" y="{legend_y}" class="legend">predicted forgetting Ω '
        f"(log, {OMEGA_LOW:g}–{OMEGA_HIGH:g})</text>"
    )
    out.append("</svg>")
    return Markup("".join(out))


def _dark(hex_colour: str) -> bool:
    r, g, b = (int(hex_colour[k : k + 2], 16) for k in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b < 140


def forgetting_lines_svg(view: LineageView) -> Markup:
    """Ω of each task over the versions after it was learned (0 where it was learned)."""
    width, height = 520, 220
    left, right, top_pad, bottom = 56, 150, 14, 34
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    n = len(view.versions)
    top = view.max_forgetting or 1.0

    def px(j: int) -> float:
        return left + (plot_w * j / (n - 1) if n > 1 else plot_w / 2)

    def py(value: float) -> float:
        return top_pad + plot_h * (1 - value / top)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart lines" id="forgetting-chart" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="lines-title">',
        f'<title id="lines-title">Predicted forgetting Ω of each task of '
        f"{escape(view.lineage)} over its versions</title>",
        f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" '
        f'y2="{top_pad + plot_h}" class="axis"/>',
        f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" class="axis"/>',
        f'<text x="{left - 6}" y="{top_pad + 4}" text-anchor="end" class="tick">{fmt_omega(top)}</text>',
        f'<text x="{left - 6}" y="{top_pad + plot_h + 4}" text-anchor="end" class="tick">0</text>',
        f'<text x="12" y="{top_pad + plot_h / 2}" class="axis-label" '
        f'transform="rotate(-90 12 {top_pad + plot_h / 2})" text-anchor="middle">Ω</text>',
    ]
    for j, v in enumerate(view.versions):
        out.append(
            f'<text x="{px(j)}" y="{height - bottom + 16}" text-anchor="middle" '
            f'class="tick">v{v.number}</text>'
        )
    for i, t in enumerate(view.tasks):
        colour = PALETTE[i % len(PALETTE)]
        # The line follows versions that served or may serve; a failed version's
        # value is a hollow dot off the line (its successors descend from its parent).
        points, stray = [], []
        for j, cell in enumerate(t.cells):
            if cell is None:
                continue
            if cell.kind == "learned" or (cell.kind == "none" and not points):
                point = (px(j), py(0.0))  # Ω is 0 at the task's own anchor
            elif cell.kind == "forgetting" and cell.value is not None:
                point = (px(j), py(cell.value))
            else:
                continue
            failed = view.versions[j].state == "failed" and cell.kind != "learned"
            (stray if failed else points).append(point)
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(
            f'<g class="series" data-task="{escape(t.name)}" data-learned-by="{t.learned_by}">'
            f"<title>{escape(t.name)}</title>"
        )
        if len(points) > 1:
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
        for x, y in points:
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"/>')
        for x, y in stray:
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="#ffffff" stroke="{colour}" '
                'stroke-width="1.5"/>'
            )
        ly = top_pad + 6 + i * 18
        out.append(
            f'<rect x="{left + plot_w + 14}" y="{ly - 9}" width="12" height="4" fill="{colour}"/>'
            f'<text x="{left + plot_w + 32}" y="{ly - 3}" class="legend">'
            f"{escape(_short(t.name, 16))}</text></g>"
        )
    if not any(c and c.kind == "forgetting" for t in view.tasks for c in t.cells):
        out.append(
            f'<text x="{left + 10}" y="{top_pad + plot_h / 2}" class="empty">'
            "no later version yet: nothing forgotten</text>"
        )
    out.append("</svg>")
    return Markup("".join(out))
