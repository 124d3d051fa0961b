"""What the HTTP layer and the cluster's client API do with the store — intake, nonces, the bound on stored
rejections, and every read (through the read model) — written once, over any owner of the store.

`StoreBackend` runs over a Store in this process (tests, benches); `prism_ray.cluster.client.ClusterBackend` over
the store actor. Every method blocks: the HTTP app calls them from worker threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism_ray.backend.group_commit import GroupCommit
from prism_ray.backend.read_model import QueueView, ReadModel
from prism_ray.config import RejectionCap, Settings
from prism_ray.errors import BundleError, Reason
from prism_ray.evaluation.scoring import CurvePoint
from prism_ray.intake.bundle import Bundle, decode_base64, load_bundle
from prism_ray.intake.fingerprint import code_fingerprints
from prism_ray.ranking.leaderboard import LeaderboardEntry, ScoreRow, SeedNoise
from prism_ray.ranking.significance import Verdict
from prism_ray.store import (
    AuditRecord,
    NewSubmission,
    QueueSnapshot,
    ReplicaRecord,
    Store,
    StoreError,
    StoreUnavailable,
    SubmissionDetail,
    SubmissionRecord,
)
from prism_ray.store.port import StorePort


@dataclass(frozen=True)
class StoreHealth:
    """The latest probe of the store: a read, a committed write and the free disk against the floor."""

    ok: bool
    error: str | None = None  # `store_unavailable` or `infra:disk_full` when not ok
    message: str = ""


@dataclass(frozen=True)
class NotStored:
    """A rejection that was answered but not stored (its cap was reached)."""

    reasons: list[Reason]
    why: str


class Backend:
    def __init__(self, store: StorePort, settings: Settings, on_queued: Callable[[], Any] | None = None,
                 node_address: Callable[[str], str | None] | None = None, max_staleness_s: float = 0.1) -> None:
        self.store = store
        self.settings = settings
        self.reads = ReadModel(store, settings, max_staleness_s)
        self._on_queued = on_queued
        self._node_address = node_address
        # Concurrent intakes and nonce checks share store round trips (a burst of posts is a few transactions).
        self._creates = GroupCommit(store.create_submissions)
        self._nonces = GroupCommit(store.check_nonces)
        self._health: tuple[float, StoreHealth] | None = None  # (monotonic time, result) of the latest probe
        self._probing = threading.Lock()

    # --- health -------------------------------------------------------------------------------------------------

    def health(self) -> StoreHealth:
        """The store probed for real, at most once per `health_probe_seconds` (concurrent callers share a probe)."""
        interval = self.settings.cluster.health_probe_seconds
        with self._probing:
            if self._health is None or time.monotonic() - self._health[0] >= interval:
                self._health = (time.monotonic(), self._probe())
            return self._health[1]

    def _probe(self) -> StoreHealth:
        try:
            free = self.store.probe()
        except Exception as error:  # a damaged file, a dead actor, a full disk under a commit: all unusable
            return StoreHealth(False, "store_unavailable", f"the store does not answer: {describe(error)}")
        floor = self.settings.cluster.min_free_bytes
        if free < floor:
            return StoreHealth(False, "infra:disk_full", f"the store's disk has {free:,} bytes free, below the "
                               f"floor of {floor:,} (PRISM_CLUSTER_MIN_FREE_BYTES); intake waits until space is "
                               "freed")
        return StoreHealth(True)

    def require_disk(self) -> None:
        """Intake's check: refuse (503, nothing stored, nothing charged) while the disk is below its floor."""
        health = self.health()
        if health.error == "infra:disk_full":
            raise StoreUnavailable(health.error, health.message)

    # --- writes -------------------------------------------------------------------------------------------------

    def submit(self, hotkey: str, filename: str, source: bytes | str | Path | Bundle,
               metadata: dict[str, Any] | None = None,
               cap: RejectionCap | None = None) -> SubmissionRecord | NotStored:
        """A new `pending` submission, a `duplicate` of another hotkey's earlier code, this hotkey's own earlier
        submission of the same code (`reused`), or — an intake or contract rule broken — a `rejected` one. A zip is
        kept in the store exactly as sent; the code's fingerprints are computed here, not in the store's owner."""
        self.require_disk()
        try:
            zipped = _zip_of(source)
            bundle = source if isinstance(source, Bundle) else load_bundle(zipped or source, self.settings.intake)
        except BundleError as error:
            return self.reject(hotkey, filename, error.reasons, metadata, cap)
        record = self._creates.commit(NewSubmission(hotkey, filename, bundle, metadata, zipped,
                                                    code_fingerprints(bundle)))
        self.reads.invalidate()
        if record.status == "pending" and self._on_queued is not None:
            self._on_queued()
        return record

    def reject(self, hotkey: str, filename: str | None, reasons: Sequence[Reason],
               metadata: dict[str, Any] | None = None, cap: RejectionCap | None = None) -> SubmissionRecord | NotStored:
        """Store an intake rejection (no valid bundle exists) so the miner can look it up — unless `cap` is full."""
        self.require_disk()
        if cap is not None:
            total, own = self.store.rejection_counts(hotkey, time.time() - cap.window_s)
            if own >= cap.per_hotkey or total >= cap.total:
                whose = f"this hotkey has {own}" if own >= cap.per_hotkey else f"the server has {total}"
                return NotStored(list(reasons), f"not stored: {whose} stored rejections from the last "
                                 f"{cap.window_s / 3600:g} h")
        record = self.store.reject_submission(hotkey, filename, list(reasons), "intake", metadata)
        self.reads.invalidate()
        return record

    def check_nonce(self, hotkey: str, nonce: str, ttl: float) -> bool:
        """Insert-once: False when this hotkey already used this nonce within `ttl` seconds."""
        return self._nonces.commit((hotkey, nonce, ttl))

    # --- reads (the read model) ---------------------------------------------------------------------------------

    def get_submission(self, submission_id: str) -> SubmissionRecord | None:
        detail = self.reads.detail(submission_id)
        return detail and detail.record

    def detail(self, submission_id: str) -> SubmissionDetail | None:
        return self.reads.detail(submission_id)

    def curve(self, submission_id: str) -> list[CurvePoint]:
        """The scored attempt's learning curve, at most `settings.curve_points` points."""
        return self.reads.curve(submission_id)

    def leaderboard(self, epoch: int | None = None) -> list[LeaderboardEntry]:
        return self.reads.leaderboard(epoch)

    def weights(self, epoch: int | None = None) -> dict[str, float]:
        return self.reads.weights(epoch)

    def seed_noise(self, epoch: int | None = None) -> SeedNoise:
        """σ_seed of the board: measured from its replicas, and the one its verdicts use."""
        return self.reads.seed_noise(epoch)

    def verdict(self, submission_id: str, epoch: int | None = None) -> tuple[LeaderboardEntry, Verdict | None] | None:
        """The board's leader and this submission's paired verdict against it (docs/scoring.md)."""
        return self.reads.verdict(submission_id, epoch)

    def replicas(self, limit: int) -> list[ReplicaRecord]:
        """Pending and running seed replicas, in the order they are claimed (seeds hidden while their epoch is
        open)."""
        records = [*self.store.list_replicas("running", None, limit), *self.store.list_replicas("pending", None, limit)]
        return sorted(records, key=lambda record: record.seq)[:limit]

    def queue(self) -> QueueView:
        return self.reads.queue()

    def stats(self) -> dict[str, Any]:
        return self.reads.stats()

    def audits(self, limit: int) -> list[AuditRecord]:
        """Pending and running re-execution audits, in the order they are claimed."""
        records = [*self.store.list_audits("running", None, limit), *self.store.list_audits("pending", None, limit)]
        return sorted(records, key=lambda record: record.seq)[:limit]

    def placement_notice(self) -> str | None:
        """Why scored runs cannot start, when no node can take one (the cluster's backend knows its nodes)."""
        return None

    def node_address(self, node: str | None) -> str | None:
        """Where a run ran, as a person reads it (the cluster resolves Ray's node ids to addresses)."""
        if node is None or self._node_address is None:
            return node
        return self._node_address(node) or node


def describe(error: BaseException) -> str:
    """One line for a store failure: the first line of what DuckDB (or Ray) said."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def store_failure_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the store failed (not a bug of the caller): DuckDB's errors, the store's own, a failed
    file write, the store actor gone or late. A Ray task error is an instance of its cause's class too."""
    import duckdb
    from ray import exceptions as ray_errors

    return (duckdb.Error, StoreError, OSError, ray_errors.RayActorError, ray_errors.GetTimeoutError,
            ray_errors.RaySystemError)


def _zip_of(source: bytes | str | Path | Bundle) -> bytes | None:
    """The zip as the miner sent it, when the source is one (a directory or a Bundle has none)."""
    if isinstance(source, str):
        return decode_base64(source)
    if isinstance(source, Path):
        return source.read_bytes() if source.is_file() else None
    return source if isinstance(source, bytes) else None


class LocalStore:
    """StorePort over a Store owned by this process; a lock serialises calls (a Store is not thread-safe)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()

    @contextmanager
    def use(self) -> Iterator[Store]:
        with self._lock:
            yield self.store

    def create_submissions(self, items: Sequence[NewSubmission]) -> list[SubmissionRecord]:
        with self.use() as store:
            return store.create_submissions(items)

    def reject_submission(self, hotkey: str, filename: str | None, reasons: Sequence[Reason], stage: str = "intake",
                          metadata: dict[str, Any] | None = None) -> SubmissionRecord:
        with self.use() as store:
            return store.reject_submission(hotkey, filename, reasons, stage, metadata)

    def check_nonces(self, checks: Sequence[tuple[str, str, float]]) -> list[bool]:
        with self.use() as store:
            return store.check_nonces(checks)

    def probe(self) -> int:
        with self.use() as store:
            return store.probe()

    def changes_since(self, since: float | None) -> tuple[float | None, list[tuple[str, str]]]:
        with self.use() as store:
            return store.changes_since(since)

    def detail(self, submission_id: str) -> SubmissionDetail | None:
        with self.use() as store:
            return store.detail(submission_id)

    def curve(self, submission_id: str) -> list[CurvePoint]:
        with self.use() as store:
            return store.curve(submission_id)

    def scored_rows(self) -> list[ScoreRow]:
        with self.use() as store:
            return store.scored_rows()

    def queue_snapshot(self, limit: int, recent: int) -> QueueSnapshot:
        with self.use() as store:
            return store.queue_snapshot(limit, recent)

    def stats(self) -> dict[str, Any]:
        with self.use() as store:
            return store.stats()

    def rejection_counts(self, hotkey: str, since: float) -> tuple[int, int]:
        with self.use() as store:
            return store.rejection_counts(hotkey, since)

    def list_audits(self, status: str | None = None, submission_id: str | None = None,
                    limit: int = 100) -> list[AuditRecord]:
        with self.use() as store:
            return store.list_audits(status, submission_id, limit)

    def list_replicas(self, status: str | None = None, submission_id: str | None = None,
                      limit: int = 100) -> list[ReplicaRecord]:
        with self.use() as store:
            return store.list_replicas(status, submission_id, limit)


class StoreBackend(Backend):
    """A Backend over a Store owned by this process; `use()` lends the store to the owner's other work (a local
    scheduler loop), under the same lock."""

    def __init__(self, store: Store, settings: Settings | None = None, **options: Any) -> None:
        self.local = LocalStore(store)
        super().__init__(self.local, settings or Settings(), **options)

    @contextmanager
    def use(self) -> Iterator[Store]:
        with self.local.use() as store:
            yield store
