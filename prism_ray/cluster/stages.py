"""The stages of one submission as plain functions over prism_ray.pipeline (DESIGN §3); no Ray in here.

A stage gets a StageContext, the bundle and the payloads of the stages it `needs`, and returns (Outcome, payload):
the outcome tells the scheduler whether to go on or how the submission ends, the payload travels to later stages
through Ray's object store without passing through the scheduler. Adding a stage is one line in STAGES.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from prism_ray import gate, pipeline
from prism_ray.bundle import Bundle
from prism_ray.config import Settings
from prism_ray.errors import Reason
from prism_ray.harness.session import Progress
from prism_ray.pipeline import TrainResult
from prism_ray.report import HeldoutResult, RunReport

Verdict = Literal["next", "completed", "failed", "rejected", "held", "lost"]


@dataclass(frozen=True)
class Job:
    """One claimed attempt of a submission; owner and attempt guard every store write (a stale attempt is ignored)."""

    submission_id: str
    attempt: int
    owner: str
    claimed_at: float  # epoch seconds


@dataclass
class Outcome:
    """A stage's word to the scheduler: `next`, or how the submission ends (`lost`: the lease went elsewhere)."""

    verdict: Verdict
    reasons: list[Reason] = field(default_factory=list)
    report: RunReport | None = None
    audits: list[gate.GateAudit] = field(default_factory=list)
    node: str | None = None  # the Ray node the stage ran on


@dataclass
class StageContext:
    job: Job
    settings: Settings
    verdicts: gate.VerdictCache | None = None
    progress: Callable[[Progress], None] | None = None


StageResult = tuple[Outcome, Any]


def check_stage(ctx: StageContext, bundle: Bundle) -> StageResult:
    """The static sandbox, then the instantiation probe (parameter cap, causality) in the sandboxed runner."""
    findings = pipeline.check(bundle)
    if not findings:
        settings = ctx.settings.model_copy(update={"device": "cpu"})  # a CPU task holds no GPU
        findings = pipeline.probe(bundle, settings, pipeline.new_run_dir(settings, bundle))
    return (Outcome("rejected", findings) if findings else Outcome("next")), None


def gate_stage(ctx: StageContext, bundle: Bundle) -> StageResult:
    verdict = pipeline.review(bundle, ctx.settings, ctx.verdicts)
    ends = verdict.status in ("rejected", "held")
    return Outcome(verdict.status if ends else "next", verdict.reasons, audits=verdict.audits), verdict


def train_stage(ctx: StageContext, bundle: Bundle) -> StageResult:
    # A failed training is still scored: score turns its reasons into the failed report the miner reads.
    return Outcome("next"), pipeline.train(bundle, ctx.settings, pipeline.new_run_dir(ctx.settings, bundle),
                                           ctx.progress)


def heldout_stage(ctx: StageContext, bundle: Bundle, result: TrainResult) -> StageResult:
    # Never ends the submission: a held-out failure is reported in the score, which then rests on bpb alone.
    return Outcome("next"), pipeline.heldout(bundle, result, ctx.settings)


def score_stage(ctx: StageContext, bundle: Bundle, verdict: gate.GateResult, result: TrainResult,
                held: HeldoutResult) -> StageResult:
    report = pipeline.score(bundle, result, ctx.settings, time.time() - ctx.job.claimed_at, held)
    report.gate = verdict.to_report()
    return Outcome(report.status, report.reasons, report=report), None


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., StageResult]
    needs: tuple[str, ...] = ()  # earlier stages whose payloads are passed, in this order
    gpu: bool = False  # runs miner code: a num_gpus=1 task whose own heartbeats renew the lease
    on_head: bool = False  # pinned to the head node when the cluster has one (the gate's API key lives there)
    colocate: str | None = None  # runs on the node of this earlier stage, whose files (run dir, state) stay there


STAGES: tuple[Stage, ...] = (
    Stage("check", check_stage),
    Stage("gate", gate_stage, on_head=True),
    Stage("train", train_stage, gpu=True),
    Stage("heldout", heldout_stage, needs=("train",), gpu=True, colocate="train"),
    Stage("score", score_stage, needs=("gate", "train", "heldout")),
)
STAGES_BY_NAME = {stage.name: stage for stage in STAGES}


def stage_limit(stage: Stage, settings: Settings) -> float:
    """Wall-clock seconds a stage may take; a GPU stage gets the run's own time limit plus start-up grace."""
    cluster = settings.cluster
    if stage.name in cluster.stage_limits:
        return cluster.stage_limits[stage.name]
    return settings.time_limit + cluster.gpu_stage_grace_seconds if stage.gpu else cluster.cpu_stage_seconds
