"""The DuckDB store (docs/architecture.md, "Layers"; docs/store.md describes every table): submissions and their
durable queue, the miners' original zips, runs, scores, curves, re-execution audits and their queue, the gate's
reviews and verdict cache, auth nonces and an append-only event timeline per queue item.

Exactly one process owns the database file (the store actor on a cluster, the CLI otherwise): DuckDB locks the file
for its writer, so a second process gets `StoreLocked`. A Store is not thread-safe: its owner serialises calls (a Ray
actor does). Every public method is one transaction. `Store` is the one facade over the parts, each with one job:
`schema` (tables, upgrades), `queue` (the lease-guarded state machine both queues share), `submissions` (intake,
copies, scoring), `behaviours` (copies by their per-batch losses), `audits` (the audit queue and its verdicts),
`reads` and `sidecar` (nonces, the gate's cache).
Timestamps are Unix epoch seconds (DOUBLE) everywhere.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from prism_ray.config import AuditSettings, ClusterSettings, ReplicaSettings, ScoringSettings
from prism_ray.errors import Reason
from prism_ray.evaluation.report import RunReport
from prism_ray.gate.hard_gate import CachedVerdict, GateAudit
from prism_ray.intake.bundle import Bundle
from prism_ray.intake.fingerprint import CodeFingerprints
from prism_ray.ranking.leaderboard import epoch_of
from prism_ray.store import health
from prism_ray.store.audits import Audits
from prism_ray.store.behaviours import Behaviours
from prism_ray.store.db import Db, StoreError, StoreLocked, StoreUnavailable
from prism_ray.store.queue import Queue
from prism_ray.store.read_api import StoreReads
from prism_ray.store.reads import Reads, submission_records
from prism_ray.store.records import (
    AUDIT_PREFIX,
    REPLICA_PREFIX,
    AuditRecord,
    QueueSnapshot,
    ReplicaRecord,
    RerunRecord,
    RunRecord,
    SubmissionDetail,
    SubmissionRecord,
    SubmissionStatus,
    TimelineEvent,
)
from prism_ray.store.replicas import Replicas
from prism_ray.store.schema import (
    AUDIT_STATUSES,
    AUDIT_TERMINAL,
    REPLICA_STATUSES,
    REPLICA_TERMINAL,
    SCHEMA_VERSION,
    SUBMISSION_STATUSES,
    SUBMISSION_TERMINAL,
    TABLES,
    create_or_upgrade,
)
from prism_ray.store.sidecar import Sidecar
from prism_ray.store.submissions import NewSubmission, Submissions

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INFRA_REQUEUES: int = ClusterSettings.model_fields["max_infra_requeues"].default
STATUSES = SUBMISSION_STATUSES
TERMINAL_STATUSES = SUBMISSION_TERMINAL

__all__ = ["AUDIT_PREFIX", "AUDIT_STATUSES", "DEFAULT_MAX_ATTEMPTS", "REPLICA_PREFIX", "REPLICA_STATUSES",
           "SCHEMA_VERSION", "STATUSES", "TABLES", "TERMINAL_STATUSES", "AuditRecord", "NewSubmission",
           "QueueSnapshot", "ReplicaRecord", "RerunRecord", "RunRecord", "Store", "StoreError", "StoreLocked",
           "StoreUnavailable", "SubmissionDetail", "SubmissionRecord", "SubmissionStatus", "TimelineEvent"]


class Store(StoreReads):
    def __init__(self, path: Path | str, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 clock: Callable[[], float] = time.time, scoring: ScoringSettings | None = None,
                 audit: AuditSettings | None = None, rng: random.Random | None = None,
                 replicas: ReplicaSettings | None = None) -> None:
        self.path = str(path)
        self.max_attempts = max_attempts
        self.scoring = scoring or ScoringSettings()
        self.audit = audit or AuditSettings()
        self.replica_settings = replicas or ReplicaSettings()
        self._db = Db(path, clock)
        try:
            create_or_upgrade(self._db)
        except BaseException:
            self._db.close()
            raise
        self._submission_queue = Queue(self._db, "submissions", SUBMISSION_TERMINAL)
        self._audit_queue = Queue(self._db, "audits", AUDIT_TERMINAL)
        self._replica_queue = Queue(self._db, "replicas", REPLICA_TERMINAL)
        self._reads = Reads(self._db, audits_kept=self.audit.mode == "on",
                            replicas_kept=self.replica_settings.mode == "on")
        self._submissions = Submissions(self._db, self._submission_queue, max_attempts, self.scoring)
        self._behaviours = Behaviours(self._db, self.audit)
        self._audits = Audits(self._db, self._audit_queue, self.audit, self.scoring, self._reads.scored_rows,
                              self._submissions.invalidate, rng or random.SystemRandom())
        self._replicas = Replicas(self._db, self._replica_queue, self.replica_settings, self.scoring,
                                  self._reads.scored_rows, self._submissions.invalidate)
        self._sidecar = Sidecar(self._db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- intake -------------------------------------------------------------------------------------------------

    def create_submission(self, hotkey: str, filename: str, bundle: Bundle, metadata: dict[str, Any] | None = None,
                          zipped: bytes | None = None,
                          fingerprints: CodeFingerprints | None = None) -> SubmissionRecord:
        """A new pending submission, a `duplicate` of another hotkey's earlier code, or this hotkey's earlier one.

        `zipped` is the miner's original zip (kept as sent; a bundle given as files is kept as their deterministic
        zip); `fingerprints` may be computed by the caller, off the store's owner process. A pending submission is
        marked `copy_of` when another hotkey submitted the same code first, up to names, layout and comments
        (copy:duplicate: it is still evaluated and shown, but earns no weight), else `near_copy_of` when another
        hotkey's earlier code differs from it only in numeric literals (copy:near, informational)."""
        return self.create_submissions([NewSubmission(hotkey, filename, bundle, metadata, zipped, fingerprints)])[0]

    def create_submissions(self, items: Sequence[NewSubmission]) -> list[SubmissionRecord]:
        """create_submission for each item, in one transaction: the same records as one call per item in this order
        (a later item is a duplicate, copy or reuse of an earlier one of the same call as it would be of a stored
        one), at the cost of a few statements in all (the HTTP layer batches concurrent requests into one call)."""
        return self._submissions.create(items)

    def reject_submission(self, hotkey: str, filename: str | None, reasons: Sequence[Reason],
                          stage: str = "intake", metadata: dict[str, Any] | None = None) -> SubmissionRecord:
        """Store an intake or contract rejection (no valid bundle exists), so the miner can look it up."""
        return self._submissions.reject(hotkey, filename, reasons, stage, metadata)

    def original_zip(self, submission_id: str) -> bytes | None:
        """The exact bytes the miner sent with this submission (None for intake rejections)."""
        return self._reads.original_zip(submission_id)

    def bundle_zip(self, sha256: str) -> bytes | None:
        """The zip of a bundle (by `bundle_sha256`): the original upload of the first submission of its files."""
        return self._reads.bundle_zip(sha256)

    # --- health (docs/operator.md, "Liveness and failures") -----------------------------------------------------

    def probe(self) -> int:
        """A read and a committed write, then the free bytes on the file's filesystem; raises when the store fails."""
        health.probe(self._db)
        return health.free_bytes(self.path)

    def check_integrity(self) -> None:
        """Read back every block of every table (checksums verified); raises on a damaged file."""
        health.check_integrity(self._db, TABLES)

    def export_parquet(self, out_dir: Path | str) -> list[Path]:
        """Every table to `<out_dir>/<table>.parquet`, from one consistent snapshot."""
        return self._reads.export_parquet(out_dir, epoch_of(self._db.clock(), self.scoring))

    # --- the queues (a queue item's id names its queue: `sub_…` or `aud_…`) --------------------------------------

    def claim_next(self, owner: str, lease_seconds: float, limit: int = 1) -> list[SubmissionRecord]:
        """Oldest pending submissions first → running with attempt+1 and a lease held by `owner`."""
        claimed = self._submission_queue.claim(owner, lease_seconds, limit)
        records = submission_records(self._db, claimed)
        return [records[item] for item in claimed]

    def claim_audits(self, owner: str, lease_seconds: float, limit: int = 1) -> list[AuditRecord]:
        """Oldest pending audits first, leased like submissions (none while audits are off)."""
        if self.audit.mode == "off":
            return []
        return [self._audits.record(item) for item in self._audit_queue.claim(owner, lease_seconds, limit)]

    def claim_replicas(self, owner: str, lease_seconds: float, limit: int = 1) -> list[ReplicaRecord]:
        """Oldest pending replicas first, with their seeds (for the scheduler only; none while replicas are off)."""
        if self.replica_settings.mode == "off":
            return []
        return self._replicas.records(ids=self._replica_queue.claim(owner, lease_seconds, limit), limit=limit,
                                      reveal=True)

    def renew_lease(self, item_id: str, owner: str, lease_seconds: float, progress_bytes: int | None = None,
                    progress_bpb: float | None = None, tokens_per_second: float | None = None,
                    attempt: int | None = None) -> bool:
        """Extend the lease and record progress; False when the lease was lost (requeued or finished)."""
        return self._queue(item_id).renew(item_id, owner, lease_seconds, progress_bytes, progress_bpb,
                                          tokens_per_second, attempt)

    def set_stage(self, item_id: str, stage: str, node: str | None = None, owner: str | None = None,
                  attempt: int | None = None) -> bool:
        """Record the stage a running item entered (and the node it runs on, once known)."""
        return self._queue(item_id).set_stage(item_id, stage, node, owner, attempt)

    def note(self, item_id: str, stage: str, detail: dict[str, Any], owner: str, attempt: int) -> bool:
        """What a stage decided, on the timeline (a `decided` event), while `owner` holds the attempt's lease."""
        return self._queue(item_id).note(item_id, stage, detail, owner, attempt)

    def unclaim(self, item_id: str, owner: str, attempt: int) -> bool:
        """A draining scheduler hands a running attempt back uncounted (see Queue.unclaim)."""
        return self._queue(item_id).unclaim(item_id, owner, attempt)

    def requeue(self, item_id: str, reason: Reason, owner: str | None = None, attempt: int | None = None) -> bool:
        """A system failure (not the miner's): back to pending, or `failed` once the attempts are spent."""
        return bool(self._replanned(self._queue(item_id).requeue([item_id], [reason], owner, attempt)))

    def requeue_uncharged(self, item_id: str, reason: Reason, owner: str, attempt: int, cap: int) -> str | None:
        """An operator-side fault: requeued without costing an attempt, `cap` times, then held for the operator
        (a submission) or requeued as usual (an audit or a seed replica). The new status, or None when the lease was
        lost."""
        audit = item_id.startswith((AUDIT_PREFIX, REPLICA_PREFIX))
        status = self._queue(item_id).requeue_uncharged(item_id, reason, owner, attempt, cap,
                                                         None if audit else "held")
        if audit and status is not None:
            self._replanned([item_id])
        return status

    def requeue_expired(self, now: float | None = None, cap: int = DEFAULT_INFRA_REQUEUES) -> list[str]:
        """Running items whose lease expired. A submission is requeued uncharged `cap` times, then held for the
        operator (docs/operator.md, "Liveness and failures"); an audit or a seed replica is requeued, or failed
        `infra:attempts_exhausted`."""
        now = self._db.clock() if now is None else now
        with self._db.transaction():
            return [*self._submission_queue.requeue_expired(now, uncharged_cap=cap, held="held"),
                    *self._replanned(self._audit_queue.requeue_expired(now)),
                    *self._replanned(self._replica_queue.requeue_expired(now))]

    def recover(self, live_ids: Sequence[str]) -> list[str]:
        """On scheduler start: running items it does not know are orphans of a dead scheduler → requeued."""
        with self._db.transaction():
            return [*self._submission_queue.recover(live_ids), *self._replanned(self._audit_queue.recover(live_ids)),
                    *self._replanned(self._replica_queue.recover(live_ids))]

    # --- how a submission ends ----------------------------------------------------------------------------------

    def complete(self, submission_id: str, owner: str, report: RunReport, attempt: int | None = None) -> bool:
        """Score a running submission from its report (the report, its scores row and its curve), link it to the runs
        of other hotkeys it behaves the same as (copy:duplicate: the earliest keeps the weight) and queue the audits
        the policy asks for now; False (nothing written) unless `owner` still holds its lease."""
        with self._db.transaction():
            written = self._submissions.complete(submission_id, owner, report, attempt)
            if written:
                self._behaviours.link(submission_id, report)
                self._replicas.keep(submission_id, report)
                self._audits.plan(completed=submission_id)
                self._replicas.plan()
            return written

    def fail(self, submission_id: str, reasons: Sequence[Reason], stage: str, terminal: bool = True,
             status: Literal["failed", "rejected"] = "failed", report: RunReport | None = None,
             owner: str | None = None, attempt: int | None = None) -> bool:
        """End a submission `failed` (or `rejected`, e.g. by the gate) with the report of how far it got;
        terminal=False requeues it instead."""
        return self._submissions.fail(submission_id, reasons, stage, terminal, status, report, owner, attempt)

    def hold(self, submission_id: str, reasons: Sequence[Reason], stage: str | None = None,
             report: RunReport | None = None, owner: str | None = None, attempt: int | None = None) -> bool:
        """Park a submission for an operator (the gate failed closed); `release` puts it back in the queue."""
        return self._submissions.hold(submission_id, reasons, stage, report, owner, attempt)

    def release(self, submission_id: str) -> bool:
        """A held submission goes back to the queue (after an operator looked at it)."""
        return self._submissions.release(submission_id)

    # --- how an audit ends --------------------------------------------------------------------------------------

    def finish_audit(self, audit_id: str, owner: str, report: RunReport,
                     attempt: int | None = None) -> AuditRecord | None:
        """Judge the re-run's report against the first run: passed, or a mismatch that invalidates the score (the
        submission ends `failed` with `audit:mismatch`). None (nothing written) unless `owner` holds the lease."""
        with self._db.transaction():
            record = self._audits.finish(audit_id, owner, report, attempt)
            if record is not None:
                self._replicas.plan()
            return record

    def fail_audit(self, audit_id: str, reasons: Sequence[Reason], stage: str, owner: str | None = None,
                   attempt: int | None = None, report: RunReport | None = None) -> bool:
        """The re-run could not be carried out: the audit fails, and its score earns nothing."""
        with self._db.transaction():
            failed = self._audits.fail(audit_id, reasons, stage, owner, attempt, report)
            if failed:
                self._replicas.plan()
            return failed

    # --- how a replica ends -------------------------------------------------------------------------------------

    def finish_replica(self, replica_id: str, owner: str, report: RunReport,
                       attempt: int | None = None) -> ReplicaRecord | None:
        """Keep the replica's run (completed: its bpb and chunk curve join the entry's seeds; else it fails) and ask
        both policies again. None (nothing written) unless `owner` holds the lease."""
        with self._db.transaction():
            record = self._replicas.finish(replica_id, owner, report, attempt)
            if record is not None:
                self._audits.plan()  # the board may have changed: a new top k to audit
            return record

    def fail_replica(self, replica_id: str, reasons: Sequence[Reason], stage: str, owner: str | None = None,
                     attempt: int | None = None, report: RunReport | None = None) -> bool:
        """The re-run could not be carried out: the replica fails; the entry keeps the seeds it has."""
        return self._replicas.fail(replica_id, reasons, stage, owner, attempt, report)

    # --- auth nonces and the gate -------------------------------------------------------------------------------

    def check_nonces(self, checks: Sequence[tuple[str, str, float]]) -> list[bool]:
        """Per (hotkey, nonce, ttl), in order, in one transaction: True, and remembered, unless that hotkey used that
        nonce within `ttl` seconds (a nonce used earlier in the same call is a replay too). Nonces older than `ttl`
        are purged, so callers must refuse stale signed timestamps themselves."""
        return self._sidecar.check_nonces(checks)

    def cached_verdict(self, key: str) -> CachedVerdict | None:
        """The gate's verdict cache: the verdict kept under `key` (the sha256 of what was reviewed)."""
        return self._sidecar.verdict(key)

    def keep_verdict(self, key: str, verdict: CachedVerdict) -> None:
        """The gate's verdict cache: keep a verdict under `key`."""
        self._sidecar.keep_verdict(key, verdict)

    def record_gate_audits(self, submission_id: str | None, audits: Sequence[GateAudit]) -> None:
        """One row per call to the gate's model, exactly what was asked and answered."""
        self._sidecar.record_gate_reviews(submission_id, audits)

    # --- internals ----------------------------------------------------------------------------------------------

    def _queue(self, item_id: str) -> Queue:
        if item_id.startswith(AUDIT_PREFIX):
            return self._audit_queue
        return self._replica_queue if item_id.startswith(REPLICA_PREFIX) else self._submission_queue

    def _replanned(self, item_ids: list[str]) -> list[str]:
        """After audits or replicas ended or went back to the queue, ask both policies again: a failed one may leave
        a place, a finished replica may reorder the board."""
        if any(item.startswith((AUDIT_PREFIX, REPLICA_PREFIX)) for item in item_ids):
            self._audits.plan()
            self._replicas.plan()
        return item_ids
