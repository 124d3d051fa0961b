"""What the audit queue and the seed-replica queue share: both re-run a completed submission from its stored zip, as
queue items leased like submissions; both read the first run they repeat, end with the re-run's report (or fail
without a verdict) and then ask their policy again."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prism_ray.errors import Reason
from prism_ray.evaluation.report import RunReport
from prism_ray.ranking.leaderboard import ScoreRow
from prism_ray.store.db import Db, dump
from prism_ray.store.queue import Change, Queue

# The scored run a re-run repeats: the submission, its score and the attempt that scored it.
_FIRST_RUNS = """
SELECT s.id AS submission_id, s.hotkey, s.created_at, sc.bpb, r.node, r.report
FROM submissions s LEFT JOIN scores sc ON sc.submission_id = s.id
LEFT JOIN runs r ON r.submission_id = s.id AND r.attempt = s.attempt
WHERE list_contains(?::VARCHAR[], s.id) ORDER BY s.seq
"""


@dataclass(frozen=True)
class FirstRun:
    """The scored run of a submission, as a re-run must repeat it."""

    submission_id: str
    hotkey: str
    created_at: float
    bpb: float | None
    node: str | None
    report: RunReport | None


@dataclass(frozen=True)
class Ending:
    """How a re-run ended: its status and reasons, what its timeline event adds, the columns of its row it sets."""

    status: str
    reasons: list[Reason]
    detail: dict[str, Any]
    columns: dict[str, Any] = field(default_factory=dict)


class Reruns:
    """A queue of re-runs (`audits` or `replicas`); `plan()` queues what its policy asks for now."""

    def __init__(self, db: Db, queue: Queue, scored_rows: Callable[[], list[ScoreRow]]) -> None:
        self.db = db
        self.queue = queue
        self.scored_rows = scored_rows

    def plan(self) -> list[str]:
        raise NotImplementedError

    def queue_up(self, chosen: dict[str, str], prefix: str, max_attempts: int,
                 items: Callable[[FirstRun, float], list[dict[str, Any]]]) -> list[str]:
        """Queue re-runs of the chosen submissions (id → why): `items` gives the columns of each of a first run's
        re-runs beyond those every re-run has (seed and byte budget included). Their ids."""
        if not chosen:
            return []
        now = self.db.clock()
        ids = []
        with self.db.transaction() as con:
            for first in self.first_runs(list(chosen)):
                for columns in items(first, now):
                    row = {"id": f"{prefix}{uuid.uuid4().hex}", "submission_id": first.submission_id,
                           "hotkey": first.hotkey, "why": chosen[first.submission_id], "status": "pending",
                           "stage": "queued", "reasons": "[]", "attempt": 0, "max_attempts": max_attempts,
                           "created_at": now, "updated_at": now, **columns}
                    con.execute(f"INSERT INTO {self.queue.table} ({', '.join(row)}) "
                                f"VALUES ({', '.join('?' for _ in row)})", list(row.values()))
                    ids.append(row["id"])
        return ids

    def first_runs(self, submission_ids: Sequence[str]) -> list[FirstRun]:
        return [FirstRun(**{**row, "report": row["report"] and RunReport.model_validate(row["report"])})
                for row in self.db.rows(_FIRST_RUNS, [list(submission_ids)])]

    def settle(self, item_id: str, owner: str, report: RunReport, attempt: int | None,
               judge: Callable[[dict[str, Any]], Ending]) -> dict[str, Any] | None:
        """End a running re-run with its report as `judge` decides from its row; the row, or None (nothing written)
        unless `owner` still holds the lease. The caller asks the policies again."""
        with self.db.transaction():
            rows = self.queue.guarded([item_id], ("running",), owner, attempt)
            if not rows:
                return None
            row = rows[0]
            ending = judge(row)
            self.queue.apply([Change(item_id, row["attempt"], ending.status, report.stage, ending.reasons,
                                     ending.status, {"attempt": row["attempt"], **ending.detail,
                                                     "reasons": dump(ending.reasons)}, report)])
            sets = "".join(f"{name} = ?, " for name in ending.columns)
            self.db.execute(f"UPDATE {self.queue.table} SET {sets}node = (SELECT node FROM runs WHERE "
                            "submission_id = ? AND attempt = ?) WHERE id = ?",
                            [*ending.columns.values(), item_id, row["attempt"], item_id])
            return row

    def fail(self, item_id: str, reasons: Sequence[Reason], stage: str, owner: str | None, attempt: int | None,
             report: RunReport | None = None) -> bool:
        """The re-run could not be carried out (no verdict on the code): it fails, and the policy is asked again."""
        with self.db.transaction():
            rows = self.queue.guarded([item_id], ("pending", "running"), owner, attempt)
            self.queue.apply([Change(row["id"], row["attempt"], "failed", stage, list(reasons), "failed",
                                     {"reasons": dump(reasons)}, report) for row in rows])
            if rows:
                self.plan()
            return bool(rows)
