"""The client API the CLI, scripts and the HTTP layer call on a running cluster: submit, status, wait, leaderboard,
weights, export — and ClusterBackend, the one Backend (prism_ray/backend/store_backend.py) bound to the store actor.

Intake (unpacking and the two-script contract) runs in the caller's process, so a broken bundle is answered at once
and stored as `rejected` without any task; accepted bundles go to the store's queue and the scheduler is woken.
Nothing here runs miner code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from prism_ray.backend.store_backend import Backend
from prism_ray.cluster.runtime import ClusterHandle
from prism_ray.cluster.tasks import placement_notice
from prism_ray.errors import Reason
from prism_ray.evaluation.scoring import CurvePoint
from prism_ray.intake.bundle import Bundle
from prism_ray.ranking.leaderboard import LeaderboardEntry, ScoreRow
from prism_ray.store import (
    TERMINAL_STATUSES,
    AuditRecord,
    NewSubmission,
    QueueSnapshot,
    ReplicaRecord,
    SubmissionDetail,
    SubmissionRecord,
)

SETTLED_STATUSES = (*TERMINAL_STATUSES, "held")  # held waits for an operator, not for the cluster
_NODE_REFRESH_SECONDS = 10.0


class ActorStore:
    """StorePort over the store actor: each call is one round trip (the composite reads answer a page in one)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def create_submissions(self, items: Sequence[NewSubmission]) -> list[SubmissionRecord]:
        return ray.get(self.actor.create_submissions.remote(items))

    def reject_submission(self, hotkey: str, filename: str | None, reasons: Sequence[Reason], stage: str = "intake",
                          metadata: dict[str, Any] | None = None) -> SubmissionRecord:
        return ray.get(self.actor.reject_submission.remote(hotkey, filename, reasons, stage, metadata))

    def check_nonces(self, checks: Sequence[tuple[str, str, float]]) -> list[bool]:
        return ray.get(self.actor.check_nonces.remote(checks))

    def probe(self) -> int:
        return ray.get(self.actor.probe.remote())

    def changes_since(self, since: float | None) -> tuple[float | None, list[tuple[str, str]]]:
        return ray.get(self.actor.changes_since.remote(since))

    def detail(self, submission_id: str) -> SubmissionDetail | None:
        return ray.get(self.actor.detail.remote(submission_id))

    def curve(self, submission_id: str) -> list[CurvePoint]:
        return ray.get(self.actor.curve.remote(submission_id))

    def scored_rows(self) -> list[ScoreRow]:
        return ray.get(self.actor.scored_rows.remote())

    def queue_snapshot(self, limit: int, recent: int) -> QueueSnapshot:
        return ray.get(self.actor.queue_snapshot.remote(limit, recent))

    def stats(self) -> dict[str, Any]:
        return ray.get(self.actor.stats.remote())

    def rejection_counts(self, hotkey: str, since: float) -> tuple[int, int]:
        return ray.get(self.actor.rejection_counts.remote(hotkey, since))

    def list_audits(self, status: str | None = None, submission_id: str | None = None,
                    limit: int = 100) -> list[AuditRecord]:
        return ray.get(self.actor.list_audits.remote(status, submission_id, limit))

    def list_replicas(self, status: str | None = None, submission_id: str | None = None,
                      limit: int = 100) -> list[ReplicaRecord]:
        return ray.get(self.actor.list_replicas.remote(status, submission_id, limit))


class NodeAddresses:
    """Ray node id → "hostname (ip)", from the cluster's node table; looked up again (at most every few seconds)
    when an unknown id appears. Dead nodes stay in the table, so a finished run still shows where it ran."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}
        self._looked_at = float("-inf")

    def __call__(self, node_id: str) -> str | None:
        if node_id not in self._known and time.monotonic() - self._looked_at > _NODE_REFRESH_SECONDS:
            self._looked_at = time.monotonic()
            self._known = {node["NodeID"]: _label(node) for node in ray.nodes()}
        return self._known.get(node_id)


def _label(node: dict[str, Any]) -> str:
    ip, host = node.get("NodeManagerAddress") or "", node.get("NodeManagerHostname") or ""
    return f"{host} ({ip})" if host and ip and host != ip else ip or host


class ClusterBackend(Backend):
    """The Backend over a running cluster, for Serve replicas and the CLI: `ClusterBackend(connect(settings))`."""

    def __init__(self, handle: ClusterHandle) -> None:
        self.handle = handle
        super().__init__(ActorStore(handle.store), handle.settings, on_queued=handle.scheduler.wake.remote,
                         node_address=NodeAddresses())

    def placement_notice(self) -> str | None:
        if self.handle.settings.gpus_per_run == 1:  # any GPU takes a run: nothing to say
            return None
        return placement_notice(ray.nodes(), self.handle.settings.gpus_per_run)


def submit(handle: ClusterHandle, hotkey: str, filename: str, source: bytes | str | Path | Bundle,
           metadata: dict[str, Any] | None = None) -> SubmissionRecord:
    """A new `pending` submission, a `rejected` one (intake or contract rule broken), a `duplicate` of another
    hotkey's earlier code, or this hotkey's own earlier submission of the same code (`reused`)."""
    return ClusterBackend(handle).submit(hotkey, filename, source, metadata)


def status(handle: ClusterHandle, submission_id: str) -> SubmissionRecord | None:
    return ray.get(handle.store.get_submission.remote(submission_id))


def wait(handle: ClusterHandle, submission_id: str, timeout: float, poll: float = 0.2) -> SubmissionRecord | None:
    """The submission once it settles (a terminal status or `held`), or as it is when `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        record = status(handle, submission_id)
        if record is None or record.status in SETTLED_STATUSES or time.monotonic() >= deadline:
            return record
        time.sleep(poll)


def leaderboard(handle: ClusterHandle, epoch: int | None = None) -> list[LeaderboardEntry]:
    return ClusterBackend(handle).leaderboard(epoch)


def weights(handle: ClusterHandle, epoch: int | None = None) -> dict[str, float]:
    return ClusterBackend(handle).weights(epoch)


def export(handle: ClusterHandle, out_dir: Path | str) -> list[Path]:
    """Every table as Parquet, from one snapshot, written by the store actor (so on the head node's disk)."""
    return ray.get(handle.store.export_parquet.remote(str(out_dir)))
