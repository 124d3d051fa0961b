"""What the HTTP layer needs from the rest of the system, as a small protocol, and its plain implementation.

`StoreBackend` runs over one `Store` in this process (tests, the local demo); the Ray cluster binds the same
protocol to its store actor and client API. Every method is blocking: the app calls them from worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from prism_ray.bundle import load_bundle
from prism_ray.config import Settings
from prism_ray.errors import BundleError, Reason
from prism_ray.leaderboard import LeaderboardEntry, ScoreRow, leaderboard, weights
from prism_ray.store import AuditRecord, Store, SubmissionRecord


class Backend(Protocol):
    settings: Settings

    def submit(self, hotkey: str, filename: str, zipped: bytes,
               metadata: dict[str, Any] | None) -> SubmissionRecord:
        """Intake + contract on the zip, then store it: pending, duplicate, this hotkey's earlier one (`reused`),
        or — a rule broken — a stored `rejected` submission."""

    def reject(self, hotkey: str, filename: str | None, reasons: Sequence[Reason],
               metadata: dict[str, Any] | None) -> SubmissionRecord:
        """Store an intake rejection the app found itself (e.g. the base64 does not decode)."""

    def get_submission(self, submission_id: str) -> SubmissionRecord | None: ...

    def events(self, submission_id: str) -> list[dict[str, Any]]: ...

    def runs(self, submission_id: str) -> list[dict[str, Any]]: ...

    def curve(self, submission_id: str) -> list[dict[str, Any]]: ...

    def leaderboard(self, epoch: int | None) -> list[LeaderboardEntry]: ...

    def weights(self, epoch: int | None) -> dict[str, float]: ...

    def check_nonce(self, hotkey: str, nonce: str, ttl: float) -> bool:
        """Insert-once: False when this hotkey already used this nonce within `ttl` seconds."""

    def stats(self) -> dict[str, Any]: ...

    def queue(self, limit: int) -> list[SubmissionRecord]:
        """Pending and running submissions, in arrival order."""
        ...

    def audits(self, limit: int) -> list[AuditRecord]:
        """Pending and running re-execution audits, in the order they are claimed."""
        ...


class StoreBackend:
    """The protocol over a Store owned by this process; a lock serialises calls (a Store is not thread-safe)."""

    def __init__(self, store: Store, settings: Settings | None = None) -> None:
        self.store = store
        self.settings = settings or Settings()
        self._lock = threading.Lock()

    @contextmanager
    def use(self) -> Iterator[Store]:
        """The store under the lock, for the owner's other work (a local scheduler loop)."""
        with self._lock:
            yield self.store

    def submit(self, hotkey: str, filename: str, zipped: bytes,
               metadata: dict[str, Any] | None) -> SubmissionRecord:
        try:
            bundle = load_bundle(zipped, self.settings.intake)  # outside the lock: inflating is the slow part
        except BundleError as error:
            return self.reject(hotkey, filename, error.reasons, metadata)
        with self.use() as store:
            return store.create_submission(hotkey, filename, bundle, metadata, zipped=zipped)

    def reject(self, hotkey: str, filename: str | None, reasons: Sequence[Reason],
               metadata: dict[str, Any] | None) -> SubmissionRecord:
        with self.use() as store:
            return store.reject_submission(hotkey, filename, reasons, "intake", metadata)

    def get_submission(self, submission_id: str) -> SubmissionRecord | None:
        with self.use() as store:
            return store.get_submission(submission_id)

    def events(self, submission_id: str) -> list[dict[str, Any]]:
        with self.use() as store:
            return store.events(submission_id)

    def runs(self, submission_id: str) -> list[dict[str, Any]]:
        with self.use() as store:
            return store.runs(submission_id)

    def curve(self, submission_id: str) -> list[dict[str, Any]]:
        with self.use() as store:
            return store.curve(submission_id)

    def leaderboard(self, epoch: int | None) -> list[LeaderboardEntry]:
        return leaderboard(self._score_rows(), epoch, self.settings.scoring)

    def weights(self, epoch: int | None) -> dict[str, float]:
        return weights(self._score_rows(), self.settings.scoring, epoch)

    def check_nonce(self, hotkey: str, nonce: str, ttl: float) -> bool:
        with self.use() as store:
            return store.check_nonce(hotkey, nonce, ttl)

    def queue(self, limit: int) -> list[SubmissionRecord]:
        with self.use() as store:
            records = store.list_submissions("running", limit=limit) + store.list_submissions("pending", limit=limit)
        return sorted(records, key=lambda record: record.seq)[:limit]

    def audits(self, limit: int) -> list[AuditRecord]:
        with self.use() as store:
            records = store.list_audits("running", limit=limit) + store.list_audits("pending", limit=limit)
        return sorted(records, key=lambda record: record.seq)[:limit]

    def stats(self) -> dict[str, Any]:
        with self.use() as store:
            return store.stats()

    def _score_rows(self) -> list[ScoreRow]:
        with self.use() as store:
            rows = store.scored_rows()
        return [ScoreRow(**row) for row in rows]
