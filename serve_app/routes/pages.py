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

from prism_ray.backend.store_backend import Backend
from prism_ray.evaluation.scoring import CurvePoint
from prism_ray.ranking.leaderboard import epoch_of
from prism_ray.store import TERMINAL_STATUSES, TimelineEvent
from serve_app import views
from serve_app.chart import drawable, line_chart
from serve_app.models import ComputeProfile
from serve_app.rendering import format_number, format_span, page, render_html

STATIC = Path(__file__).parents[1] / "static"
LEADERBOARD_CURVES = 5


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC)


QUEUE_AUDITS = 100  # audits (and replicas) listed on the queue page


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
        run = detail.runs[-1] if detail.runs else None
        # The template reads the report's JSON spelling, as report.json holds it.
        report = run.report.model_dump(mode="json") if run and run.report else {}
        progress = views.progress(backend, run)
        points = backend.curve(submission_id)
        if not points and progress.bytes_scored and progress.running_bpb is not None:
            points = [CurvePoint(bytes=progress.bytes_scored, bpb=progress.running_bpb)]  # live: latest heartbeat
        against = backend.verdict(submission_id) if record.status == "completed" else None
        return page(render_html("submission.html", record=record, report=report, progress=progress, against=against,
                                profile=profile_facts(views.profile(backend, run)) if report else [],
                                retries=retries(detail.events), chart=line_chart([("running bpb", points)]),
                                live_points=json.dumps(drawable(points)), events=_readable(backend, detail.events),
                                terminal=record.status in TERMINAL_STATUSES))

    @pages.get("/queue", response_class=HTMLResponse)
    def queue_page() -> HTMLResponse:
        return page(render_html("queue.html", queue=views.queue(backend), audits=backend.audits(QUEUE_AUDITS),
                                replicas=backend.replicas(QUEUE_AUDITS)))

    return pages


def _leaderboard(backend: Backend, epoch: int | None, current_epoch: int) -> str:
    entries = backend.leaderboard(epoch)
    top = entries[:LEADERBOARD_CURVES]
    chart = line_chart([(f"#{entry.rank} {entry.name or entry.submission_id}", backend.curve(entry.submission_id))
                        for entry in top], tags=[f"#{entry.rank}" for entry in top])
    seconds = backend.settings.scoring.epoch_seconds

    def span(number: int) -> str:
        return format_span(number * seconds, (number + 1) * seconds)

    return render_html("leaderboard.html", entries=entries, chart=chart, epoch=epoch, current_epoch=current_epoch,
                       current_span=span(current_epoch), epoch_span=None if epoch is None else span(epoch),
                       noise=backend.seed_noise(epoch))


def profile_facts(profile: ComputeProfile) -> list[tuple[str, str]]:
    """The compute profile as (label, text) rows, only what the run reached: a run that failed before training
    has no batches, no speed and perhaps no device, and shows none of them."""
    where = " on ".join(part for part in (profile.device, profile.node_address or profile.node) if part)
    times = [f"{format_number(value, 1)} s {name}" for name, value in (("wall", profile.wall_seconds),
                                                                      ("training", profile.train_seconds)) if value]
    rows = [("device", where if profile.device else None), ("node", None if profile.device else where),
            ("parameters", profile.model_params and format_number(profile.model_params, 0)),
            ("tokens / s", profile.tokens_per_second and format_number(profile.tokens_per_second, 0)),
            ("time", " · ".join(times)),
            ("tokens scored", profile.tokens_scored and format_number(profile.tokens_scored, 0)),
            ("batches × B × L", f"{profile.batches:,} × {profile.batch_size} × {profile.seq_len}"
             if profile.batches and profile.batch_size and profile.seq_len else None)]
    return [(label, text) for label, text in rows if text]


def _readable(backend: Backend, events: list[TimelineEvent]) -> list[TimelineEvent]:
    """The timeline with each node named by its address, as everywhere on the pages."""
    return [event.model_copy(update={"detail": {**event.detail, "node": backend.node_address(event.detail["node"])}})
            if event.detail.get("node") else event for event in events]


def retries(events: list[TimelineEvent]) -> list[tuple[int, str]]:
    """(attempt, why it ended: the first reason's rule) of each attempt the system failed and requeued."""
    return [(event.detail.get("attempt"), (event.detail.get("reasons") or [{}])[0].get("rule", "unknown"))
            for event in events if event.kind == "requeued"]
