"""The store's reads, as the facade (`Store`) answers them: records, timelines, attempts, curves, the scored rows,
counts, and the composite reads that answer a page in one call. Nothing here writes."""

from __future__ import annotations

from typing import Any

from prism_ray.evaluation.scoring import CurvePoint
from prism_ray.ranking.leaderboard import ScoreRow
from prism_ray.store.audits import Audits
from prism_ray.store.reads import Reads
from prism_ray.store.records import (
    AuditRecord,
    QueueSnapshot,
    ReplicaRecord,
    RunRecord,
    SubmissionDetail,
    SubmissionRecord,
    TimelineEvent,
)
from prism_ray.store.replicas import Replicas
from prism_ray.store.submissions import Submissions


class StoreReads:
    _reads: Reads
    _submissions: Submissions
    _audits: Audits
    _replicas: Replicas

    # --- reads --------------------------------------------------------------------------------------------------

    def get_submission(self, submission_id: str) -> SubmissionRecord | None:
        return self._submissions.record(submission_id)

    def list_submissions(self, status: str | None = None, hotkey: str | None = None,
                         limit: int = 100) -> list[SubmissionRecord]:
        """Newest first."""
        return self._reads.submissions(status, hotkey, limit)

    def events(self, item_id: str) -> list[TimelineEvent]:
        """The timeline of a submission, or of an audit (by its `aud_…` id)."""
        return self._reads.events(item_id)

    def runs(self, item_id: str) -> list[RunRecord]:
        """The attempts of a submission, or of an audit (by its `aud_…` id)."""
        return self._reads.runs(item_id)

    def curve(self, submission_id: str) -> list[CurvePoint]:
        """The scored attempt's learning curve: cumulative target bytes vs. running bpb."""
        return self._reads.curve(submission_id)

    def detail(self, submission_id: str) -> SubmissionDetail | None:
        """A submission with its attempts and timeline, in one call (the status page and the API read this)."""
        return self._reads.detail(submission_id)

    def queue_snapshot(self, limit: int, recent: int) -> QueueSnapshot:
        """The running and waiting submissions (up to `limit` each), the running ones' current attempts and the
        durations of the latest `recent` completed runs, in one call (the queue's page and ETA read this)."""
        return self._reads.queue_snapshot(limit, recent)

    def scored_rows(self) -> list[ScoreRow]:
        """Completed submissions with their scores, audit state and seed runs, best first."""
        return self._reads.scored_rows()

    def get_audit(self, audit_id: str) -> AuditRecord | None:
        return self._audits.record(audit_id)

    def list_audits(self, status: str | None = None, submission_id: str | None = None,
                    limit: int = 100) -> list[AuditRecord]:
        """Oldest first."""
        return self._reads.audits(status, submission_id, limit)

    def get_replica(self, replica_id: str) -> ReplicaRecord | None:
        """A replica; its seed is None while its epoch is open."""
        found = self._replicas.records(ids=[replica_id], limit=1)
        return found[0] if found else None

    def list_replicas(self, status: str | None = None, submission_id: str | None = None,
                      limit: int = 100) -> list[ReplicaRecord]:
        """Oldest first; seeds hidden while their epoch is open."""
        return self._replicas.records(status, submission_id, limit=limit)

    def replica_stats(self) -> dict[str, Any]:
        """The replica queue's counts, like `audit_stats`."""
        return self._reads.replica_stats()

    def epoch_secret(self, epoch: int) -> str | None:
        """The seed secret of a closed epoch (every replica seed of it follows from it); None while it is open."""
        return self._replicas.secret(epoch)

    def stats(self) -> dict[str, Any]:
        """Submissions by status, the queue's depth and what is in flight."""
        return self._reads.stats()

    def audit_stats(self) -> dict[str, Any]:
        """The same for the audit queue."""
        return self._reads.audit_stats()

    def changes_since(self, since: float | None) -> tuple[float | None, list[tuple[str, str]]]:
        """The newest update time and the (id, status) of submissions changed since `since` (read_model.py)."""
        return self._reads.changes_since(since)

    def rejection_counts(self, hotkey: str, since: float) -> tuple[int, int]:
        """(stored rejections since `since`, of them this hotkey's): the bound on stored rejections."""
        return self._reads.rejection_counts(hotkey, since)
