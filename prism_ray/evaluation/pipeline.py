"""The stage table: the one sequence `prism-ray eval` and the cluster both run (no Ray in here).

    check (static policy) → gate (LLM review) → train (sandboxed scorer + trainer, held-out included) → score

`evaluate()` loops over STAGES in this process; prism_ray/cluster wraps each entry as a Ray task and moves the
payloads between them, so both give the same report, the same report.json and the same timings by construction.
A stage gets a StageContext, the bundle and the payloads of the stages it `needs`, and returns (Outcome, payload).
docs/architecture.md, "One submission's path".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prism_ray import policy
from prism_ray.config import IntakeLimits, Settings
from prism_ray.errors import BundleError, Reason
from prism_ray.evaluation import run
from prism_ray.evaluation.report import RunReport, TrainResult, assemble
from prism_ray.gate import hard_gate as gate
from prism_ray.harness.records import Progress
from prism_ray.intake.bundle import Bundle, load_bundle

Verdict = Literal["next", "completed", "failed", "rejected", "held", "lost", "retry"]
ENDINGS = ("rejected", "held", "failed")  # verdicts that end a submission before (or instead of) its score


@dataclass(frozen=True)
class Job:
    """One attempt at a submission; on a cluster, owner and attempt guard every store write."""

    submission_id: str
    attempt: int
    owner: str
    claimed_at: float  # epoch seconds


@dataclass
class Outcome:
    """A stage's word: `next`, or how the submission ends (`lost`: the lease went elsewhere; `retry`: a system
    failure, never charged to the miner)."""

    verdict: Verdict
    reasons: list[Reason] = field(default_factory=list)
    report: RunReport | None = None
    audits: list[gate.GateAudit] = field(default_factory=list)
    node: str | None = None  # the Ray node the stage ran on
    seconds: float = 0.0
    note: dict[str, Any] | None = None  # what a stage that let the submission through decided, for the timeline


@dataclass
class StageContext:
    job: Job
    settings: Settings
    verdicts: gate.VerdictCache | None = None
    progress: Callable[[Progress], None] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds of the stages already run


StageResult = tuple[Outcome, Any]


def check_stage(ctx: StageContext, bundle: Bundle) -> StageResult:
    """The static policy over every file; the instantiation probe runs at the start of train, in the scorer."""
    findings = policy.inspect(bundle, remember_in=ctx.settings.cache_dir / "policy")
    return (Outcome("rejected", findings) if findings else Outcome("next")), None


def gate_stage(ctx: StageContext, bundle: Bundle) -> StageResult:
    verdict = gate.review(bundle, ctx.settings.gate, ctx.verdicts if ctx.verdicts is not None else
                          gate.FileVerdictCache(ctx.settings.cache_dir / "gate-verdicts"))
    ends = verdict.status in ("rejected", "held")
    note = {"gate": verdict.status, "message": verdict.message, "cached": verdict.cached}  # skipped shows too
    return Outcome(verdict.status if ends else "next", verdict.reasons, audits=verdict.audits, note=note), verdict


def train_stage(ctx: StageContext, bundle: Bundle) -> StageResult:
    result = run.train(bundle, ctx.settings, run.new_run_dir(ctx.settings, bundle), ctx.progress)
    if result.outcome.retryable:  # killed from outside: the system's failure, not the miner's
        return Outcome("retry", result.outcome.reasons), None
    return Outcome("next"), result  # a failed run is still reported: score turns its reasons into the report


def score_stage(ctx: StageContext, bundle: Bundle, verdict: gate.GateResult, result: TrainResult) -> StageResult:
    report = assemble(result, bundle.sha256, bundle.display_name, ctx.settings, ctx.timings, verdict.to_report())
    Path(result.run_dir, "report.json").write_text(report.model_dump_json(indent=2))
    return Outcome(report.status, report.reasons, report=report), None


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., StageResult]
    needs: tuple[str, ...] = ()  # earlier stages whose payloads are passed, in this order
    gpu: bool = False  # runs miner code: a num_gpus=N task (PRISM_GPUS_PER_RUN) whose own heartbeats renew the lease
    on_head: bool = False  # pinned to the head node when the cluster has one (the gate's API key lives there)
    colocate: str | None = None  # runs on the node of this earlier stage, whose files (the run dir) stay there


STAGES: tuple[Stage, ...] = (
    Stage("check", check_stage),
    Stage("gate", gate_stage, on_head=True),
    Stage("train", train_stage, gpu=True),
    Stage("score", score_stage, needs=("gate", "train"), colocate="train"),
)
STAGES_BY_NAME = {stage.name: stage for stage in STAGES}


def _rerun_plan() -> tuple[int, ...]:
    """The stages a re-run (an audit, a seed replica) runs: from the first GPU stage to the end, plus the earlier
    stages those need (the gate, whose verdict is cached)."""
    first_gpu = next(index for index, stage in enumerate(STAGES) if stage.gpu)
    index_of = {stage.name: index for index, stage in enumerate(STAGES)}
    plan, frontier = set(range(first_gpu, len(STAGES))), list(range(first_gpu, len(STAGES)))
    while frontier:
        for need in STAGES[frontier.pop()].needs:
            if index_of[need] not in plan:
                plan.add(index_of[need])
                frontier.append(index_of[need])
    return tuple(sorted(plan))


RERUN_PLAN = _rerun_plan()  # indices into STAGES, in order


def run_stage(stage: Stage, ctx: StageContext, bundle: Bundle, *needs: Any) -> StageResult:
    """Run one stage and time it: the same clock in-process and in a Ray task. A stage that ends the submission
    without a report of its own (check, gate) gets the report `eval` prints, here, so the cluster stores the same."""
    started = time.monotonic()
    outcome, payload = stage.run(ctx, bundle, *needs)
    outcome.seconds = time.monotonic() - started
    if outcome.verdict in ENDINGS and outcome.report is None:
        outcome.report = stopped(bundle, stage.name, outcome, {**ctx.timings, stage.name: outcome.seconds},
                                 payload if isinstance(payload, gate.GateResult) else None)
    return outcome, payload


def stage_limit(stage: Stage, settings: Settings) -> float:
    """Wall-clock seconds a stage may take; a GPU stage gets the run's own limits plus start-up grace."""
    cluster = settings.cluster
    if stage.name in cluster.stage_limits:
        return cluster.stage_limits[stage.name]
    if stage.gpu:
        return settings.time_limit + settings.heldout_time_limit + cluster.gpu_stage_grace_seconds
    return cluster.cpu_stage_seconds


def intake(source: Path | str | bytes, limits: IntakeLimits | None = None) -> Bundle:
    return load_bundle(source, limits)


def evaluate(source: Path | str | bytes | Bundle, settings: Settings | None = None,
             progress: Callable[[Progress], None] | None = None,
             verdicts: gate.VerdictCache | None = None) -> RunReport:
    """Every stage in this process, exactly as the cluster runs them; the report of the first that ends it."""
    settings = settings or Settings()
    try:
        bundle = source if isinstance(source, Bundle) else intake(source, settings.intake)
    except BundleError as error:
        return stopped(None, "intake", Outcome("rejected", error.reasons), {}, None)
    ctx = StageContext(Job("local", 1, "eval", time.time()), settings, verdicts, progress)
    payloads: dict[str, Any] = {}
    for stage in STAGES:
        outcome, payloads[stage.name] = run_stage(stage, ctx, bundle, *(payloads[name] for name in stage.needs))
        ctx.timings[stage.name] = outcome.seconds
        if outcome.verdict != "next":
            return outcome.report or stopped(bundle, stage.name, outcome, ctx.timings, payloads.get("gate"))
    raise AssertionError("the last stage always ends the submission")


def stopped(bundle: Bundle | None, stage: str, outcome: Outcome, timings: dict[str, float],
            verdict: gate.GateResult | None) -> RunReport:
    """The report of a submission that ended before scoring (rejected at intake or check, held or rejected at the
    gate, a system failure at train, a stage past its limit); no bundle: its zip did not load."""
    status = {"rejected": "rejected", "held": "held"}.get(outcome.verdict, "failed")
    return RunReport(status=status, stage=stage, reasons=outcome.reasons, bundle_sha256=bundle and bundle.sha256,
                     name=bundle and bundle.display_name, tokenizer=bundle and bundle.config.tokenizer,
                     gate=verdict.to_report() if verdict is not None else None, timings=dict(timings),
                     wall_seconds=sum(timings.values()))
