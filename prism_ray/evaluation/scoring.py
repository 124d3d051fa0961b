"""Scores from the parent's per-batch books (docs/architecture.md, "Scoring contract"): prequential bpb, the curve,
the plausibility gate and final_score."""

from __future__ import annotations

import math
from typing import TypeVar

from pydantic import BaseModel, Field, field_validator

from prism_ray.config import ScoringSettings
from prism_ray.errors import PrismError, Reason

# Keeps the tie-break credit strictly below ε after float rounding, so a run ε worse never ties or passes.
_MAX_CREDIT_SHARE = 1.0 - 1e-6
Point = TypeVar("Point")


class ScoreFields(BaseModel):
    """The scores row of a run: the one definition of its fields. The store's `scores` columns, the board's rows and
    the API's `scores` are generated from these names (docs/store.md, "scores"). A non-finite number is None: JSON
    has no spelling for it and SQL aggregates skip NULL."""

    bpb: float | None = None
    final_score: float | None = None
    heldout_delta: float | None = None
    gap: float | None = None
    penalty: float | None = None
    anomaly: float | None = None
    tie_break: float | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _finite(cls, value: object) -> object:
        return None if isinstance(value, float) and not math.isfinite(value) else value


class CurvePoint(BaseModel):  # one point of a learning curve: cumulative target bytes vs. running bpb (the API's too)
    bytes: int
    bpb: float | None


class ScoreError(PrismError):
    """A run that has no score (`score:degenerate`)."""


class ScoreInputs(BaseModel):
    """What final_score reads: the run's prequential bpb, its first batches, the held-out passes (if any) and the
    counts the plausibility gate checks against the plan."""

    bpb: float
    vocab_size: int
    step0_loss: float | None = Field(description="mean loss of the first batch, nats per target; None = no batches")
    early_losses: list[float] = Field(default_factory=list, description="mean loss of each of the first batches "
                                      "(as many as the anomaly check covers)")
    heldout_delta: float | None = Field(default=None, description="val_bpb(step-0 twin) − val_bpb(trained)")
    gap: float | None = Field(default=None, description="val_bpb(trained) − bpb(trained) on an equal train slice")
    val_bpb_trained: float | None = Field(default=None, description="held-out bpb of the trained model")
    scored_batches: int | None = Field(default=None, description="batches the scorer recorded")
    planned_batches: int | None = Field(default=None, description="batches the stream plan holds for this budget")


class ScoreBreakdown(BaseModel):
    """final_score = (base · penalty + tie_break) · anomaly · plausible, with every term kept for the miner."""

    final_score: float
    base: float
    tie_break: float
    penalty: float
    anomaly: int
    plausible: int = 1
    flags: list[str]
    implausible: list[Reason] = Field(default_factory=list)
    inputs: ScoreInputs | None = None  # None only in reports stored before the inputs were kept


def bits_per_byte(nats: float, target_bytes: int) -> float:
    """Σ nats / ln 2 / Σ bytes(targets); NaN when nothing was scored."""
    return nats / math.log(2) / target_bytes if target_bytes > 0 else float("nan")


def learning_curve(batch_nats: list[float], batch_bytes: list[int], max_points: int) -> list[dict[str, float]]:
    """Cumulative target bytes vs. running bpb, thinned to at most max_points (the last batch always kept)."""
    points: list[dict[str, float]] = []
    nats = 0.0
    total = 0
    for batch_nat, batch_byte in zip(batch_nats, batch_bytes, strict=True):
        nats += batch_nat
        total += batch_byte
        points.append({"bytes": total, "bpb": bits_per_byte(nats, total)})
    return thin_curve(points, max_points)


def thin_curve(points: list[Point], max_points: int) -> list[Point]:
    """At most max_points points evenly spaced by index, the first and the last always kept: the one thinning of a
    learning curve, when a run records it and when a stored curve is served."""
    count = len(points)
    if count <= max_points:
        return points
    return [points[round(i * (count - 1) / (max_points - 1))] for i in range(max_points)]


def is_step0_anomaly(early_losses: list[float], vocab_size: int, settings: ScoringSettings) -> bool:
    """A model a few optimizer steps from a random init cannot beat uniform by much: batch j (j < anomaly_batches)
    below f^(j+1)·ln(V) (f = anomaly_fraction) means smuggled knowledge — brought in at init (batch 0) or written in
    right after it. Each optimizer step may buy at most another factor f, which fast honest learners stay above.

    A non-finite batch is charged 2·ln(V) per target upstream, so NaN/+inf here is never an anomaly.
    """
    uniform = math.log(vocab_size)
    return any(loss < settings.anomaly_fraction ** (j + 1) * uniform
               for j, loss in enumerate(early_losses[: settings.anomaly_batches]))


def implausible(inputs: ScoreInputs, settings: ScoringSettings) -> list[Reason]:
    """The plausibility gate: numbers a real run cannot produce, each a typed reason; any one zeroes the score.

    - the prequential bpb (an average over the whole learning curve) beats the trained model's own held-out bpb (its
      end point, on text of the same distribution) by more than a margin: the records were not what the model does;
    - a first batch far below ln(V), which no untrained model reaches, anomaly rule or not;
    - a scored-batch count that differs from the stream plan's.
    """
    reasons: list[Reason] = []
    if inputs.val_bpb_trained is not None and inputs.bpb < inputs.val_bpb_trained - settings.plausibility_margin_bpb:
        reasons.append(Reason(rule="plausibility:prequential_below_heldout", message=(
            f"the run's prequential bpb {inputs.bpb:.4f} is below the trained model's own held-out bpb "
            f"{inputs.val_bpb_trained:.4f} by more than {settings.plausibility_margin_bpb:g}: a learning curve's "
            "average cannot beat its end point by that much")))
    floor = settings.impossible_fraction * math.log(inputs.vocab_size)
    if inputs.step0_loss is not None and inputs.step0_loss < floor:
        reasons.append(Reason(rule="plausibility:impossible_loss", message=(
            f"the first batch's mean loss {inputs.step0_loss:.4f} nats is below {floor:.4f} "
            f"({settings.impossible_fraction:g}·ln {inputs.vocab_size}), which no untrained model reaches")))
    if inputs.planned_batches is not None and inputs.scored_batches != inputs.planned_batches:
        reasons.append(Reason(rule="plausibility:count_mismatch", message=(
            f"{inputs.scored_batches} batches were scored, the stream plan holds {inputs.planned_batches}")))
    return reasons


def gap_penalty(gap: float, settings: ScoringSettings) -> float:
    """1 up to the threshold, then exp(−slope · excess), never below the floor (continuous at the threshold)."""
    excess = gap - settings.gap_threshold
    if excess <= 0:
        return 1.0
    return max(settings.gap_penalty_floor, math.exp(-settings.gap_penalty_slope * excess))


def tie_break_credit(heldout_delta: float, settings: ScoringSettings) -> float:
    """The bpb credit the held-out delta earns: ε · d/(d + scale) for d = max(delta, 0), always < ε."""
    delta = max(heldout_delta, 0.0)
    share = delta / (delta + settings.tie_break_delta_scale)
    return settings.epsilon * min(share, _MAX_CREDIT_SHARE)


def final_score(inputs: ScoreInputs, settings: ScoringSettings | None = None) -> ScoreBreakdown:
    """(1/(1+bpb) · penalty + tie_break) · anomaly · plausible; raises ScoreError(`score:degenerate`) for an
    unscorable run.

    The tie-break is the score the held-out credit c buys: penalty · (1/(1+bpb−c) − 1/(1+bpb)), so with equal
    penalties the total is penalty/(1+bpb−c), and c < ε means runs ε or more apart in bpb keep their order at
    every bpb ≥ 0 (no valid-range caveat, so 2·ln(V) non-finite charges cannot break it).
    """
    settings = settings or ScoringSettings()
    step0_loss = _checked_step0_loss(inputs)
    flags: list[str] = []
    anomaly = 0 if is_step0_anomaly(inputs.early_losses or [step0_loss], inputs.vocab_size, settings) else 1
    if not anomaly:
        flags.append("step0_anomaly")
    reasons = implausible(inputs, settings)
    flags.extend(reason.rule for reason in reasons)
    if inputs.heldout_delta is None or inputs.gap is None:
        flags.append("no_heldout")
    penalty = 1.0 if inputs.gap is None else gap_penalty(inputs.gap, settings)
    if inputs.gap is not None and inputs.gap > settings.gap_threshold:
        flags.append("memorisation_gap")
    credit = 0.0 if inputs.heldout_delta is None else tie_break_credit(inputs.heldout_delta, settings)
    base = 1.0 / (1.0 + inputs.bpb)
    # c/((1+b)(1+b−c)) is 1/(1+b−c) − 1/(1+b) without the cancellation of a difference.
    tie_break = penalty * credit / ((1.0 + inputs.bpb) * (1.0 + inputs.bpb - credit))
    plausible = 0 if reasons else 1
    return ScoreBreakdown(final_score=(base * penalty + tie_break) * anomaly * plausible, base=base,
                          tie_break=tie_break, penalty=penalty, anomaly=anomaly, plausible=plausible, flags=flags,
                          implausible=reasons, inputs=inputs)


def _checked_step0_loss(inputs: ScoreInputs) -> float:
    """Raise `score:degenerate` for an unscorable run; otherwise return its (present) first-batch loss."""
    if inputs.step0_loss is None:
        raise ScoreError("score:degenerate", "the run scored no batches")
    if not math.isfinite(inputs.bpb) or inputs.bpb < 0:
        raise ScoreError("score:degenerate", f"the run's bpb is {inputs.bpb}, not a finite number ≥ 0")
    if inputs.vocab_size < 2:
        raise ScoreError("score:degenerate", f"vocab_size {inputs.vocab_size} is below 2")
    for name in ("heldout_delta", "gap"):
        value = getattr(inputs, name)
        if value is not None and not math.isfinite(value):
            raise ScoreError("score:degenerate", f"the held-out pass produced a non-finite {name} ({value})")
    return inputs.step0_loss
