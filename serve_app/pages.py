"""The web pages (docs/web.md): leaderboard, submission and queue, rendered on the server from the same Backend as the
JSON API, so every table works without JavaScript; static/live.js only refreshes them.

Names, reasons and messages come from miners and are hostile: they reach the HTML only through Jinja's autoescape,
and every page carries a Content-Security-Policy that runs no script but our own static file.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from prism_ray.leaderboard import epoch_of
from prism_ray.store import TERMINAL_STATUSES, SubmissionRecord
from serve_app.backend import Backend

HERE = Path(__file__).parent
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
LEADERBOARD_CURVES = 5
CHART_POINTS = 200
QUEUE_LIMIT = 200
# Chart geometry; static/live.js draws the live curve with the same numbers.
CHART_WIDTH, CHART_HEIGHT = 720, 300
CHART_MARGIN = {"left": 52, "right": 16, "top": 12, "bottom": 30}


def static_files() -> StaticFiles:
    return StaticFiles(directory=HERE / "static")


def router(backend: Backend) -> APIRouter:
    pages = APIRouter(include_in_schema=False)

    @pages.get("/", response_class=HTMLResponse)
    def leaderboard_page(epoch: Annotated[int | None, Query(ge=0, le=2**53)] = None) -> HTMLResponse:
        entries = backend.leaderboard(epoch)
        top = entries[:LEADERBOARD_CURVES]
        chart = line_chart([(f"#{entry.rank} {entry.name or entry.submission_id}",
                             backend.curve(entry.submission_id)) for entry in top])
        return render("leaderboard.html", entries=entries, chart=chart, epoch=epoch,
                      current_epoch=epoch_of(time.time(), backend.settings.scoring))

    @pages.get("/submissions/{submission_id}", response_class=HTMLResponse)
    def submission_page(submission_id: Annotated[str, PathParam(min_length=1, max_length=128)]) -> HTMLResponse:
        record = backend.get_submission(submission_id)
        if record is None:
            return render("not_found.html", status_code=404, submission_id=submission_id)
        runs = backend.runs(submission_id)
        run = runs[-1] if runs else {}
        report = run.get("report") or {}
        progress = _progress(run, report, backend.settings.byte_budget)
        points = backend.curve(submission_id)
        if not points and progress["bytes_scored"] and progress["running_bpb"] is not None:
            points = [{"bytes": progress["bytes_scored"], "bpb": progress["running_bpb"]}]  # live: latest heartbeat
        chart = line_chart([("running bpb", points)])
        return render("submission.html", record=record, report=report, progress=progress, chart=chart,
                      live_points=json.dumps(_thin(_drawable(points), CHART_POINTS)),
                      events=backend.events(submission_id), terminal=record.status in TERMINAL_STATUSES)

    @pages.get("/queue", response_class=HTMLResponse)
    def queue_page() -> HTMLResponse:
        records = sorted(backend.queue(QUEUE_LIMIT), key=lambda record: (record.status != "running", record.seq))
        rows = [(record, _progress(_last_run(backend, record), {}, backend.settings.byte_budget))
                for record in records]
        return render("queue.html", rows=rows, stats=backend.stats(), audits=backend.audits(QUEUE_LIMIT))

    return pages


def _last_run(backend: Backend, record: SubmissionRecord) -> dict[str, Any]:
    runs = backend.runs(record.id) if record.status == "running" else []
    return runs[-1] if runs else {}


def _progress(run: dict[str, Any], report: dict[str, Any], byte_budget: int) -> dict[str, Any]:
    """The report's final numbers once the run ended with one, else its latest heartbeat."""
    def first(*values: Any) -> Any:
        return next((value for value in values if value is not None), None)

    return {"bytes_scored": first(report.get("bytes_scored"), run.get("progress_bytes")),
            "byte_budget": first(report.get("byte_budget"), byte_budget or None),
            "running_bpb": first(report.get("bpb"), run.get("progress_bpb")),
            "tokens_per_second": first(report.get("tokens_per_second"), run.get("tokens_per_second")),
            "updated_at": first(run.get("finished_at"), run.get("progress_at")), "node": run.get("node")}


# --- rendering ----------------------------------------------------------------------------------------------------

def _format_number(value: Any, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:,.{digits}f}"


def _format_bytes(value: Any) -> str:
    if value is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def _format_time(value: Any) -> str:
    return "—" if value is None else datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _short_hotkey(hotkey: str) -> str:
    return hotkey if len(hotkey) <= 16 else f"{hotkey[:6]}…{hotkey[-5:]}"


def _event_detail(detail: dict[str, Any]) -> str:
    """One line of an event's detail; reasons are shown in full elsewhere, so only their rules here."""
    parts = []
    for key, value in detail.items():
        if value in (None, "", [], {}):
            continue
        if key == "reasons" and isinstance(value, list):
            value = ", ".join(str(reason.get("rule")) for reason in value if isinstance(reason, dict))
        elif key.endswith("_at") and isinstance(value, int | float):
            value = _format_time(value)
        elif isinstance(value, float):
            value = _format_number(value)
        elif not isinstance(value, str | int):
            value = json.dumps(value)
        parts.append(f"{key}: {value}")
    return " · ".join(parts)[:300]


_ENV = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True)
_ENV.filters.update(number=_format_number, bytes=_format_bytes, utc=_format_time, short_hotkey=_short_hotkey,
                    event_detail=_event_detail)


def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = _ENV.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


# --- the SVG chart ------------------------------------------------------------------------------------------------

def line_chart(series: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """bpb against bytes on a log axis (curves fall steeply early), as SVG path data; no paths when no points."""
    chart: dict[str, Any] = {"width": CHART_WIDTH, "height": CHART_HEIGHT, "margin": CHART_MARGIN, "paths": [],
                             "x_ticks": [], "y_ticks": []}
    cleaned = [(label, _thin(_drawable(points), CHART_POINTS)) for label, points in series]
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

    chart["paths"] = [{"label": label, "d": "M" + " L".join(f"{x_at(x)},{y_at(y)}" for x, y in points),
                       "last": (x_at(points[-1][0]), y_at(points[-1][1]))} for label, points in cleaned if points]
    chart["x_ticks"] = [(x_at(tick), _format_bytes(tick)) for tick in _log_ticks(x_lo, x_hi)]
    chart["y_ticks"] = [(y_at(tick), f"{tick:g}") for tick in y_ticks]
    return chart


def _drawable(points: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(bytes, bpb) pairs a log axis can show: positive bytes, a finite bpb (NaN is stored as null)."""
    return [(p["bytes"], p["bpb"]) for p in points
            if p["bytes"] > 0 and p["bpb"] is not None and math.isfinite(p["bpb"])]


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


def _thin(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    """About `limit` points evenly spaced on the log axis (a linear thinning starves the steep start); the first
    and the last always kept."""
    if len(points) <= limit:
        return points
    step = math.log(points[-1][0] / points[0][0]) / limit
    kept = [points[0]]
    for point in points[1:-1]:
        if math.log(point[0] / kept[-1][0]) >= step:
            kept.append(point)
    return [*kept, points[-1]]
