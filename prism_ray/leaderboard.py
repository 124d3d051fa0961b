"""The leaderboard and the dry-run weights (docs/architecture.md, "Scoring contract"): pure functions over score rows.

Every ordering is total over rows with distinct submission ids, so the board and the weights never depend on
the order the rows arrive in. The board shows every completed row; the weights count only the rows that earn
(`earns_weight`): a copy of another hotkey's earlier submission earns nothing. Time priority (docs/scoring.md,
"The leaderboard"): a later submission passes an earlier one only by a margin that decays with the earlier one's
head start, so a perturbed copy cannot pass its original.
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
    """Completed rows (of one epoch, if given), best per hotkey, in time-priority order (`ranked`); ranks 1..n."""
    settings = settings or ScoringSettings()
    per_hotkey: dict[str, list[ScoreRow]] = {}
    for row in _scored(rows, epoch, settings):
        per_hotkey.setdefault(row.hotkey, []).append(row)
    # A hotkey's own later submission replaces its entry only by the same margin it would need against anyone else.
    ordered = ranked([ranked(own, settings)[0] for own in per_hotkey.values()], settings)
    return [LeaderboardEntry(**row.model_dump(), rank=rank) for rank, row in enumerate(ordered, start=1)]


def priority_margin(head_start: float, settings: ScoringSettings) -> float:
    """The fraction by which a later final score must exceed an earlier one to rank above it, for an earlier
    submission made `head_start` seconds before the later one: ε0 · max(0, 1 − head_start / decay); 0 for rows
    submitted at the same time."""
    if head_start <= 0:
        return 0.0
    return settings.priority_epsilon * max(0.0, 1.0 - head_start / settings.priority_decay_seconds)


_BLOCK = 64  # rows per block of the placed list (see ranked)


def ranked(rows: Iterable[ScoreRow], settings: ScoringSettings) -> list[ScoreRow]:
    """Rows best first under time priority. They are placed in order of submission (time, then id); each new row
    moves up past the rows it beats by their margin and stops below the first one it does not. So a later row sits
    above an earlier one only if it beat it by the margin, and with a zero margin this is final_score desc →
    earliest → id.

    The placed rows are kept in blocks with their best score: a block whose best score times (1 + ε0) is below the
    new row's is beaten whole and skipped, so a board of thousands is placed in milliseconds, not O(n²) compares."""
    blocks: list[list[tuple[float, float, ScoreRow]]] = []
    tops: list[float] = []
    ceiling = 1.0 + settings.priority_epsilon
    for row in sorted(rows, key=_arrival):
        score, at = row.final_score or 0.0, epoch_seconds_of(row.submitted_at)
        where = _lowest_unbeaten(blocks, tops, score, at, ceiling, settings)
        if where is None:  # it beats every placed row
            where = (0, 0)
            if not blocks:
                blocks.append([])
                tops.append(score)
        number, index = where
        block = blocks[number]
        block.insert(index, (score, at, row))
        tops[number] = max(tops[number], score)
        if len(block) > 2 * _BLOCK:
            blocks[number:number + 1] = [block[:_BLOCK], block[_BLOCK:]]
            tops[number:number + 1] = [max(entry[0] for entry in part) for part in blocks[number:number + 2]]
    return [entry[2] for block in blocks for entry in block]


def _lowest_unbeaten(blocks: list[list[tuple[float, float, ScoreRow]]], tops: list[float], score: float, at: float,
                     ceiling: float, settings: ScoringSettings) -> tuple[int, int] | None:
    """(block, index) just below the lowest placed row the new one does not beat by its margin; None if none."""
    for number in range(len(blocks) - 1, -1, -1):
        if tops[number] * ceiling < score:  # no margin reaches ε0: the whole block is beaten
            continue
        block = blocks[number]
        for index in range(len(block) - 1, -1, -1):
            earlier_score, earlier_at, _ = block[index]
            if earlier_score * ceiling < score:  # beaten whatever its margin
                continue
            if earlier_score >= score or not score > earlier_score * (1.0 + priority_margin(at - earlier_at, settings)):
                return number, index + 1
    return None


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
    """A copy of another hotkey's earlier submission, by code or by behaviour, earns nothing (the earliest keeps it),
    nor does a score whose audit is pending, failed or never drawn; None means no audits are kept (docs/scoring.md,
    "Audits")."""
    return row.copy_of is None and row.audit in (None, "passed")


def two_tier_payees(rows: Iterable[ScoreRow], settings: ScoringSettings,
                    epoch: int | None = None) -> tuple[ScoreRow, ScoreRow] | tuple[()]:
    """(architecture owner, best training variant) that two_tier pays from these rows; () when nothing scores.

    The family is the top entry's, and the top entry is its best variant; a row without a fingerprint is a family of
    its own. The owner is the family's first submitter; rows scored 0 (a step-0 anomaly) claim nothing, so smuggling
    cannot squat on an architecture.
    """
    rows = list(rows)
    board = leaderboard(rows, epoch, settings)
    if not board or board[0].final_score == 0:
        return ()
    top = board[0]
    family = [row for row in _scored(rows, epoch, settings) if row.final_score and _same_family(row, top)]
    owner = min(family, key=lambda row: (epoch_seconds_of(row.submitted_at), row.submission_id, row.hotkey))
    return owner, next(row for row in family if row.submission_id == top.submission_id)


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


def _arrival(row: ScoreRow) -> tuple[float, str, str]:
    return (epoch_seconds_of(row.submitted_at), row.submission_id, row.hotkey)
