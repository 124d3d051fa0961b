"""Audits in the store: queued when the policy (prism_ray/audit.py) asks for them, claimed and leased like any
queue item, and settled by comparing the re-run's report with the first run: a mismatch invalidates the score.
After every change to who could earn, the policy is asked again (the next in line may have entered the top k)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from prism_ray import audit
from prism_ray.config import AuditSettings, ScoringSettings
from prism_ray.errors import Reason
from prism_ray.leaderboard import ScoreRow
from prism_ray.report import RunReport
from prism_ray.store.db import Db, dump, plain
from prism_ray.store.queue import Change, Queue
from prism_ray.store.records import AUDIT_PREFIX, AuditRecord

# The first run an audit must reproduce: its score, node, device, data, seed and budget, from its report.
_FIRST_RUN = """
SELECT s.id AS submission_id, s.hotkey, sc.bpb, r.node, r.report->>'device' AS device,
       r.report->'data'->>'fingerprint' AS data, (r.report->>'seed')::BIGINT AS seed,
       (r.report->>'byte_budget')::BIGINT AS byte_budget
FROM submissions s JOIN scores sc ON sc.submission_id = s.id
LEFT JOIN runs r ON r.submission_id = s.id AND r.attempt = s.attempt
WHERE list_contains(?::VARCHAR[], s.id)
"""


class Audits:
    def __init__(self, db: Db, queue: Queue, settings: AuditSettings, scoring: ScoringSettings,
                 scored_rows: Callable[[], list[dict[str, Any]]], invalidate: Callable[..., bool],
                 rng: random.Random) -> None:
        self.db = db
        self.queue = queue
        self.settings = settings
        self.scoring = scoring
        self.scored_rows = scored_rows
        self.invalidate = invalidate
        self.rng = rng

    def record(self, audit_id: str) -> AuditRecord | None:
        rows = self.db.rows("SELECT * FROM audits WHERE id = ?", [audit_id])
        return AuditRecord(**rows[0]) if rows else None

    def plan(self, completed: str | None = None) -> list[str]:
        """Queue the audits the policy asks for now; `completed` just completed and gets its one sample draw."""
        if self.settings.mode == "off":
            return []
        rows = [ScoreRow(**row) for row in self.scored_rows()]
        chosen = audit.select(rows, self.scoring, self.settings)
        fresh = next((row for row in rows if row.submission_id == completed), None)
        if (fresh is not None and completed not in chosen and fresh.audit == "unaudited" and fresh.copy_of is None
                and (fresh.final_score or 0) > 0 and audit.drawn(self.settings, self.rng)):
            chosen[fresh.submission_id] = "sample"
        return self._queue_up(chosen)

    def _queue_up(self, chosen: dict[str, audit.Why]) -> list[str]:
        if not chosen:
            return []
        now = self.db.clock()
        ids = []
        with self.db.transaction() as con:
            for first in self.db.rows(_FIRST_RUN, [list(chosen)]):
                audit_id = f"{AUDIT_PREFIX}{uuid.uuid4().hex}"
                why = chosen[first["submission_id"]]
                con.execute(
                    "INSERT INTO audits (id, submission_id, hotkey, why, status, stage, reasons, attempt, "
                    "max_attempts, original_bpb, original_node, original_device, original_data, seed, byte_budget, "
                    "created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, 'pending', 'queued', '[]', 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [audit_id, first["submission_id"], first["hotkey"], why, self.settings.max_attempts, first["bpb"],
                     first["node"], first["device"], first["data"], first["seed"], first["byte_budget"], now, now])
                ids.append(audit_id)
        return ids

    def finish(self, audit_id: str, owner: str, report: BaseModel | dict[str, Any],
               attempt: int | None) -> AuditRecord | None:
        """Compare the re-run with the first run; a mismatch invalidates the submission's score. None (nothing
        written) unless `owner` still holds the audit's lease."""
        rerun = RunReport.model_validate(plain(report))
        with self.db.transaction():
            rows = self.queue.guarded([audit_id], ("running",), owner, attempt)
            if not rows:
                return None
            row = rows[0]
            verdict = audit.judge(audit.FirstRun(row["original_bpb"], row["original_device"], row["original_data"]),
                                  rerun, self.settings)
            detail = {"attempt": row["attempt"], "original_bpb": row["original_bpb"], "audit_bpb": verdict.audit_bpb,
                      "tolerance": verdict.tolerance, "reasons": dump(verdict.reasons)}
            self.queue.apply([Change(audit_id, row["attempt"], verdict.status, rerun.stage, verdict.reasons,
                                     verdict.status, detail, plain(rerun))])
            self.db.execute("UPDATE audits SET audit_bpb = ?, tolerance = ?, node = (SELECT node FROM runs WHERE "
                            "submission_id = ? AND attempt = ?) WHERE id = ?",
                            [verdict.audit_bpb, verdict.tolerance, audit_id, row["attempt"], audit_id])
            if verdict.status == "mismatch":
                self.invalidate(row["submission_id"], verdict.reasons, {"audit": audit_id})
            self.plan()
            return self.record(audit_id)

    def fail(self, audit_id: str, reasons: Sequence[Reason], stage: str, owner: str | None,
             attempt: int | None) -> bool:
        """The re-run could not be carried out (no verdict on the code): the audit fails and the score earns nothing."""
        with self.db.transaction():
            rows = self.queue.guarded([audit_id], ("pending", "running"), owner, attempt)
            self.queue.apply([Change(row["id"], row["attempt"], "failed", stage, list(reasons), "failed",
                                     {"reasons": dump(reasons)}) for row in rows])
            if rows:
                self.plan()
            return bool(rows)
