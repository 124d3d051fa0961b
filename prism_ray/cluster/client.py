"""The client API the CLI and the HTTP layer call: submit, status, wait, leaderboard, weights, export, and
ClusterBackend, serve_app's Backend protocol over the same calls.

Intake (unpacking and the two-script contract) runs here, in the caller's process, so a broken bundle is answered
at once and stored as `rejected` without any task; accepted bundles go to the store's queue and the scheduler is
woken. Nothing here runs miner code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from prism_ray import pipeline
from prism_ray.bundle import Bundle, decode_base64
from prism_ray.cluster.runtime import ClusterHandle
from prism_ray.errors import BundleError, Reason
from prism_ray.fingerprint import code_fingerprints
from prism_ray.leaderboard import LeaderboardEntry, ScoreRow
from prism_ray.leaderboard import leaderboard as rank
from prism_ray.leaderboard import weights as weigh
from prism_ray.store import TERMINAL_STATUSES, AuditRecord, SubmissionRecord

SETTLED_STATUSES = (*TERMINAL_STATUSES, "held")  # held waits for an operator, not for the cluster


def submit(handle: ClusterHandle, hotkey: str, filename: str, source: bytes | str | Path | Bundle,
           metadata: dict[str, Any] | None = None) -> SubmissionRecord:
    """A new `pending` submission, a `rejected` one (intake or contract rule broken), a `duplicate` of another
    hotkey's earlier code, or this hotkey's own earlier submission of the same code (`reused`). A zip is kept in
    the store exactly as sent."""
    try:
        zipped = _zip_of(source)
        bundle = source if isinstance(source, Bundle) else pipeline.intake(zipped or source, handle.settings.intake)
    except BundleError as error:
        return ray.get(handle.store.reject_submission.remote(hotkey, filename, error.reasons, "intake", metadata))
    fingerprints = code_fingerprints(bundle)  # here, not in the store actor every submission goes through
    record: SubmissionRecord = ray.get(handle.store.create_submission.remote(
        hotkey, filename, bundle, metadata, zipped=zipped, fingerprints=fingerprints))
    if record.status == "pending":
        handle.scheduler.wake.remote()
    return record


def _zip_of(source: bytes | str | Path | Bundle) -> bytes | None:
    """The zip as the miner sent it, when the source is one (a directory or a Bundle has none)."""
    if isinstance(source, str):
        return decode_base64(source)
    if isinstance(source, Path):
        return source.read_bytes() if source.is_file() else None
    return source if isinstance(source, bytes) else None


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
    return rank(_score_rows(handle), epoch, handle.settings.scoring)


def weights(handle: ClusterHandle, epoch: int | None = None) -> dict[str, float]:
    return weigh(_score_rows(handle), handle.settings.scoring, epoch)


def export(handle: ClusterHandle, out_dir: Path | str) -> list[Path]:
    """Every table as Parquet, from one snapshot, written by the store actor (so on the head node's disk)."""
    return ray.get(handle.store.export_parquet.remote(str(out_dir)))


def _score_rows(handle: ClusterHandle) -> list[ScoreRow]:
    return [ScoreRow(**row) for row in ray.get(handle.store.scored_rows.remote())]


class ClusterBackend:
    """serve_app.backend.Backend over a running cluster, for Serve replicas:
    `build_ingress(lambda: ClusterBackend(connect(settings)), api_settings)`."""

    def __init__(self, handle: ClusterHandle) -> None:
        self.handle = handle
        self.settings = handle.settings

    def submit(self, hotkey: str, filename: str, zipped: bytes,
               metadata: dict[str, Any] | None) -> SubmissionRecord:
        return submit(self.handle, hotkey, filename, zipped, metadata)

    def reject(self, hotkey: str, filename: str | None, reasons: Sequence[Reason],
               metadata: dict[str, Any] | None) -> SubmissionRecord:
        return self._store("reject_submission", hotkey, filename, list(reasons), "intake", metadata)

    def get_submission(self, submission_id: str) -> SubmissionRecord | None:
        return status(self.handle, submission_id)

    def events(self, submission_id: str) -> list[dict[str, Any]]:
        return self._store("events", submission_id)

    def runs(self, submission_id: str) -> list[dict[str, Any]]:
        return self._store("runs", submission_id)

    def curve(self, submission_id: str) -> list[dict[str, Any]]:
        return self._store("curve", submission_id)

    def leaderboard(self, epoch: int | None) -> list[LeaderboardEntry]:
        return leaderboard(self.handle, epoch)

    def queue(self, limit: int) -> list[SubmissionRecord]:
        records = self._store("list_submissions", "running", None, limit) + \
            self._store("list_submissions", "pending", None, limit)
        return sorted(records, key=lambda record: record.seq)[:limit]

    def audits(self, limit: int) -> list[AuditRecord]:
        records = [*self._store("list_audits", "running", None, limit),
                   *self._store("list_audits", "pending", None, limit)]
        return sorted(records, key=lambda record: record.seq)[:limit]

    def weights(self, epoch: int | None) -> dict[str, float]:
        return weights(self.handle, epoch)

    def check_nonce(self, hotkey: str, nonce: str, ttl: float) -> bool:
        return self._store("check_nonce", hotkey, nonce, ttl)

    def stats(self) -> dict[str, Any]:
        return self._store("stats")

    def _store(self, method: str, *args: Any) -> Any:
        return ray.get(getattr(self.handle.store, method).remote(*args))
