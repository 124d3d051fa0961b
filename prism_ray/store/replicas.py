"""Seed replicas in the store: every scored run's chunk curve (`seed_runs`), the replica queue (queued when the
policy in prism_ray/replicas.py asks, claimed and leased like any queue item) and each epoch's seed secret, shown
only once the epoch has closed. After every change to the board the policy is asked again."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from prism_ray import replicas
from prism_ray.config import ReplicaSettings, ScoringSettings
from prism_ray.errors import Reason
from prism_ray.leaderboard import ScoreRow, epoch_of
from prism_ray.report import RunReport
from prism_ray.store.db import Db, dump, plain
from prism_ray.store.queue import Change, Queue
from prism_ray.store.records import REPLICA_PREFIX, ReplicaRecord

# What a replica must repeat: the first run's byte budget; and the epoch the submission belongs to.
_FIRST_RUN = """
SELECT s.id AS submission_id, s.hotkey, s.created_at, (r.report->>'byte_budget')::BIGINT AS byte_budget
FROM submissions s LEFT JOIN runs r ON r.submission_id = s.id AND r.attempt = s.attempt
WHERE list_contains(?::VARCHAR[], s.id)
"""


class Replicas:
    def __init__(self, db: Db, queue: Queue, settings: ReplicaSettings, scoring: ScoringSettings,
                 scored_rows: Callable[[], list[dict[str, Any]]]) -> None:
        self.db = db
        self.queue = queue
        self.settings = settings
        self.scoring = scoring
        self.scored_rows = scored_rows

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

    def keep(self, submission_id: str, report: dict[str, Any], replica_id: str | None = None) -> None:
        """A completed run's chunk curve (the scored run's, or a replica's) beside its seed and bpb."""
        chunks = report.get("chunks") or {}
        self.db.execute("INSERT INTO seed_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [submission_id, replica_id, report.get("seed"), report.get("bpb"), chunks.get("span"),
                         chunks.get("nats"), chunks.get("bytes"), report.get("device"), report.get("train_seconds"),
                         self.db.clock()])

    def plan(self) -> list[str]:
        """Queue R replicas for each entry the policy asks for now; their ids."""
        if self.settings.mode == "off":
            return []
        chosen = replicas.select([ScoreRow(**row) for row in self.scored_rows()], self.scoring, self.settings)
        if not chosen:
            return []
        now = self.db.clock()
        ids = []
        with self.db.transaction() as con:
            for first in self.db.rows(_FIRST_RUN, [list(chosen)]):
                epoch = epoch_of(first["created_at"], self.scoring)
                secret = self._secret(epoch, now)
                for replica in range(1, self.settings.count + 1):
                    replica_id = f"{REPLICA_PREFIX}{uuid.uuid4().hex}"
                    con.execute(
                        "INSERT INTO replicas (id, submission_id, hotkey, replica, epoch, why, status, stage, "
                        "reasons, attempt, max_attempts, seed, byte_budget, created_at, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, 'pending', 'queued', '[]', 0, ?, ?, ?, ?, ?)",
                        [replica_id, first["submission_id"], first["hotkey"], replica, epoch,
                         chosen[first["submission_id"]], self.settings.max_attempts,
                         replicas.replica_seed(secret, first["submission_id"], replica), first["byte_budget"], now,
                         now])
                    ids.append(replica_id)
        return ids

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

    def finish(self, replica_id: str, owner: str, report: BaseModel | dict[str, Any],
               attempt: int | None) -> ReplicaRecord | None:
        """Keep a completed replica's curve; a replica that did not complete fails (its seed is then missing from
        the entry's spread, the score stands). None (nothing written) unless `owner` still holds the lease."""
        rerun = RunReport.model_validate(plain(report))
        with self.db.transaction():
            rows = self.queue.guarded([replica_id], ("running",), owner, attempt)
            if not rows:
                return None
            row = rows[0]
            if rerun.status == "completed" and rerun.bpb is not None:
                status, reasons = "completed", []
                self.keep(row["submission_id"], plain(rerun), replica_id)
            else:
                cause = rerun.reasons[0] if rerun.reasons else Reason(rule="infra:no_verdict", message="no reason")
                status, reasons = "failed", [Reason(
                    rule="replica:not_completed", message=f"the re-run under another seed did not complete: {cause}",
                    file=cause.file, line=cause.line)]
            self.queue.apply([Change(replica_id, row["attempt"], status, rerun.stage, reasons, status,
                                     {"attempt": row["attempt"], "bpb": rerun.bpb, "reasons": dump(reasons)},
                                     plain(rerun))])
            self.db.execute("UPDATE replicas SET bpb = ?, node = (SELECT node FROM runs WHERE submission_id = ? AND "
                            "attempt = ?) WHERE id = ?", [rerun.bpb, replica_id, row["attempt"], replica_id])
            self.plan()
            return self.records(ids=[replica_id])[0]

    def fail(self, replica_id: str, reasons: Sequence[Reason], stage: str, owner: str | None,
             attempt: int | None) -> bool:
        """The re-run could not be carried out: the replica fails; the entry keeps the seeds it has."""
        with self.db.transaction():
            rows = self.queue.guarded([replica_id], ("pending", "running"), owner, attempt)
            self.queue.apply([Change(row["id"], row["attempt"], "failed", stage, list(reasons), "failed",
                                     {"reasons": dump(reasons)}) for row in rows])
            if rows:
                self.plan()
            return bool(rows)
