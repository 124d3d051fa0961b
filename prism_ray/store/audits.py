"""Audits in the store: queued when the policy (prism_ray/ranking/audit.py) asks for them, claimed and leased like any
queue item, and settled by comparing the re-run's report with the first run: a mismatch invalidates the score.
After every change to who could earn, the policy is asked again (the next in line may have entered the top k)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from prism_ray.config import AuditSettings, ScoringSettings
from prism_ray.evaluation.report import RunReport
from prism_ray.ranking import audit
from prism_ray.ranking.leaderboard import ScoreRow
from prism_ray.store.db import Db
from prism_ray.store.queue import Queue
from prism_ray.store.records import AUDIT_PREFIX, AuditRecord
from prism_ray.store.reruns import Ending, FirstRun, Reruns


class Audits(Reruns):
    def __init__(self, db: Db, queue: Queue, settings: AuditSettings, scoring: ScoringSettings,
                 scored_rows: Callable[[], list[ScoreRow]], invalidate: Callable[..., bool],
                 rng: random.Random) -> None:
        super().__init__(db, queue, scored_rows)
        self.settings = settings
        self.scoring = scoring
        self.invalidate = invalidate
        self.rng = rng

    def record(self, audit_id: str) -> AuditRecord | None:
        rows = self.db.rows("SELECT * FROM audits WHERE id = ?", [audit_id])
        return AuditRecord(**rows[0]) if rows else None

    def plan(self, completed: str | None = None) -> list[str]:
        """Queue the audits the policy asks for now; `completed` just completed and gets its one sample draw."""
        if self.settings.mode == "off":
            return []
        rows = self.scored_rows()
        chosen = audit.select(rows, self.scoring, self.settings)
        fresh = next((row for row in rows if row.submission_id == completed), None)
        if (fresh is not None and completed not in chosen and fresh.audit == "unaudited" and fresh.copy_of is None
                and (fresh.final_score or 0) > 0 and audit.drawn(self.settings, self.rng)):
            chosen[fresh.submission_id] = "sample"
        return self._queue_up(chosen)

    def _queue_up(self, chosen: dict[str, audit.Why]) -> list[str]:
        def audit_of(first: FirstRun, now: float) -> list[dict[str, Any]]:  # what the re-run must reproduce
            report = first.report
            return [{"original_bpb": first.bpb, "original_node": first.node,
                     "original_device": report and report.device,
                     "original_data": report and report.data and report.data.fingerprint,
                     "seed": report and report.seed, "byte_budget": report and report.byte_budget}]

        return self.queue_up(chosen, AUDIT_PREFIX, self.settings.max_attempts, audit_of)

    def finish(self, audit_id: str, owner: str, rerun: RunReport, attempt: int | None) -> AuditRecord | None:
        """Compare the re-run with the first run; a mismatch invalidates the submission's score. None (nothing
        written) unless `owner` still holds the audit's lease."""

        def judge(row: dict[str, Any]) -> Ending:
            verdict = audit.judge(audit.FirstRun(row["original_bpb"], row["original_device"], row["original_data"]),
                                  rerun, self.settings)
            return Ending(verdict.status, verdict.reasons, {"original_bpb": row["original_bpb"],
                                                            "audit_bpb": verdict.audit_bpb,
                                                            "tolerance": verdict.tolerance},
                          {"audit_bpb": verdict.audit_bpb, "tolerance": verdict.tolerance})

        with self.db.transaction():
            row = self.settle(audit_id, owner, rerun, attempt, judge)
            if row is None:
                return None
            record = self.record(audit_id)
            if record.status == "mismatch":
                self.invalidate(row["submission_id"], record.reasons, {"audit": audit_id})
            self.plan()
            return self.record(audit_id)
