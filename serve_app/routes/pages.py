"""The web pages (docs/web.md): leaderboard, submission and queue, rendered on the server from the same read model
as the JSON API, so every table works without JavaScript; static/live.js only refreshes them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from prism_ray.backend import Backend
from prism_ray.leaderboard import epoch_of
from prism_ray.store import TERMINAL_STATUSES
from serve_app import views
from serve_app.chart import drawable, line_chart
from serve_app.rendering import page, render_html

STATIC = Path(__file__).parents[1] / "static"
LEADERBOARD_CURVES = 5


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC)


def router(backend: Backend) -> APIRouter:
    pages = APIRouter(include_in_schema=False)

    @pages.get("/", response_class=HTMLResponse)
    def leaderboard_page(epoch: Annotated[int | None, Query(ge=0, le=2**53)] = None) -> HTMLResponse:
        # Rendered once per change of the board (and of the current epoch, which the page links to).
        current = epoch_of(time.time(), backend.settings.scoring)
        return page(backend.reads.cached(("board", "page", epoch, current),
                                         lambda: _leaderboard(backend, epoch, current)))

    @pages.get("/submissions/{submission_id}", response_class=HTMLResponse)
    def submission_page(submission_id: Annotated[str, PathParam(min_length=1, max_length=128)]) -> HTMLResponse:
        detail = backend.detail(submission_id)
        if detail is None:
            return page(render_html("not_found.html", submission_id=submission_id), status_code=404)
        record = detail.record
        run = detail.runs[-1] if detail.runs else {}
        report = run.get("report") or {}
        progress = views.progress(backend, run, report)
        points = backend.curve(submission_id)
        if not points and progress.bytes_scored and progress.running_bpb is not None:
            points = [{"bytes": progress.bytes_scored, "bpb": progress.running_bpb}]  # live: latest heartbeat
        return page(render_html("submission.html", record=record, report=report, progress=progress,
                                chart=line_chart([("running bpb", points)]),
                                live_points=json.dumps(drawable(points)), events=detail.events,
                                terminal=record.status in TERMINAL_STATUSES))

    @pages.get("/queue", response_class=HTMLResponse)
    def queue_page() -> HTMLResponse:
        return page(render_html("queue.html", queue=views.queue(backend)))

    return pages


def _leaderboard(backend: Backend, epoch: int | None, current_epoch: int) -> str:
    entries = backend.leaderboard(epoch)
    chart = line_chart([(f"#{entry.rank} {entry.name or entry.submission_id}", backend.curve(entry.submission_id))
                        for entry in entries[:LEADERBOARD_CURVES]])
    return render_html("leaderboard.html", entries=entries, chart=chart, epoch=epoch,
                       current_epoch=current_epoch)
