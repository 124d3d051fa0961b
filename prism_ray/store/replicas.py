"""Seed replicas in the store: every scored run's chunk curve (`seed_runs`), the replica queue (queued when the
policy in prism_ray/ranking/replicas.py asks, claimed and leased like any queue item) and each epoch's seed secret,
shown only once the epoch has closed. After every change to the board the policy is asked again."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prism_ray.config import ReplicaSettings, ScoringSettings
from prism_ray.errors import Reason
from prism_ray.evaluation.report import RunReport
from prism_ray.ranking import audit, replicas
from prism_ray.ranking.leaderboard import ScoreRow, epoch_of
from prism_ray.store.db import Db
from prism_ray.store.queue import Queue
from prism_ray.store.records import REPLICA_PREFIX, ReplicaRecord
from prism_ray.store.reruns import Ending, FirstRun, Reruns


class Replicas(Reruns):
    def __init__(self, db: Db, queue: Queue, settings: ReplicaSettings, scoring: ScoringSettings,
                 scored_rows: Callable[[], list[ScoreRow]], invalidate: Callable[..., bool]) -> None:
        super().__init__(db, queue, scored_rows)
        self.settings = settings
        self.scoring = scoring
        self.invalidate = invalidate

    def records(self, status: str | None = None, submission_id: str | None = None, ids: Sequence[str] | None = None,
                limit: int = 100, reveal: bool = False) -> list[ReplicaRecord]:
        """Oldest first. The seed is hidden while its epoch is open unless `reveal` (the scheduler's claim)."""
        rows = self.db.rows("SELECT * FROM replicas WHERE (?::VARCHAR IS NULL OR status = ?) AND "
                            "(?::VARCHAR IS NULL OR submission_id = ?) AND "
                            "(?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], id)) ORDER BY seq LIMIT ?",
                            [status, status, submission_id, submission_id, ids, ids, limit])
        now = self.db.clock()
        return [ReplicaRecord(**{**row, "seed": row["seed"] if reveal or replicas.revealed(row["epoch"], now,
                                                                                           self.scoring) else None})
                for row in rows]

    def keep(self, submission_id: str, report: RunReport, replica_id: str | None = None) -> None:
        """A completed run's chunk curve (the scored run's, or a replica's) beside its seed and bpb."""
        chunks = report.chunks
        self.db.execute("INSERT INTO seed_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [submission_id, replica_id, report.seed, report.bpb, chunks and chunks.span,
                         chunks and list(chunks.nats), chunks and list(chunks.bytes), report.device,
                         report.train_seconds, self.db.clock()])

    def plan(self) -> list[str]:
        """Queue R replicas for each entry the policy asks for now; their ids."""
        if self.settings.mode == "off":
            return []
        chosen = replicas.select(self.scored_rows(), self.scoring, self.settings)

        def seeded(first: FirstRun, now: float) -> list[dict[str, Any]]:  # R runs under the epoch's seeds
            epoch = epoch_of(first.created_at, self.scoring)
            secret = self._secret(epoch, now)
            return [{"replica": replica, "epoch": epoch,
                     "seed": replicas.replica_seed(secret, first.submission_id, replica),
                     "byte_budget": first.report and first.report.byte_budget}
                    for replica in range(1, self.settings.count + 1)]

        return self.queue_up(chosen, REPLICA_PREFIX, self.settings.max_attempts, seeded)

    def secret(self, epoch: int) -> str | None:
        """An epoch's seed secret, once the epoch has closed (None before, or when it drew no replicas)."""
        if not replicas.revealed(epoch, self.db.clock(), self.scoring):
            return None
        row = self.db.execute("SELECT secret FROM epoch_secrets WHERE epoch = ?", [epoch]).fetchone()
        return row[0] if row else None

    def _secret(self, epoch: int, now: float) -> str:
        row = self.db.execute("SELECT secret FROM epoch_secrets WHERE epoch = ?", [epoch]).fetchone()
        if row:
            return row[0]
        secret = replicas.epoch_secret(self.settings, epoch)
        self.db.execute("INSERT INTO epoch_secrets VALUES (?, ?, ?)", [epoch, secret, now])
        return secret

    def finish(self, replica_id: str, owner: str, rerun: RunReport, attempt: int | None) -> ReplicaRecord | None:
        """Keep a completed replica's curve. A replica the system stopped fails and the score stands (its seed is
        missing from the entry's spread); one that failed on the code's account invalidates the score, or code that
        sees it is a replica (its seed is not the published one) could refuse every seed but that one. None (nothing
        written) unless `owner` still holds the lease."""

        def judge(row: dict[str, Any]) -> Ending:
            if rerun.status == "completed" and rerun.bpb is not None:
                self.keep(row["submission_id"], rerun, replica_id)
                return Ending("completed", [], {"bpb": rerun.bpb}, {"bpb": rerun.bpb})
            cause = rerun.reasons[0] if rerun.reasons else Reason(rule="infra:no_verdict", message="no reason")
            if cause.rule.split(":")[0] in audit.SYSTEM_FAMILIES:
                reason = Reason(rule="replica:not_completed", message="the re-run under another seed could not be "
                                f"completed: {cause}")
            else:
                reason = Reason(rule="replica:seed_failed", message="the re-run of the same code under another secret "
                                f"seed failed: {cause}. A score must hold under any seed: it is invalidated",
                                file=cause.file, line=cause.line)
            return Ending("failed", [reason], {"bpb": rerun.bpb}, {"bpb": rerun.bpb})

        with self.db.transaction():
            row = self.settle(replica_id, owner, rerun, attempt, judge)
            if row is None:
                return None
            record = self.records(ids=[replica_id])[0]
            if record.reasons and record.reasons[0].rule == "replica:seed_failed":
                self.invalidate(row["submission_id"], record.reasons, {"replica": replica_id}, stage="replica")
            self.plan()
            return self.records(ids=[replica_id])[0]
