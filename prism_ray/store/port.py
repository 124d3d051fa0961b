"""The store port: the store methods the backend and the read model use, typed in and out (docs/architecture.md,
"Layers"). `Store` has them itself; `backend.LocalStore` serialises them over a Store of this process and
`cluster.client.ActorStore` sends each to the store actor as one round trip."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from prism_ray.errors import Reason
from prism_ray.evaluation.scoring import CurvePoint
from prism_ray.ranking.leaderboard import ScoreRow
from prism_ray.store.records import AuditRecord, QueueSnapshot, ReplicaRecord, SubmissionDetail, SubmissionRecord
from prism_ray.store.submissions import NewSubmission


class StorePort(Protocol):
    # --- writes
    def create_submissions(self, items: Sequence[NewSubmission]) -> list[SubmissionRecord]: ...

    def reject_submission(self, hotkey: str, filename: str | None, reasons: Sequence[Reason], stage: str = "intake",
                          metadata: dict[str, Any] | None = None) -> SubmissionRecord: ...

    def check_nonces(self, checks: Sequence[tuple[str, str, float]]) -> list[bool]: ...

    def probe(self) -> int: ...

    # --- reads
    def changes_since(self, since: float | None) -> tuple[float | None, list[tuple[str, str]]]: ...

    def detail(self, submission_id: str) -> SubmissionDetail | None: ...

    def curve(self, submission_id: str) -> list[CurvePoint]: ...

    def scored_rows(self) -> list[ScoreRow]: ...

    def queue_snapshot(self, limit: int, recent: int) -> QueueSnapshot: ...

    def stats(self) -> dict[str, Any]: ...

    def rejection_counts(self, hotkey: str, since: float) -> tuple[int, int]: ...

    def list_audits(self, status: str | None = None, submission_id: str | None = None,
                    limit: int = 100) -> list[AuditRecord]: ...

    def list_replicas(self, status: str | None = None, submission_id: str | None = None,
                      limit: int = 100) -> list[ReplicaRecord]: ...
