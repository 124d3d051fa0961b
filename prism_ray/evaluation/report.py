"""The run report: what `prism-ray eval --json` prints, `report.json` holds and the store keeps — typed throughout.

`score_row()` is the one place the scores row (`scoring.ScoreFields`) is read off a report; the store, the HTTP API
and the CLI all use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from prism_ray.config import Settings
from prism_ray.errors import PrismError, Reason
from prism_ray.evaluation import scoring
from prism_ray.evaluation.chunks import ChunkCurve, chunk_curve
from prism_ray.evaluation.scoring import ScoreBreakdown, ScoreFields
from prism_ray.gate.hard_gate import GateReport
from prism_ray.harness.contract import ContractCheck
from prism_ray.harness.records import TrainOutcome

Status = Literal["completed", "rejected", "failed", "held"]


class DataInfo(BaseModel):
    path: str
    fingerprint: str
    pinned: bool
    split: str = "train"
    documents: int | None = None
    tokens: int | None = None


class HeldoutResult(BaseModel):
    """The held-out block (docs/scoring.md): val bpb of the trained model and its true step-0 twin, and the gap."""

    status: Literal["completed", "failed", "no_val_split", "val_too_small", "not_run"]
    reasons: list[Reason] = Field(default_factory=list)
    val_bpb_trained: float | None = None
    val_bpb_twin: float | None = None
    heldout_delta: float | None = None
    train_slice_bpb: float | None = None
    gap: float | None = None
    twin_step0_loss: float | None = None
    val_bytes: int = 0
    train_slice_bytes: int = 0
    seconds: float = 0.0
    message: str = ""


class ProbeStats(BaseModel):
    """What the causality probes checked (docs/rules.md, "Threat model")."""

    rows: int = 0
    max_drift: float = 0.0
    tolerance: float | None = None


class RunReport(BaseModel):
    status: Status
    stage: str
    reasons: list[Reason] = Field(default_factory=list)
    bundle_sha256: str | None = None
    name: str | None = None
    bpb: float | None = None
    final_score: float | None = None
    tokens_scored: int = 0
    bytes_scored: int = 0
    batches: int = 0
    planned_batches: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    with_logits: bool | None = None
    stopped_reason: str | None = None
    byte_budget: int | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    model_params: int | None = None
    seed: int | None = None
    device: str | None = None
    step0_loss: float | None = None
    non_finite_batches: int = 0
    data: DataInfo | None = None
    gate: GateReport | None = None
    isolation: str | None = None
    score: ScoreBreakdown | None = None
    heldout: HeldoutResult | None = None
    probes: ProbeStats | None = None
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage, in stage order")
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    tokens_per_second: float | None = None
    run_dir: str | None = None
    curve: list[dict[str, float]] = Field(default_factory=list)
    head_nats: list[float] = Field(default_factory=list, description="the first per-batch nats (ScoringSettings."
                                   "copy_batches of them), exactly as scored: copies by behaviour (docs/scoring.md)")
    world_size: int = Field(default=1, description="trainer ranks of the scored run")
    contract: list[ContractCheck] = Field(default_factory=list, description="the multi-GPU contract checks before "
                                          "the scored run (docs/miner.md, \"Several GPUs\")")
    chunks: ChunkCurve | None = Field(default=None, description="nats per fixed byte chunk of the scored stream, at "
                                      "batch resolution: paired comparisons (docs/scoring.md, \"Chunks\")")

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def score_row(self) -> ScoreFields:
        """The scores row of this report (the store adds the hotkey, family and epoch)."""
        breakdown, heldout = self.score, self.heldout
        return ScoreFields(bpb=self.bpb, final_score=self.final_score,
                           penalty=breakdown.penalty if breakdown else None,
                           anomaly=breakdown.anomaly if breakdown else None,
                           tie_break=breakdown.tie_break if breakdown else None,
                           heldout_delta=heldout.heldout_delta if heldout else None,
                           gap=heldout.gap if heldout else None)


@dataclass
class TrainResult:
    """What the train stage hands to the score stage (picklable: it travels through Ray's object store)."""

    outcome: TrainOutcome
    data: DataInfo | None
    heldout: HeldoutResult
    tokenizer: str
    vocab_size: int
    seed: int
    byte_budget: int
    run_dir: str
    contract: list[ContractCheck] = field(default_factory=list)  # the multi-GPU contract checks, before the run


def assemble(result: TrainResult, bundle_sha256: str, name: str, settings: Settings,
             timings: dict[str, float], gate: GateReport | None) -> RunReport:
    """The report of a run that reached training: its books, held-out block and score breakdown."""
    outcome = result.outcome
    nats, targets, target_bytes = sum(outcome.batch_nats), sum(outcome.batch_targets), sum(outcome.batch_bytes)
    bpb = scoring.bits_per_byte(nats, target_bytes)
    early = [n / t for n, t in zip(outcome.batch_nats, outcome.batch_targets, strict=True)]
    step0_loss = early[0] if early else None
    reasons = list(outcome.reasons)
    breakdown = None
    held = result.heldout
    if not reasons:
        try:
            completed = held.status == "completed"
            inputs = scoring.ScoreInputs(
                bpb=bpb, vocab_size=result.vocab_size, step0_loss=step0_loss,
                early_losses=early[: settings.scoring.anomaly_batches],
                heldout_delta=held.heldout_delta if completed else None, gap=held.gap if completed else None,
                val_bpb_trained=held.val_bpb_trained if completed else None, scored_batches=outcome.batches,
                planned_batches=outcome.planned_batches)
            breakdown = scoring.final_score(inputs, settings.scoring)
        except PrismError as error:
            reasons.extend(error.reasons)
    scored = breakdown is not None
    rejected = outcome.before_data and not scored
    return RunReport(
        status="completed" if scored else "rejected" if rejected else "failed",
        stage="score" if scored else ("data" if result.data is None else "train"), reasons=reasons,
        bundle_sha256=bundle_sha256, name=name, bpb=bpb if scored else None,
        final_score=breakdown.final_score if breakdown else None, score=breakdown, heldout=held, gate=gate,
        tokens_scored=targets, bytes_scored=target_bytes, batches=outcome.batches,
        planned_batches=outcome.planned_batches, batch_size=outcome.batch_size, seq_len=outcome.seq_len,
        with_logits=outcome.with_logits, stopped_reason=outcome.stopped_reason, byte_budget=result.byte_budget,
        tokenizer=result.tokenizer, vocab_size=result.vocab_size, model_params=outcome.model_params, seed=result.seed,
        device=outcome.device, step0_loss=step0_loss, non_finite_batches=outcome.non_finite_batches,
        data=result.data, isolation="bubblewrap" if outcome.sandboxed else "none",
        probes=ProbeStats(rows=outcome.probe_rows, max_drift=outcome.max_probe_drift,
                          tolerance=outcome.probe_tolerance),
        timings=timings, wall_seconds=sum(timings.values()), train_seconds=outcome.stream_seconds,
        tokens_per_second=targets / outcome.stream_seconds if outcome.stream_seconds > 0 else None,
        run_dir=result.run_dir, world_size=outcome.world_size, contract=list(result.contract),
        curve=scoring.learning_curve(outcome.batch_nats, outcome.batch_bytes, settings.curve_points),
        head_nats=list(outcome.batch_nats[:settings.scoring.copy_batches]),
        chunks=chunk_curve(outcome.batch_nats, outcome.batch_bytes, result.byte_budget,
                           settings.scoring.ranking.chunks) if scored else None,
    )
