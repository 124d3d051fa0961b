"""The rows the store hands out, as pydantic models: a submission and an audit."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from prism_ray.errors import Reason

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


class AuditRecord(QueueItem):
    """One row of `audits`: a completed submission re-run on another node, and how the two runs compared."""

    status: AuditStatus
    submission_id: str
    why: Literal["top_k", "two_tier", "sample"]
    original_bpb: float | None
    original_node: str | None = Field(description="the node the first run trained on; the audit avoids it")
    original_device: str | None
    original_data: str | None = Field(description="fingerprint of the dataset the first run read")
    seed: int | None
    byte_budget: int | None
    audit_bpb: float | None
    tolerance: float | None = Field(description="the relative bpb difference the comparison allowed")
    node: str | None = Field(description="the node the audit trained on")


class ReplicaRecord(QueueItem):
    """One row of `replicas`: a completed submission re-run under another, secret seed (docs/scoring.md,
    "Seed replicas"). The seed is shown only once its epoch has closed."""

    status: ReplicaStatus
    submission_id: str
    replica: int = Field(description="1 … R")
    epoch: int
    why: Literal["top_k", "entrant"]
    seed: int | None = Field(description="None while the epoch is open (hidden)")
    byte_budget: int | None
    bpb: float | None
    node: str | None = None
