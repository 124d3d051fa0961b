"""The rows the store hands out, as pydantic models: a submission, an audit, a replica, an attempt (`runs`), a timeline
event, and the composite reads (a submission's detail, the queue) that one call answers in one round trip. The scores
row is `scoring.ScoreFields`, a scored submission `leaderboard.ScoreRow`, a curve point `scoring.CurvePoint`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from prism_ray.errors import Reason
from prism_ray.evaluation.report import RunReport

SubmissionStatus = Literal["pending", "running", "completed", "rejected", "failed", "held", "duplicate"]
AuditStatus = Literal["pending", "running", "passed", "mismatch", "failed"]
ReplicaStatus = Literal["pending", "running", "completed", "failed"]
AUDIT_PREFIX = "aud_"  # a queue item's id names its queue: `sub_…` submissions, `aud_…` audits, `rep_…` replicas
REPLICA_PREFIX = "rep_"


class QueueItem(BaseModel):
    """The columns every queue item has: its place in line, where it is, why, and who holds its lease."""

    id: str
    seq: int
    hotkey: str
    stage: str
    reasons: list[Reason] = Field(default_factory=list)
    attempt: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: float | None
    created_at: float
    updated_at: float
    finished_at: float | None


class SubmissionRecord(QueueItem):
    """One row of `submissions`; `reused` is True when create_submission handed back an earlier submission."""

    status: SubmissionStatus
    filename: str | None
    bundle_sha256: str | None
    fingerprint: str | None
    name: str | None
    tokenizer: str | None
    metadata: dict[str, Any] | None
    duplicate_of: str | None
    architecture_family: str | None = None
    training_fingerprint: str | None = None
    canonical_fingerprint: str | None = None
    copy_of: str | None = None
    near_copy_of: str | None = None
    notes: list[Reason] = Field(default_factory=list, description="typed notes that stay with the submission "
                                "whatever its status (copy:duplicate, copy:near)")
    zip_sha256: str | None = None
    reused: bool = False

    @field_validator("notes", mode="before")
    @classmethod
    def _no_notes(cls, notes: Any) -> Any:
        return [] if notes is None else notes


class RerunRecord(QueueItem):
    """What an audit and a seed replica share: a completed submission re-run from its stored zip under a given seed
    and byte budget (None: the run's own), and the node the re-run trained on."""

    submission_id: str
    seed: int | None
    byte_budget: int | None
    node: str | None = None


class AuditRecord(RerunRecord):
    """One row of `audits`: a completed submission re-run on another node, and how the two runs compared."""

    status: AuditStatus
    why: Literal["top_k", "two_tier", "sample"]
    original_bpb: float | None
    original_node: str | None = Field(description="the node the first run trained on; the audit avoids it")
    original_device: str | None
    original_data: str | None = Field(description="fingerprint of the dataset the first run read")
    audit_bpb: float | None
    tolerance: float | None = Field(description="the relative bpb difference the comparison allowed")


class ReplicaRecord(RerunRecord):
    """One row of `replicas`: a completed submission re-run under another, secret seed (docs/scoring.md,
    "Seed replicas"). The seed is shown only once its epoch has closed."""

    status: ReplicaStatus
    replica: int = Field(description="1 … R")
    epoch: int
    why: Literal["top_k", "entrant"]
    bpb: float | None


class RunRecord(BaseModel):
    """One attempt of a queue item (a row of `runs`): where it ran, how far it got, and its report once it ended."""

    id: str
    submission_id: str = Field(description="the queue item's id: a submission's, an audit's or a replica's")
    attempt: int
    node: str | None = None
    started_at: float
    finished_at: float | None = None
    status: str
    stage: str | None = None
    reasons: list[Reason] = Field(default_factory=list)
    report: RunReport | None = None
    progress_bytes: int | None = None
    progress_bpb: float | None = None
    progress_at: float | None = None
    tokens_per_second: float | None = None


class TimelineEvent(BaseModel):
    """One event of a queue item's append-only timeline."""

    seq: int
    created_at: float
    kind: str
    stage: str | None
    detail: dict[str, Any]


class SubmissionDetail(BaseModel):
    """One submission as its status page and `GET /v1/submissions/{id}` show it."""

    record: SubmissionRecord
    runs: list[RunRecord]
    events: list[TimelineEvent]


class QueueSnapshot(BaseModel):
    """The queue as one read sees it: the running submissions (oldest first) with their current attempts, the waiting
    ones in line, and the claim-to-finish seconds of the latest completed runs (newest first)."""

    running: list[SubmissionRecord]
    current_runs: dict[str, RunRecord] = Field(description="running submission id → its current attempt")
    pending: list[SubmissionRecord]
    recent_run_seconds: list[float]
