"""Seed replicas (docs/scoring.md, "Seed replicas") as plain functions: which entries are re-run under other seeds,
and which seeds. A seed comes from the epoch's secret and the submission id, so nobody can tune to it; the epoch's
secret (itself drawn from the operator's secret, or at random) is revealed once the epoch closes, and anyone can
then check every seed of that epoch. The store keeps the replica queue and calls these."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Literal

from prism_ray.config import ReplicaSettings, ScoringSettings
from prism_ray.ranking.leaderboard import ScoreRow, epoch_of, leaderboard

Why = Literal["top_k", "entrant"]
_SEED_BITS = 31


def epoch_secret(settings: ReplicaSettings, epoch: int) -> str:
    """The secret of one epoch: HMAC(operator secret, epoch), or random when no operator secret is set."""
    if not settings.secret:
        return secrets.token_hex(32)
    return hmac.new(settings.secret.encode(), f"epoch:{epoch}".encode(), hashlib.sha256).hexdigest()


def replica_seed(secret: str, submission_id: str, replica: int) -> int:
    """Replica r's seed: the first 31 bits of HMAC(epoch secret, "submission_id:r")."""
    digest = hmac.new(bytes.fromhex(secret), f"{submission_id}:{replica}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def select(rows: Sequence[ScoreRow], scoring: ScoringSettings, settings: ReplicaSettings) -> dict[str, Why]:
    """Submission id → why, for the entries that must get replicas now and have none: each epoch's top k of the
    decided board of the rows that could earn, and every row that would enter that top k if its seeds agreed
    (the board with no row held back for its replicas)."""
    candidates = [row for row in rows if row.copy_of is None and row.audit != "failed" and (row.final_score or 0) > 0]
    provisional = [row.model_copy(update={"replicas": None}) for row in candidates]
    chosen: dict[str, Why] = {}
    for epoch in sorted({epoch_of(row.submitted_at, scoring) for row in candidates}):
        for entry in leaderboard(candidates, epoch, scoring)[:settings.top_k]:
            chosen.setdefault(entry.submission_id, "top_k")
        for entry in leaderboard(provisional, epoch, scoring)[:settings.top_k]:
            chosen.setdefault(entry.submission_id, "entrant")
    unreplicated = {row.submission_id for row in candidates if row.replicas == "none"}
    return {submission_id: why for submission_id, why in chosen.items() if submission_id in unreplicated}


def revealed(epoch: int, now: float, scoring: ScoringSettings) -> bool:
    """An epoch's seeds are revealed once it has closed."""
    return epoch < epoch_of(now, scoring)
