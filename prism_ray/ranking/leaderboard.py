"""The leaderboard and the dry-run weights (docs/architecture.md, "Scoring contract"): pure functions over score rows.

Every ordering is total over rows with distinct submission ids, so the board and the weights never depend on
the order the rows arrive in. The board shows every completed row; the weights count only the rows that earn
(`earns_weight`): a copy of another hotkey's earlier submission earns nothing. Time priority (docs/scoring.md,
"The leaderboard"): a later submission passes an earlier one only by a margin that decays with the earlier one's
head start, so a perturbed copy cannot pass its original. Where both runs have chunk curves, the constant margin
gives way to a measured one (docs/scoring.md, "The decided order"): a later run passes an earlier one only when the
paired bootstrap finds it better (prism_ray/ranking/significance.py); ε stays the fallback when no paired data exists.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from prism_ray.config import RankingSettings, ScoringSettings
from prism_ray.evaluation.scoring import ScoreFields
from prism_ray.ranking import significance
from prism_ray.ranking.significance import Curves, Verdict


class ScoreRow(ScoreFields):
    """One submission as the store holds it, its scores row included; only `completed` rows with a final_score
    reach the board."""

    model_config = ConfigDict(frozen=True)

    submission_id: str
    hotkey: str
    submitted_at: datetime | float = Field(description="a datetime (naive = UTC) or epoch seconds")
    status: str
    architecture_family: str | None = None
    name: str | None = None
    copy_of: str | None = Field(default=None, description="the earlier submission of another hotkey this one copies")
    audit: Literal["unaudited", "pending", "passed", "failed"] | None = Field(
        default=None, description="the score's re-execution audit; None: no audits are kept")
    near_copy_of: str | None = Field(default=None, description="the earlier submission of another hotkey this one "
                                     "differs from only in numeric literals")
    chunk_span: int | None = Field(default=None, description="bytes the chunk curves cover")
    chunk_bpb: tuple[tuple[float, ...], ...] = Field(default=(), description="bpb per chunk, one row per seed run "
                                                     "(the scored run and its completed replicas)")
    seed_bpbs: tuple[float, ...] = Field(default=(), description="bpb of each seed run, the scored run first")
    replicas: Literal["none", "pending", "done"] | None = Field(
        default=None, description="the seed replicas: none drawn, some still running, all ended; None: kept off")
    gpu_seconds: float | None = Field(default=None, description="training seconds of all its runs, replicas too")
    tokens_per_second: float | None = None
    model_params: int | None = None
    tokens: int | None = Field(default=None, description="targets the scored run trained on")

    def curves(self) -> Curves | None:
        if self.chunk_span is None or not self.chunk_bpb:
            return None
        return Curves(key=self.submission_id, span=self.chunk_span, chunk_bpb=self.chunk_bpb)

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
    tied_with: int | None = Field(default=None, description="the rank of the first entry of this entry's decided "
                                  "group, when that is another entry: no decided difference separates them")
    seeds: int = Field(default=1, description="runs with a bpb: the scored run and its completed replicas")
    mean_bpb: float | None = Field(default=None, description="mean bpb over its seeds")
    spread_bpb: float | None = Field(default=None, description="standard deviation of bpb over its seeds (≥ 2)")
    est_flops: float | None = Field(default=None, description="estimated training FLOPs of the scored run: "
                                    "6 · parameters · tokens")


class SeedNoise(BaseModel):
    """σ_seed of a board: measured from its replicas (pooled), and the one its verdicts use."""

    measured: float | None
    dof: int
    used: float


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
    judge = Judge(list(per_hotkey.values()), settings)
    # A hotkey's own later submission replaces its entry only by the same rule it would need against anyone else.
    ordered = judge.order([judge.order(own)[0] for own in per_hotkey.values()])
    entries, first = [], 1
    for rank, row in enumerate(ordered, start=1):
        if rank > 1 and judge.decided_apart(ordered[rank - 2], row):
            first = rank
        entries.append(LeaderboardEntry(**row.model_dump(), rank=rank, tied_with=first if first != rank else None,
                                        **_spread(row)))
    return entries


@lru_cache(maxsize=1 << 16)
def _compare(incumbent: Curves, challenger: Curves, ranking: str, sigma_seed: float) -> Verdict:
    """Verdicts are pure in their inputs, and a board asks for the same pairs again after every change: kept."""
    return significance.compare(incumbent, challenger, _ranking_of(ranking), sigma_seed)


@lru_cache(maxsize=8)
def _ranking_of(ranking: str) -> RankingSettings:
    return RankingSettings.model_validate_json(ranking)


def seed_noise(rows: Iterable[ScoreRow], epoch: int | None = None,
               settings: ScoringSettings | None = None) -> SeedNoise:
    """The σ_seed a board's verdicts use, and what its replicas measured."""
    settings = settings or ScoringSettings()
    judge = Judge([_scored(rows, epoch, settings)], settings)
    return SeedNoise(measured=judge.measured_sigma, dof=judge.sigma_dof, used=judge.sigma_seed)


def verdict_against_leader(rows: Iterable[ScoreRow], submission_id: str, epoch: int | None = None,
                           settings: ScoringSettings | None = None) -> tuple[LeaderboardEntry, Verdict | None] | None:
    """The board's leader and the paired verdict of this submission (as the challenger) against it; None when the
    submission is not on the board or is the leader; the verdict is None without paired data."""
    settings = settings or ScoringSettings()
    rows = list(rows)
    board = leaderboard(rows, epoch, settings)
    mine = next((row for row in _scored(rows, epoch, settings) if row.submission_id == submission_id), None)
    if not board or mine is None or board[0].submission_id == submission_id:
        return None
    judge = Judge([_scored(rows, epoch, settings)], settings)
    return board[0], judge.verdict(board[0], mine)


def _spread(row: ScoreRow) -> dict[str, Any]:
    values = list(row.seed_bpbs) or ([row.bpb] if row.bpb is not None else [])
    mean = math.fsum(values) / len(values) if values else None
    spread = (math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (len(values) - 1))
              if len(values) > 1 else None)
    flops = 6.0 * row.model_params * row.tokens if row.model_params and row.tokens else None
    return {"seeds": max(1, len(values)), "mean_bpb": mean, "spread_bpb": spread, "est_flops": flops}


class Judge:
    """Who passes whom, for one board: the paired verdict where both rows have chunk curves (cached per pair),
    the time-priority margin ε otherwise; σ_seed is the one the board's own replicas measured, or the prior."""

    def __init__(self, groups: list[list[ScoreRow]], settings: ScoringSettings) -> None:
        self.settings = settings
        rows = [row for group in groups for row in group]
        measured, dof = significance.pooled_sigma([row.seed_bpbs for row in rows])
        self.sigma_seed = significance.sigma_to_use(measured, dof, settings.ranking)
        self.measured_sigma, self.sigma_dof = measured, dof
        self._rows_curves: dict[str, Curves | None] = {}
        self.paired = any(self._curves(row) is not None for row in rows)
        self._ranking = settings.ranking.model_dump_json()
        self._verdicts: dict[tuple[str, str], Verdict | None] = {}

    def order(self, rows: list[ScoreRow]) -> list[ScoreRow]:
        """Rows placed in order of submission, each moving up past the rows it passes and stopping below the first
        one it does not (so a later row sits above an earlier one only if it passed it)."""
        if not self.paired:
            return ranked(rows, self.settings)  # ε only: the fast placement
        placed: list[ScoreRow] = []
        for row in sorted(rows, key=_arrival):
            index = len(placed)
            while index > 0 and self.passes(row, placed[index - 1]):
                index -= 1
            placed.insert(index, row)
        return placed

    def verdict(self, incumbent: ScoreRow, challenger: ScoreRow) -> Verdict | None:
        """The challenger against the incumbent on their chunk curves; None without paired data."""
        key = (incumbent.submission_id, challenger.submission_id)
        if key not in self._verdicts:
            a, b = self._curves(incumbent), self._curves(challenger)
            paired = a is not None and b is not None and significance.comparable(a, b)
            self._verdicts[key] = _compare(a, b, self._ranking, self.sigma_seed) if paired else None
        return self._verdicts[key]

    def _curves(self, row: ScoreRow) -> Curves | None:
        if row.submission_id not in self._rows_curves:
            self._rows_curves[row.submission_id] = row.curves()
        return self._rows_curves[row.submission_id]

    def passes(self, later: ScoreRow, earlier: ScoreRow) -> bool:
        """A later row passes an earlier one when found better; a row whose replicas have not all run never passes
        one whose replicas have (a clear improvement takes a replicated place only once its own seeds agree)."""
        if earlier.replicas == "done" and later.replicas in ("none", "pending"):
            return False
        verdict = self.verdict(earlier, later)
        if verdict is not None:
            return verdict.outcome == "better"
        score, earlier_score = later.final_score or 0.0, earlier.final_score or 0.0
        head_start = epoch_seconds_of(later.submitted_at) - epoch_seconds_of(earlier.submitted_at)
        return score > earlier_score and score > earlier_score * (1.0 + priority_margin(head_start, self.settings))

    def decided_apart(self, upper: ScoreRow, lower: ScoreRow) -> bool:
        """The upper row is decidedly better than the lower one: a paired verdict, else the full margin ε0."""
        verdict = self.verdict(lower, upper)
        if verdict is not None:
            return verdict.outcome == "better"
        return (upper.final_score or 0.0) > (lower.final_score or 0.0) * (1.0 + self.settings.priority_epsilon)


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


ORDER_NOTE = ("in the decided order (a later submission passes an earlier one only when better beyond the seed noise) "
              "of final score = 1/(1+bpb) × the memorisation-gap penalty (+ a held-out tie-break), zeroed by the "
              "anomaly and plausibility checks; so a lower bpb can rank below a higher one (docs/scoring.md)")


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
    if settings.weights_mode == "winner_take_all":
        return {board[0].hotkey: 1.0}
    if settings.weights_mode == "ranked":
        places = [entry for entry in board if entry.tied_with is None and (entry.final_score or 0) > 0]
        decay = settings.ranked_decay
        shares = [(1.0 - decay) * decay ** place for place in range(len(places) - 1)] + [decay ** (len(places) - 1)]
        return {entry.hotkey: share for entry, share in zip(places, shares, strict=True)}
    # per_hotkey: proportional to the final score, but nothing to an entry tied with the leader (its place is the
    # leader's: weights never move to a challenger that no decided difference separates from it).
    paid = [entry for entry in board if entry.rank == 1 or entry.tied_with != 1]
    total = math.fsum(entry.final_score for entry in paid)
    return {entry.hotkey: entry.final_score / total for entry in paid}


def waiting(rows: Iterable[ScoreRow], settings: ScoringSettings | None = None,
            epoch: int | None = None) -> dict[str, list[str]]:
    """The board entries whose weight is not settled yet: `audits` (a re-run pending) and `replicas` (seeds still
    running), by submission id in board order."""
    board = leaderboard(rows, epoch, settings)
    return {"audits": [entry.submission_id for entry in board if entry.audit == "pending"],
            "replicas": [entry.submission_id for entry in board if entry.replicas == "pending"]}


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
