"""The response models built from the read model's data, once for both the JSON API and the pages: a submission's
status, its live progress, its compute profile, its curve, the queue."""

from __future__ import annotations

import math
from typing import Any

from prism_ray.backend.store_backend import Backend
from prism_ray.evaluation.report import RunReport
from prism_ray.store import RunRecord, SubmissionDetail
from serve_app import wire
from serve_app.errors import ApiError
from serve_app.models import (
    ComputeProfile,
    Curve,
    CurveBpb,
    CurveCompute,
    Event,
    Progress,
    Queue,
    QueueEntry,
    Scores,
    SubmissionStatus,
)


def submission_status(backend: Backend, detail: SubmissionDetail) -> SubmissionStatus:
    record = detail.record
    run = detail.runs[-1] if detail.runs else None
    report = run and run.report
    scored = scores(report) if record.status == "completed" and report is not None else None
    named = wire.identity(record, backend.settings.scoring)
    return SubmissionStatus(
        **record.model_dump(include=set(SubmissionStatus.model_fields) - {"scores", "progress", "events", *named}),
        **named, scores=scored, final_score=scored and scored.final_score, penalty=scored and scored.penalty,
        error=wire.error_text(record), progress=progress(backend, run) if run else None,
        events=[Event(seq=e.seq, at=e.created_at, kind=e.kind, stage=e.stage, detail=e.detail) for e in detail.events])


def curve(backend: Backend, detail: SubmissionDetail) -> Curve:
    """The scored attempt's points and the profile of the latest run that has a report (else the latest run); 404
    until there are points, as PRISM answers."""
    points = backend.curve(detail.record.id)
    if not points:
        raise ApiError(404, "curve:not_scored", f"{detail.record.id} has no learning curve yet (it is "
                       f"{detail.record.status}); a curve exists once the run is scored")
    reported = [run for run in detail.runs if run.report]
    run = reported[-1] if reported else (detail.runs[-1] if detail.runs else None)
    report, shown = run and run.report, profile(backend, run)
    vocab = report and report.vocab_size
    gpus = (1 if shown.device.startswith("cuda") else 0) if shown.device else None
    return Curve(id=detail.record.id, status=detail.record.status,
                 points=points, profile=shown, submission_id=detail.record.id,
                 loss_curve={**wire.loss_curve(points), "step0_loss": report and report.step0_loss,
                             "baseline_nats": math.log(vocab) if vocab else None,
                             "downsampled": (shown.batches or 0) > len(points)},
                 bpb=CurveBpb(prequential_bpb=report and report.bpb, bits_per_byte=report and report.bpb),
                 compute=CurveCompute(
                     gpu_count=gpus, device=shown.device, gpu_tier=None, model_params=shown.model_params,
                     tokens_consumed=shown.tokens_scored,
                     estimated_flops=6.0 * shown.model_params * shown.tokens_scored
                     if shown.model_params and shown.tokens_scored else None,
                     wall_clock_seconds=shown.wall_seconds,
                     gpu_hours=gpus * shown.wall_seconds / 3600 if gpus is not None and shown.wall_seconds else None,
                     peak_vram_bytes=None, peak_rss_bytes=None))


def scores(report: RunReport) -> Scores:
    held = report.heldout
    return Scores(**report.score_row().model_dump(), val_bpb_trained=held.val_bpb_trained if held else None,
                  val_bpb_twin=held.val_bpb_twin if held else None,
                  flags=report.score.flags if report.score else [])


def progress(backend: Backend, run: RunRecord | None) -> Progress:
    """The report's final numbers once the run ended with one, else its latest heartbeat (nothing before a run)."""
    report = run and run.report
    node = run and run.node
    return Progress(bytes_scored=_first(report and report.bytes_scored, run and run.progress_bytes),
                    running_bpb=_first(report and report.bpb, run and run.progress_bpb),
                    tokens_per_second=_first(report and report.tokens_per_second, run and run.tokens_per_second),
                    byte_budget=_first(report and report.byte_budget, backend.settings.byte_budget or None),
                    updated_at=_first(run and run.finished_at, run and run.progress_at), node=node,
                    node_address=backend.node_address(node))


def profile(backend: Backend, run: RunRecord | None) -> ComputeProfile:
    """What the run's report says about its compute; a field the run never reached (a failed run) stays null."""
    report = run and run.report
    fields = set(ComputeProfile.model_fields) - {"node", "node_address", "tokens_per_second"}
    known = {name: getattr(report, name, None) or None for name in fields}  # 0 batches / 0 s: "never ran"
    node = run and run.node
    return ComputeProfile(**known, node=node, node_address=backend.node_address(node),
                          tokens_per_second=_first(report and report.tokens_per_second, run and run.tokens_per_second))


def queue(backend: Backend) -> Queue:
    view = backend.queue()
    stats = backend.stats()
    entries = [QueueEntry(id=item.record.id, position=item.position, status=item.record.status,
                          stage=item.record.stage, name=item.record.name, hotkey=item.record.hotkey,
                          attempt=item.record.attempt, max_attempts=item.record.max_attempts,
                          created_at=item.record.created_at, starts_in=item.starts_in, done_in=item.done_in,
                          progress=progress(backend, item.run) if item.run else None)
               for item in view.items]
    return Queue(running=stats["in_flight"], waiting=stats["queue_depth"],
                 typical_run_seconds=view.typical_run_seconds, notice=backend.placement_notice(), entries=entries)


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)
