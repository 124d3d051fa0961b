"""The store actor: the one owner of the DuckDB file on a cluster (docs/architecture.md, "Layers").

StoreService is the Store itself (every public method is forwarded by inheritance) plus heartbeat coalescing:
trainings report every few seconds, the latest beat per queue item (a submission, or an audit: a Beat names either
by id) is kept in memory and written at most once per `heartbeat_seconds`, so a busy cluster never writes per batch.
The actor is detached and named, so the HTTP layer, the CLI and the scheduler all find the same one, and a restart
of any of them loses nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.actor import ActorHandle

from prism_ray.cluster.metrics import StoreMetrics
from prism_ray.config import Settings
from prism_ray.store import (
    DEFAULT_INFRA_REQUEUES,
    AuditRecord,
    ReplicaRecord,
    Store,
    StoreLocked,
    SubmissionRecord,
)

STORE_NAME = "prism-store"
_OPEN_WAIT_SECONDS = 30.0  # a restarted store may start while its predecessor's process still holds the file lock


@dataclass(frozen=True)
class Beat:
    """A lease renewal for one attempt, with the training's progress when a GPU stage sends it."""

    submission_id: str
    owner: str
    attempt: int
    bytes_scored: int | None = None
    running_bpb: float | None = None
    tokens_per_second: float | None = None


def store_path(settings: Settings) -> Path:
    return settings.cluster.store_path or settings.cache_dir / "prism.duckdb"


class StoreService(Store):
    def __init__(self, path: Path | str, settings: Settings) -> None:
        cluster = settings.cluster
        deadline = time.monotonic() + _OPEN_WAIT_SECONDS
        while True:
            try:
                super().__init__(path, max_attempts=cluster.max_attempts, scoring=settings.scoring,
                                 audit=settings.audit, replicas=settings.replicas)
                break
            except StoreLocked:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.lease_seconds = cluster.lease_seconds
        self.flush_seconds = cluster.heartbeat_seconds
        self.metrics = StoreMetrics()
        self._pending: dict[str, Beat] = {}
        self._task_owned: dict[tuple[str, str, int], float] = {}  # (id, owner, attempt) → when its GPU task started
        self._speeds: dict[str, tuple[float, float]] = {}  # id → (tokens/s, monotonic time of the beat)
        self._flushed_at = time.monotonic()

    def claim(self, owner: str, limit: int) -> list[tuple[SubmissionRecord, bytes | None]]:
        """claim_next plus each submission's original zip, in one round trip."""
        return [(record, self.original_zip(record.id)) for record in self.claim_next(owner, self.lease_seconds, limit)]

    def claim_audit_runs(self, owner: str, limit: int) -> list[tuple[AuditRecord, bytes | None]]:
        """claim_audits plus the zip of each submission to re-run, in one round trip."""
        return [(audit, self.original_zip(audit.submission_id))
                for audit in self.claim_audits(owner, self.lease_seconds, limit)]

    def claim_replica_runs(self, owner: str, limit: int) -> list[tuple[ReplicaRecord, bytes | None]]:
        """claim_replicas plus the zip of each submission to re-run, in one round trip."""
        return [(replica, self.original_zip(replica.submission_id))
                for replica in self.claim_replicas(owner, self.lease_seconds, limit)]

    def stage_started(self, submission_id: str, stage: str, node: str, owner: str, attempt: int) -> bool:
        """A GPU task began: record its stage and node; until it finishes only its own beats renew the lease.
        False when the attempt no longer holds the lease (the task must not run)."""
        if not self.set_stage(submission_id, stage, node=node, owner=owner, attempt=attempt):
            return False
        self.renew_lease(submission_id, owner, self.lease_seconds, attempt=attempt)
        self._task_owned[(submission_id, owner, attempt)] = time.time()
        return True

    def stage_finished(self, beat: Beat) -> None:
        """The GPU task's last beat, written now (final progress); the scheduler renews the lease again."""
        self._task_owned.pop((beat.submission_id, beat.owner, beat.attempt), None)
        self._pending.pop(beat.submission_id, None)
        self._speeds.pop(beat.submission_id, None)
        self._renew(beat)

    def unclaim(self, submission_id: str, owner: str, attempt: int) -> bool:
        """Store.unclaim, forgetting the attempt's beats: its number is claimed again, by a new lease."""
        if (pending := self._pending.get(submission_id)) is not None and pending.owner == owner:
            del self._pending[submission_id]
        self._task_owned.pop((submission_id, owner, attempt), None)
        self._speeds.pop(submission_id, None)
        return super().unclaim(submission_id, owner, attempt)

    def heartbeat(self, beat: Beat) -> None:
        """From a running GPU task: the latest beat per submission wins."""
        self._pending[beat.submission_id] = beat
        if beat.tokens_per_second is not None:
            self._speeds[beat.submission_id] = (beat.tokens_per_second, time.monotonic())
        self._flush_if_due()

    def keep_alive(self, beats: list[Beat]) -> dict[str, float]:
        """From the scheduler, for its attempts in CPU stages or waiting for a GPU; a GPU task's own lease is left to
        its heartbeats. Returns when each running GPU task started, so stage limits count from there."""
        started = {}
        for beat in beats:
            key = (beat.submission_id, beat.owner, beat.attempt)
            if key in self._task_owned:
                started[beat.submission_id] = self._task_owned[key]
            else:
                self._pending.setdefault(beat.submission_id, beat)
        self._flush_if_due()
        return started

    def requeue_expired(self, now: float | None = None, cap: int = DEFAULT_INFRA_REQUEUES) -> list[str]:
        self._flush_if_due()
        return super().requeue_expired(now, cap)

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._flushed_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the coalesced beats (one renewal per submission) and refresh the store's gauges."""
        pending, self._pending = self._pending, {}
        for beat in pending.values():
            self._renew(beat)
        now = time.monotonic()
        self._speeds = {sid: (speed, at) for sid, (speed, at) in self._speeds.items()
                        if now - at < 3 * self.flush_seconds}
        self.metrics.record_trainings([speed for speed, _ in self._speeds.values()])
        self.metrics.record_stats(self.stats()["by_status"], self.audit_stats()["by_status"],
                                  self.replica_stats()["by_status"])
        self._flushed_at = now

    def _renew(self, beat: Beat) -> None:
        held = self.renew_lease(beat.submission_id, beat.owner, self.lease_seconds, progress_bytes=beat.bytes_scored,
                                progress_bpb=beat.running_bpb, tokens_per_second=beat.tokens_per_second,
                                attempt=beat.attempt)
        if not held:
            self._task_owned.pop((beat.submission_id, beat.owner, beat.attempt), None)
            self._speeds.pop(beat.submission_id, None)


def store_actor(settings: Settings, on_head: bool) -> ActorHandle:
    """The detached, named store actor (created once; later callers get the running one)."""
    options: dict = {"name": STORE_NAME, "namespace": settings.cluster.namespace, "lifetime": "detached",
                     "get_if_exists": True, "num_cpus": 0, "max_restarts": -1}
    if on_head:  # the DuckDB file lives on the head node's disk
        options["resources"] = {"head": 0.001}
    return ray.remote(StoreService).options(**options).remote(store_path(settings), settings)
