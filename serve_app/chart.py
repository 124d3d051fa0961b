"""The SVG line chart of the pages: running bpb against bytes on a log axis, as path data the templates draw.
static/live.js draws the live curve of a running submission with the same geometry."""

from __future__ import annotations

import math
from typing import Any

from prism_ray.evaluation.scoring import CurvePoint
from serve_app.rendering import format_bytes

CHART_WIDTH, CHART_HEIGHT = 720, 300
CHART_MARGIN = {"left": 52, "right": 16, "top": 12, "bottom": 30}


def line_chart(series: list[tuple[str, list[CurvePoint]]], tags: list[str] | None = None) -> dict[str, Any]:
    """bpb against bytes on a log axis (curves fall steeply early), as SVG path data; no paths when no points.

    Several series stay apart even where they coincide: each has its own colour and dash pattern, `tags` (e.g.
    "#1") label each curve's last point, stacked when those points meet, and a series drawn exactly like an earlier
    one says so (`same_as`), for the legend."""
    chart: dict[str, Any] = {"width": CHART_WIDTH, "height": CHART_HEIGHT, "margin": CHART_MARGIN, "paths": [],
                             "x_ticks": [], "y_ticks": []}
    cleaned = [(label, drawable(points)) for label, points in series]
    every = [point for _, points in cleaned for point in points]
    if not every:
        return chart
    x_lo, x_hi = min(x for x, _ in every), max(x for x, _ in every)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo / 2, x_hi * 2
    y_ticks = _linear_ticks(min(y for _, y in every), max(y for _, y in every))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    margin = CHART_MARGIN
    plot_w = CHART_WIDTH - margin["left"] - margin["right"]
    plot_h = CHART_HEIGHT - margin["top"] - margin["bottom"]

    def x_at(value: float) -> float:
        return round(margin["left"] + (math.log(value / x_lo)) / math.log(x_hi / x_lo) * plot_w, 1)

    def y_at(value: float) -> float:
        return round(margin["top"] + (y_hi - value) / (y_hi - y_lo) * plot_h, 1)

    placed: list[tuple[float, float]] = []
    for index, (label, points) in enumerate(cleaned):
        if not points:
            continue
        last = (x_at(points[-1][0]), y_at(points[-1][1]))
        tag_at = (last[0] - 6, last[1] - 6)
        while any(abs(tag_at[0] - x) < 28 and abs(tag_at[1] - y) < 12 for x, y in placed):
            tag_at = (tag_at[0], tag_at[1] - 12)  # above the tag already there (curves end low): both readable
        placed.append(tag_at)
        same_as = next((cleaned[earlier][0] for earlier in range(index) if cleaned[earlier][1] == points), None)
        chart["paths"].append({"label": label, "index": index, "tag": tags[index] if tags else None,
                               "d": "M" + " L".join(f"{x_at(x)},{y_at(y)}" for x, y in points), "last": last,
                               "tag_at": tag_at, "same_as": same_as})
    chart["x_ticks"] = [(x_at(tick), format_bytes(tick)) for tick in _log_ticks(x_lo, x_hi)]
    chart["y_ticks"] = [(y_at(tick), f"{tick:g}") for tick in y_ticks]
    return chart


def drawable(points: list[CurvePoint]) -> list[tuple[float, float]]:
    """(bytes, bpb) pairs a log axis can show: positive bytes, a finite bpb (NaN is stored as null)."""
    return [(p.bytes, p.bpb) for p in points if p.bytes > 0 and p.bpb is not None and math.isfinite(p.bpb)]


def _linear_ticks(low: float, high: float) -> list[float]:
    """Round ticks (1, 2 or 5 × 10^k apart) covering [low, high]; the first and last are the axis ends."""
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step)
    return [round((start + i) * step, 10) for i in range(math.ceil(high / step) - start + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 × 10^k inside [low, high]; only the powers of ten once there are too many; the ends if none fit."""
    ticks = [m * 10**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             for m in (1, 2, 5) if low <= m * 10**k <= high]
    if len(ticks) > 8:
        return [tick for tick in ticks if math.log10(tick).is_integer()]
    return ticks or [low, high]
