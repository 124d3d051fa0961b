"""PRISM's wire names for prism-ray's data (docs/api.md, "PRISM compatibility"): the six statuses, ISO times,
`epoch_id`, `code_hash`, `error`, and the curve as PRISM's clients read it. prism-ray's own fields stay beside them."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal

from prism_ray.config import ScoringSettings
from prism_ray.evaluation.scoring import CurvePoint
from prism_ray.ranking.leaderboard import epoch_of
from prism_ray.store import SubmissionRecord

PrismStatus = Literal["pending", "running", "completed", "failed", "rejected", "held"]
# prism-ray's states PRISM does not have, as the nearest of its six: a duplicate is never scored, so it is final.
_AS_PRISM: dict[str, PrismStatus] = {"duplicate": "rejected"}
_WITH_ERROR = ("failed", "rejected", "held", "duplicate")


def prism_status(status: str) -> PrismStatus:
    return _AS_PRISM.get(status, status)  # type: ignore[return-value]


def iso(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def identity(record: SubmissionRecord, scoring: ScoringSettings) -> dict[str, Any]:
    """The fields every submission answer carries under PRISM's names, with prism-ray's own beside them."""
    return {"status": prism_status(record.status), "state": record.status,
            "epoch_id": epoch_of(record.created_at, scoring),
            "code_hash": record.zip_sha256 or record.bundle_sha256 or "",
            "created_at": iso(record.created_at), "created_at_unix": record.created_at}


def error_text(record: SubmissionRecord) -> str | None:
    """PRISM's one-line `error`: why the submission was not scored (None while it may still be)."""
    if record.status not in _WITH_ERROR:
        return None
    parts = [f"duplicate of {record.duplicate_of}"] if record.status == "duplicate" else []
    parts += [f"{reason.rule}: {reason.message}" for reason in record.reasons]
    return "; ".join(parts) or record.status


def loss_curve(points: list[CurvePoint]) -> dict[str, Any]:
    """PRISM's `loss_curve` from the running-bpb points: the online loss of each stretch between two points, in nats
    per byte (prism-ray keeps bytes, not tokens, per point), against the cumulative bytes."""
    losses, covered, bits_before, bytes_before = [], [], 0.0, 0
    for point in points:
        bits = (point.bpb or 0.0) * point.bytes
        stretch = point.bytes - bytes_before
        losses.append((bits - bits_before) / stretch * math.log(2) if stretch > 0 else 0.0)
        covered.append(float(point.bytes))
        bits_before, bytes_before = bits, point.bytes
    return {"online_loss": losses, "covered_bytes_cumulative": covered, "points": len(points)}
