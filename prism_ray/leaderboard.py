"""The leaderboard and the dry-run weights (docs/architecture.md, "Scoring contract"): pure functions over score rows.

Every ordering is total over rows with distinct submission ids, so the board and the weights never depend on
the order the rows arrive in. The board shows every completed row; the weights count only the rows that earn
(`earns_weight`): a copy of another hotkey's earlier code earns nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from prism_ray.config import ScoringSettings


class ScoreRow(BaseModel):
    """One submission as the store holds it; only `completed` rows with a final_score reach the board."""

    model_config = ConfigDict(frozen=True)

    submission_id: str
    hotkey: str
    submitted_at: datetime | float = Field(description="a datetime (naive = UTC) or epoch seconds")
    status: str
    final_score: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    bpb: float | None = None
    heldout_delta: float | None = None
    architecture_family: str | None = None
    name: str | None = None
    copy_of: str | None = Field(default=None, description="the earlier submission of another hotkey this one copies")
    audit: Literal["unaudited", "pending", "passed", "failed"] | None = Field(
        default=None, description="the score's re-execution audit; None: no audits are kept")
    near_copy_of: str | None = Field(default=None, description="the earlier submission of another hotkey this one "
                                     "differs from only in numeric literals")
    penalty: float | None = Field(default=None, description="the memorisation-gap multiplier (1: none)")
    anomaly: float | None = Field(default=None, description="0 when the step-0 anomaly check zeroed the score")

    @property
    def flags(self) -> list[str]:
        """Why final_score is not 1/(1+bpb): what the board shows next to bpb (docs/scoring.md)."""
        flags = []
        if self.penalty is not None and self.penalty < 1:
            flags.append(f"memorisation_gap ×{self.penalty:.2f}")
        if self.anomaly == 0:
            flags.append("step0_anomaly: scored 0")
        elif self.final_score == 0:
            flags.append("implausible: scored 0")
        if self.heldout_delta is None:
            flags.append("no_heldout")
        return flags


class LeaderboardEntry(ScoreRow):
    rank: int


def epoch_seconds_of(timestamp: datetime | float) -> float:
    """Seconds since the Unix epoch; a naive datetime is read as UTC so the result never depends on the host."""
    if isinstance(timestamp, datetime):
        return (timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)).timestamp()
    return float(timestamp)


def epoch_of(timestamp: datetime | float, settings: ScoringSettings | None = None) -> int:
    """Epoch n covers [n·epoch_seconds, (n+1)·epoch_seconds) since the Unix epoch. A submission belongs to the epoch
    of its submission time, everywhere (the scores row, the board's filter, the weights)."""
    settings = settings or ScoringSettings()
    return math.floor(epoch_seconds_of(timestamp) / settings.epoch_seconds)


def leaderboard(rows: Iterable[ScoreRow], epoch: int | None = None,
                settings: ScoringSettings | None = None) -> list[LeaderboardEntry]:
    """Completed rows (of one epoch, if given), best per hotkey, by final_score desc → earliest → id; ranks 1..n."""
    best: dict[str, ScoreRow] = {}
    for row in _scored(rows, epoch, settings or ScoringSettings()):
        if row.hotkey not in best or _rank_key(row) < _rank_key(best[row.hotkey]):
            best[row.hotkey] = row
    ordered = sorted(best.values(), key=_rank_key)
    return [LeaderboardEntry(**row.model_dump(), rank=rank) for rank, row in enumerate(ordered, start=1)]


ORDER_NOTE = ("ranked by final score = 1/(1+bpb) × the memorisation-gap penalty (+ a held-out tie-break), zeroed by "
              "the anomaly and plausibility checks; so a lower bpb can rank below a higher one (docs/scoring.md)")


def weights(rows: Iterable[ScoreRow], settings: ScoringSettings | None = None,
            epoch: int | None = None) -> dict[str, float]:
    """Dry-run weights per hotkey over the rows that earn, summing to 1; {} when they score nothing."""
    settings = settings or ScoringSettings()
    rows = [row for row in rows if earns_weight(row)]
    board = leaderboard(rows, epoch, settings)
    if not board or board[0].final_score == 0:
        return {}
    if settings.weights_mode == "two_tier":
        owner, variant = two_tier_payees(rows, settings, epoch)
        split = settings.two_tier_split
        shares = {owner.hotkey: split[0]}
        shares[variant.hotkey] = shares.get(variant.hotkey, 0.0) + split[1]
        return shares
    total = math.fsum(entry.final_score for entry in board)
    return {entry.hotkey: entry.final_score / total for entry in board}


def earns_weight(row: ScoreRow) -> bool:
    """A copy of another hotkey's earlier code earns nothing (the earliest submission of the code keeps the weight),
    nor does a score whose audit is pending, failed or never drawn; None means no audits are kept (docs/scoring.md,
    "Audits")."""
    return row.copy_of is None and row.audit in (None, "passed")


def two_tier_payees(rows: Iterable[ScoreRow], settings: ScoringSettings,
                    epoch: int | None = None) -> tuple[ScoreRow, ScoreRow] | tuple[()]:
    """(architecture owner, best training variant) that two_tier pays from these rows; () when nothing scores.

    The family is the top entry's; a row without a fingerprint is a family of its own. The owner is the family's
    first submitter; rows scored 0 (a step-0 anomaly) claim nothing, so smuggling cannot squat on an architecture.
    """
    rows = list(rows)
    board = leaderboard(rows, epoch, settings)
    if not board or board[0].final_score == 0:
        return ()
    top = board[0]
    family = [row for row in _scored(rows, epoch, settings) if row.final_score and _same_family(row, top)]
    owner = min(family, key=lambda row: (epoch_seconds_of(row.submitted_at), row.submission_id, row.hotkey))
    return owner, min(family, key=_rank_key)


def _same_family(row: ScoreRow, top: ScoreRow) -> bool:
    if top.architecture_family is None:
        return row.submission_id == top.submission_id
    return row.architecture_family == top.architecture_family


def _scored(rows: Iterable[ScoreRow], epoch: int | None, settings: ScoringSettings) -> list[ScoreRow]:
    rows = list(rows)
    ids = [row.submission_id for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("submission ids must be unique: the board's order is only total over distinct ids")
    return [row for row in rows if row.status == "completed" and row.final_score is not None
            and (epoch is None or epoch_of(row.submitted_at, settings) == epoch)]


def _rank_key(row: ScoreRow) -> tuple[float, float, str, str]:
    return (-(row.final_score or 0.0), epoch_seconds_of(row.submitted_at), row.submission_id, row.hotkey)
