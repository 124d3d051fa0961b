"""Re-execution audits (docs/scoring.md, "Audits") as plain functions: which completed scores are re-run on another
node before they earn weight, and whether a re-run reproduced its first run. The store keeps the audit queue and
calls these; the scheduler runs the re-run and hands its report back."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from prism_ray.config import AuditSettings, ScoringSettings
from prism_ray.errors import Reason
from prism_ray.evaluation.report import RunReport
from prism_ray.ranking.leaderboard import ScoreRow, epoch_of, leaderboard, two_tier_payees

Why = Literal["top_k", "two_tier", "sample"]
# A re-run that ended on one of these was stopped by the system, not by the code: no verdict on the code.
SYSTEM_FAMILIES = ("infra", "data", "sandbox")  # reasons a re-run can end with that are not the code's


@dataclass(frozen=True)
class FirstRun:
    """What the re-run must reproduce: the scored run's bpb, its device and the dataset it read."""

    bpb: float
    device: str | None
    data: str | None


@dataclass(frozen=True)
class Judgement:
    status: Literal["passed", "mismatch", "failed"]
    audit_bpb: float | None
    tolerance: float
    reasons: list[Reason] = field(default_factory=list)


def select(rows: Sequence[ScoreRow], scoring: ScoringSettings, settings: AuditSettings) -> dict[str, Why]:
    """Submission id → why, for the scores that must be audited now and never were: each epoch's top-k on the board
    of the rows that could still earn (not copies, not failed audits, a score above 0), plus, under `two_tier`,
    the rows those weights would pay (the family owner need not be in the top k)."""
    candidates = [row for row in rows if row.copy_of is None and row.audit != "failed" and (row.final_score or 0) > 0]
    chosen: dict[str, Why] = {}
    epochs = sorted({epoch_of(row.submitted_at, scoring) for row in candidates})
    for epoch in epochs:
        for entry in leaderboard(candidates, epoch, scoring)[:settings.top_k]:
            chosen.setdefault(entry.submission_id, "top_k")
    if scoring.weights_mode == "two_tier":
        for epoch in [None, *epochs]:  # get_weights serves all epochs by default, or one
            for row in two_tier_payees(candidates, scoring, epoch):
                chosen.setdefault(row.submission_id, "two_tier")
    unaudited = {row.submission_id for row in candidates if row.audit == "unaudited"}
    return {submission_id: why for submission_id, why in chosen.items() if submission_id in unaudited}


def drawn(settings: AuditSettings, rng: random.Random) -> bool:
    """The random sample: each completed score is drawn once, when it completes."""
    return rng.random() < settings.sample_rate


def tolerance(devices: Iterable[str | None], settings: AuditSettings) -> float:
    """The relative bpb difference allowed: CUDA kernels need not be bit-reproducible, the CPU path is."""
    return settings.cuda_rtol if any((device or "").startswith("cuda") for device in devices) else settings.cpu_rtol


def judge(first: FirstRun, rerun: RunReport, settings: AuditSettings) -> Judgement:
    """Passed when the re-run's bpb is within tolerance of the first run's; a mismatch (the score is invalidated)
    when it is not, or when the re-run of code that completed once fails on the code's account; failed (no verdict
    on the code, no weight either) when the system stopped the re-run."""
    allowed = tolerance([first.device, rerun.device], settings)
    if rerun.status != "completed" or rerun.bpb is None:
        cause = rerun.reasons[0] if rerun.reasons else Reason(rule="infra:no_verdict", message="no reason given")
        if cause.rule.split(":")[0] in SYSTEM_FAMILIES:
            return Judgement("failed", None, allowed, [Reason(
                rule="audit:not_run", message=f"the re-run could not be completed ({cause}); without an audit this "
                "score earns no weight")])
        return Judgement("mismatch", None, allowed, [Reason(
            rule="audit:mismatch", message=f"the first run scored bpb {first.bpb!r}; the re-run of the same code on "
            f"another node, same seed and data, did not complete: {cause}. The score is invalidated",
            file=cause.file, line=cause.line)])
    if first.data and rerun.data and rerun.data.fingerprint != first.data:
        return Judgement("failed", rerun.bpb, allowed, [Reason(
            rule="audit:data_changed", message=f"the dataset changed since the first run ({first.data[:12]} → "
                                               f"{rerun.data.fingerprint[:12]}), so the re-run proves nothing")])
    difference = abs(rerun.bpb - first.bpb) / abs(first.bpb) if first.bpb else abs(rerun.bpb)
    if difference <= allowed:
        return Judgement("passed", rerun.bpb, allowed)
    devices = sorted({device or "cpu" for device in (first.device, rerun.device)})
    return Judgement("mismatch", rerun.bpb, allowed, [Reason(
        rule="audit:mismatch", message=f"the re-run of the same code on another node, same seed and data, scored bpb "
        f"{rerun.bpb!r}; the first run scored {first.bpb!r}. They differ by {difference:.3g} (relative), more than "
        f"the {allowed:g} allowed on {'/'.join(devices)}. The score is invalidated")])
