"""The DuckDB store (DESIGN §3): submissions and their durable queue, bundles, runs, scores, curves, gate audits,
the gate's verdict cache, auth nonces and an append-only event timeline per submission.

Exactly one process owns the database file (the store actor on a cluster, the CLI otherwise): DuckDB locks the file
for its writer, so a second process gets `StoreLocked`. A Store is not thread-safe: its owner serialises calls (a Ray
actor does). Every public method is one transaction, every status transition appends an event, and the transitions
of a running submission are guarded by its lease (owner, attempt), so a stale attempt can never score twice.
Timestamps are Unix epoch seconds (DOUBLE) everywhere. docs/store.md describes every table for researchers.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
from pydantic import BaseModel, Field, field_validator

from prism_ray.bundle import Bundle, load_bundle
from prism_ray.config import IntakeLimits, ScoringSettings
from prism_ray.errors import BundleError, Reason
from prism_ray.fingerprint import CodeFingerprints, code_fingerprints
from prism_ray.leaderboard import epoch_of

SCHEMA_VERSION = 2
# Added in version 2: the code fingerprints and copy links of each submission and its original zip.
_V2_SUBMISSION_COLUMNS = (("architecture_family", "VARCHAR"), ("training_fingerprint", "VARCHAR"),
                          ("canonical_fingerprint", "VARCHAR"), ("copy_of", "VARCHAR"), ("near_copy_of", "VARCHAR"),
                          ("notes", "JSON DEFAULT '[]'"), ("zip_sha256", "VARCHAR"))
DEFAULT_MAX_ATTEMPTS = 3

SubmissionStatus = Literal["pending", "running", "completed", "rejected", "failed", "held", "duplicate"]
STATUSES: tuple[str, ...] = ("pending", "running", "completed", "rejected", "failed", "held", "duplicate")
TERMINAL_STATUSES = ("completed", "rejected", "failed", "duplicate")
SCORE_FIELDS = ("bpb", "final_score", "heldout_delta", "gap", "penalty", "anomaly", "tie_break")
TABLES = ("schema_version", "submissions", "zips", "bundles", "runs", "scores", "curves", "gate_reviews",
          "gate_verdicts", "nonces", "events")
_JSON_COLUMNS = frozenset({"reasons", "notes", "metadata", "report", "detail", "verdict"})
_STATUS_LIST = ", ".join(f"'{status}'" for status in STATUSES)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at DOUBLE NOT NULL);
CREATE SEQUENCE IF NOT EXISTS submission_seq;
CREATE TABLE IF NOT EXISTS submissions (
    id VARCHAR PRIMARY KEY, seq BIGINT NOT NULL DEFAULT nextval('submission_seq'),
    hotkey VARCHAR NOT NULL, filename VARCHAR, bundle_sha256 VARCHAR, fingerprint VARCHAR, name VARCHAR,
    tokenizer VARCHAR, status VARCHAR NOT NULL CHECK (status IN ({_STATUS_LIST})), stage VARCHAR NOT NULL,
    reasons JSON NOT NULL, attempt INTEGER NOT NULL, max_attempts INTEGER NOT NULL, lease_owner VARCHAR,
    lease_expires_at DOUBLE, metadata JSON, created_at DOUBLE NOT NULL, updated_at DOUBLE NOT NULL,
    finished_at DOUBLE, duplicate_of VARCHAR, {", ".join(f"{name} {kind}" for name, kind in _V2_SUBMISSION_COLUMNS)});
CREATE TABLE IF NOT EXISTS zips (sha256 VARCHAR PRIMARY KEY, zip BLOB NOT NULL, size BIGINT NOT NULL,
    created_at DOUBLE NOT NULL);
CREATE TABLE IF NOT EXISTS bundles (sha256 VARCHAR PRIMARY KEY, fingerprint VARCHAR NOT NULL, zip_sha256 VARCHAR,
    created_at DOUBLE NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id VARCHAR PRIMARY KEY, submission_id VARCHAR NOT NULL, attempt INTEGER NOT NULL, node VARCHAR,
    started_at DOUBLE NOT NULL, finished_at DOUBLE, status VARCHAR NOT NULL, stage VARCHAR, reasons JSON NOT NULL,
    report JSON, progress_bytes BIGINT, progress_bpb DOUBLE, progress_at DOUBLE, tokens_per_second DOUBLE,
    UNIQUE (submission_id, attempt));
CREATE TABLE IF NOT EXISTS scores (
    submission_id VARCHAR PRIMARY KEY, hotkey VARCHAR NOT NULL, bpb DOUBLE, final_score DOUBLE,
    heldout_delta DOUBLE, gap DOUBLE, penalty DOUBLE, anomaly DOUBLE, tie_break DOUBLE, architecture_family VARCHAR,
    scored_at DOUBLE NOT NULL, epoch BIGINT);
CREATE TABLE IF NOT EXISTS curves (submission_id VARCHAR NOT NULL, attempt INTEGER NOT NULL, bytes BIGINT NOT NULL,
    bpb DOUBLE);
CREATE TABLE IF NOT EXISTS gate_reviews (
    request_sha256 VARCHAR, submission_id VARCHAR, model VARCHAR, prompt_version VARCHAR, outcome VARCHAR,
    raw_reply VARCHAR, latency_s DOUBLE, prompt_tokens INTEGER, completion_tokens INTEGER, attempt INTEGER,
    error VARCHAR, created_at DOUBLE NOT NULL);
CREATE TABLE IF NOT EXISTS gate_verdicts (cache_key VARCHAR PRIMARY KEY, verdict JSON NOT NULL,
    created_at DOUBLE NOT NULL);
CREATE TABLE IF NOT EXISTS nonces (hotkey VARCHAR NOT NULL, nonce VARCHAR NOT NULL, seen_at DOUBLE NOT NULL,
    PRIMARY KEY (hotkey, nonce));
CREATE TABLE IF NOT EXISTS events (
    submission_id VARCHAR NOT NULL, seq INTEGER NOT NULL, created_at DOUBLE NOT NULL, kind VARCHAR NOT NULL,
    stage VARCHAR, detail JSON NOT NULL, PRIMARY KEY (submission_id, seq));
"""

# Per-submission event numbers continue from the last one, so a batch can span several submissions.
_INSERT_EVENTS = """
INSERT INTO events
SELECT b.submission_id,
       coalesce((SELECT max(e.seq) FROM events e WHERE e.submission_id = b.submission_id), 0)
           + row_number() OVER (PARTITION BY b.submission_id ORDER BY b.position),
       ?, b.kind, b.stage, b.detail::JSON
FROM (SELECT unnest(?::VARCHAR[]) AS submission_id, unnest(?::VARCHAR[]) AS kind, unnest(?::VARCHAR[]) AS stage,
             unnest(?::VARCHAR[]) AS detail, unnest(range(?)) AS position) AS b
"""


class StoreError(Exception):
    """The store cannot do what was asked (a newer schema, bad input)."""


class StoreLocked(StoreError):
    """Another process holds the database file; only its owner (the store actor) may open it."""


class SubmissionRecord(BaseModel):
    """One row of `submissions`; `reused` is True when create_submission handed back an earlier submission."""

    id: str
    seq: int
    hotkey: str
    filename: str | None
    bundle_sha256: str | None
    fingerprint: str | None
    name: str | None
    tokenizer: str | None
    status: SubmissionStatus
    stage: str
    reasons: list[Reason] = Field(default_factory=list)
    attempt: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: float | None
    metadata: dict[str, Any] | None
    created_at: float
    updated_at: float
    finished_at: float | None
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


@dataclass(frozen=True)
class _Change:
    """One guarded status transition: the submission row, its open run row and one event."""

    id: str
    attempt: int
    status: str
    stage: str
    reasons: list[Reason]
    kind: str
    detail: dict[str, Any]
    report: dict[str, Any] | None = None


class Store:
    def __init__(self, path: Path | str, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 clock: Callable[[], float] = time.time, scoring: ScoringSettings | None = None) -> None:
        self.path = str(path)
        self.max_attempts = max_attempts
        self.scoring = scoring or ScoringSettings()
        self._clock = clock
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # a fresh --state-dir or store path is fine
        try:
            self._con = duckdb.connect(self.path)
        except duckdb.IOException as error:
            if "lock" in str(error).lower():
                raise StoreLocked(f"{self.path} is held by another process; DuckDB allows one writer per file, so go "
                                  f"through the process that owns it (the store actor). DuckDB said: {error}") from None
            raise
        with self._transaction() as con:
            con.execute(_SCHEMA)
            version = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {version}; this prism-ray knows {SCHEMA_VERSION}")
            if version == 1:
                _migrate_to_v2(con)
            if version != SCHEMA_VERSION:
                con.execute("INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, self._clock()])

    def close(self) -> None:
        self._con.close()

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
        now = self._clock()
        zipped = bundle.to_zip() if zipped is None else zipped
        fingerprints = fingerprints or code_fingerprints(bundle)
        with self._transaction():
            own = self._rows("SELECT id FROM submissions WHERE fingerprint = ? AND hotkey = ? ORDER BY seq LIMIT 1",
                             [bundle.fingerprint, hotkey])
            if own:
                return self._record(own[0]["id"]).model_copy(update={"reused": True})
            earlier = self._rows("SELECT id FROM submissions WHERE fingerprint = ? AND status <> 'duplicate' "
                                 "ORDER BY seq LIMIT 1", [bundle.fingerprint])
            zip_sha256 = hashlib.sha256(zipped).hexdigest()
            self._con.execute("INSERT INTO zips (sha256, zip, size, created_at) VALUES (?, ?, ?, ?) "
                              "ON CONFLICT DO NOTHING",
                              [zip_sha256, zipped, len(zipped), now])
            self._con.execute("INSERT INTO bundles (sha256, fingerprint, zip_sha256, created_at) VALUES (?, ?, ?, ?) "
                              "ON CONFLICT DO NOTHING",
                              [bundle.sha256, bundle.fingerprint, zip_sha256, now])
            links: dict[str, Any] = {"zip_sha256": zip_sha256}
            if earlier:
                original = earlier[0]["id"]
                reasons = [Reason(rule="duplicate", message=f"identical to the earlier submission {original}; "
                                  "the earliest submission of the same code wins")]
                status, stage, kind, detail = "duplicate", "intake", "duplicate", {"duplicate_of": original}
            else:
                original, reasons = None, []
                status, stage, kind, detail = "pending", "queued", "submitted", {"filename": filename}
                links |= self._copy_links(hotkey, fingerprints)
                detail |= {name: links[name] for name in ("copy_of", "near_copy_of") if links.get(name)}
            submission_id = self._insert_submission(
                hotkey, filename, status, stage, reasons, now, metadata, bundle=bundle, duplicate_of=original,
                fingerprints=fingerprints, **links)
            self._append_events([(submission_id, kind, stage, {**detail, "reasons": _dump(reasons)})], now)
            return self._record(submission_id)

    def _copy_links(self, hotkey: str, fingerprints: CodeFingerprints) -> dict[str, Any]:
        """copy_of / near_copy_of and the note the miner reads, against the earlier submissions of other hotkeys."""
        first = self._rows("SELECT id, hotkey FROM submissions WHERE canonical_fingerprint = ? AND "
                           "status <> 'duplicate' ORDER BY seq LIMIT 1", [fingerprints.canonical])
        if first and first[0]["hotkey"] != hotkey:  # a hotkey's own earlier code is never a copy
            original = first[0]["id"]
            return {"copy_of": original, "notes": [Reason(
                rule="copy:duplicate", message=f"the same code as the earlier submission {original} of another "
                "hotkey, up to names, formatting and comments; it is evaluated and shown, but earns no weight: the "
                "earliest submission of the code keeps it")]}
        near = self._rows("SELECT id FROM submissions WHERE architecture_family = ? AND training_fingerprint = ? AND "
                          "canonical_fingerprint <> ? AND hotkey <> ? AND status <> 'duplicate' ORDER BY seq LIMIT 1",
                          [fingerprints.architecture_family, fingerprints.training, fingerprints.canonical, hotkey])
        if near:
            return {"near_copy_of": near[0]["id"], "notes": [Reason(
                rule="copy:near", message=f"the same architecture and training loop as the earlier submission "
                f"{near[0]['id']} of another hotkey, differing only in numeric literals (hyperparameters); shown for "
                "reference, it earns weight as usual")]}
        return {}

    def reject_submission(self, hotkey: str, filename: str | None, reasons: Sequence[Reason | dict[str, Any]],
                          stage: str = "intake", metadata: dict[str, Any] | None = None) -> SubmissionRecord:
        """Store an intake or contract rejection (no valid bundle exists), so the miner can look it up."""
        now = self._clock()
        typed = _reasons(reasons)
        with self._transaction():
            submission_id = self._insert_submission(hotkey, filename, "rejected", stage, typed, now, metadata)
            self._append_events([(submission_id, "rejected", stage, {"reasons": _dump(typed)})], now)
            return self._record(submission_id)

    def bundle_zip(self, sha256: str) -> bytes | None:
        """The zip of a bundle (by `bundle_sha256`): the original upload of the first submission of its files."""
        row = self._con.execute("SELECT z.zip FROM bundles b JOIN zips z ON z.sha256 = b.zip_sha256 "
                                "WHERE b.sha256 = ?", [sha256]).fetchone()
        return bytes(row[0]) if row else None

    def original_zip(self, submission_id: str) -> bytes | None:
        """The exact bytes the miner sent with this submission (null for intake rejections)."""
        row = self._con.execute("SELECT z.zip FROM submissions s JOIN zips z ON z.sha256 = s.zip_sha256 "
                                "WHERE s.id = ?", [submission_id]).fetchone()
        return bytes(row[0]) if row else None

    # --- reads --------------------------------------------------------------------------------------------------

    def get_submission(self, submission_id: str) -> SubmissionRecord | None:
        rows = self._rows("SELECT * FROM submissions WHERE id = ?", [submission_id])
        return SubmissionRecord(**rows[0]) if rows else None

    def list_submissions(self, status: str | None = None, hotkey: str | None = None,
                         limit: int = 100) -> list[SubmissionRecord]:
        """Newest first."""
        rows = self._rows("SELECT * FROM submissions WHERE (?::VARCHAR IS NULL OR status = ?) AND "
                          "(?::VARCHAR IS NULL OR hotkey = ?) ORDER BY seq DESC LIMIT ?",
                          [status, status, hotkey, hotkey, limit])
        return [SubmissionRecord(**row) for row in rows]

    def events(self, submission_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT seq, created_at, kind, stage, detail FROM events WHERE submission_id = ? "
                          "ORDER BY seq", [submission_id])

    def runs(self, submission_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM runs WHERE submission_id = ? ORDER BY attempt", [submission_id])

    def curve(self, submission_id: str) -> list[dict[str, Any]]:
        """The scored attempt's learning curve: cumulative target bytes vs. running bpb."""
        return self._rows("SELECT bytes, bpb FROM curves WHERE submission_id = ? AND attempt = (SELECT max(attempt) "
                          "FROM curves WHERE submission_id = ?) ORDER BY bytes", [submission_id, submission_id])

    def near_copies(self, submission_id: str) -> list[str]:
        """Other hotkeys' submissions whose code differs from this one's only in numeric literals, earliest first."""
        rows = self._con.execute(
            "SELECT o.id FROM submissions s JOIN submissions o ON o.architecture_family = s.architecture_family AND "
            "o.training_fingerprint = s.training_fingerprint AND o.canonical_fingerprint <> s.canonical_fingerprint "
            "AND o.hotkey <> s.hotkey AND o.status <> 'duplicate' WHERE s.id = ? ORDER BY o.seq",
            [submission_id]).fetchall()
        return [row[0] for row in rows]

    def scored_rows(self) -> list[dict[str, Any]]:
        """Completed submissions with their scores, best first; ties → earliest submission, then id.
        Each row fits `leaderboard.ScoreRow(**row)` (submitted_at = created_at, epoch seconds)."""
        return self._rows(
            "SELECT s.id AS submission_id, s.hotkey, s.status, s.name, s.filename, s.tokenizer, s.bundle_sha256, "
            "s.seq, s.created_at AS submitted_at, s.finished_at, s.architecture_family, s.copy_of, s.near_copy_of, "
            "sc.bpb, sc.final_score, sc.heldout_delta, sc.gap, sc.penalty, sc.anomaly, sc.tie_break, sc.scored_at, "
            "sc.epoch FROM submissions s "
            "JOIN scores sc ON sc.submission_id = s.id WHERE s.status = 'completed' "
            "ORDER BY sc.final_score DESC NULLS LAST, s.seq, s.id")

    def stats(self) -> dict[str, Any]:
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(self._con.execute("SELECT status, count(*) FROM submissions GROUP BY status").fetchall())
        return {"by_status": counts, "queue_depth": counts["pending"], "in_flight": counts["running"],
                "total": sum(counts.values())}

    # --- the queue ----------------------------------------------------------------------------------------------

    def claim_next(self, owner: str, lease_seconds: float, limit: int = 1) -> list[SubmissionRecord]:
        """Oldest pending first → running with attempt+1 and a lease held by `owner`; one new run row each.
        A requeued submission keeps its place in line (its `seq`), so a retry is not pushed behind newer work."""
        now = self._clock()
        with self._transaction():
            claimed = self._con.execute(
                "UPDATE submissions SET status = 'running', stage = 'claimed', reasons = '[]', attempt = attempt + 1, "
                "lease_owner = ?, lease_expires_at = ?, updated_at = ? WHERE id IN (SELECT id FROM submissions "
                "WHERE status = 'pending' ORDER BY seq LIMIT ?) RETURNING id, attempt",
                [owner, now + lease_seconds, now, limit]).fetchall()
            if not claimed:
                return []
            ids, attempts = [row[0] for row in claimed], [row[1] for row in claimed]
            self._con.execute(
                "INSERT INTO runs (id, submission_id, attempt, started_at, status, stage, reasons) "
                "SELECT 'run_' || replace(uuid()::VARCHAR, '-', ''), unnest(?::VARCHAR[]), unnest(?::INTEGER[]), ?, "
                "'running', 'claimed', '[]'", [ids, attempts, now])
            self._append_events([(sid, "claimed", "claimed", {"owner": owner, "attempt": attempt,
                                                              "lease_expires_at": now + lease_seconds})
                                 for sid, attempt in claimed], now)
            rows = self._rows("SELECT * FROM submissions WHERE id IN (SELECT unnest(?::VARCHAR[])) ORDER BY seq",
                              [ids])
            return [SubmissionRecord(**row) for row in rows]

    def renew_lease(self, submission_id: str, owner: str, lease_seconds: float, progress_bytes: int | None = None,
                    progress_bpb: float | None = None, tokens_per_second: float | None = None,
                    attempt: int | None = None) -> bool:
        """Extend the lease and record progress; False when the lease was lost (requeued or finished)."""
        now = self._clock()
        with self._transaction():
            renewed = self._con.execute(
                "UPDATE submissions SET lease_expires_at = ?, updated_at = ? WHERE id = ? AND status = 'running' "
                "AND lease_owner = ? AND (?::INTEGER IS NULL OR attempt = ?) RETURNING attempt",
                [now + lease_seconds, now, submission_id, owner, attempt, attempt]).fetchone()
            if renewed is None:
                return False
            self._con.execute(
                "UPDATE runs SET progress_bytes = coalesce(?, progress_bytes), "
                "progress_bpb = coalesce(?, progress_bpb), tokens_per_second = coalesce(?, tokens_per_second), "
                "progress_at = ? WHERE submission_id = ? AND attempt = ?",
                [progress_bytes, _finite(progress_bpb), _finite(tokens_per_second), now, submission_id, renewed[0]])
            return True

    def set_stage(self, submission_id: str, stage: str, node: str | None = None, owner: str | None = None,
                  attempt: int | None = None) -> bool:
        """Record the stage a running submission entered (and the node it runs on, once known)."""
        now = self._clock()
        with self._transaction():
            updated = self._con.execute(
                "UPDATE submissions SET stage = ?, updated_at = ? WHERE id = ? AND status = 'running' "
                "AND (?::VARCHAR IS NULL OR lease_owner = ?) AND (?::INTEGER IS NULL OR attempt = ?) RETURNING attempt",
                [stage, now, submission_id, owner, owner, attempt, attempt]).fetchone()
            if updated is None:
                return False
            self._con.execute("UPDATE runs SET stage = ?, node = coalesce(?, node) WHERE submission_id = ? "
                              "AND attempt = ?", [stage, node, submission_id, updated[0]])
            self._append_events([(submission_id, "stage", stage, {"node": node} if node else {})], now)
            return True

    def complete(self, submission_id: str, owner: str, report: BaseModel | dict[str, Any], score: dict[str, Any],
                 curve: Sequence[dict[str, float]], attempt: int | None = None) -> bool:
        """Score a running submission; False (nothing written) unless `owner` still holds its lease."""
        unknown = set(score) - set(SCORE_FIELDS)
        if unknown:
            raise StoreError(f"unknown score fields {sorted(unknown)}; known: {', '.join(SCORE_FIELDS)}")
        report = _plain(report)
        now = self._clock()
        with self._transaction():
            rows = self._guarded([submission_id], ("running",), owner, attempt)
            if not rows:
                return False
            row = rows[0]
            stage = report.get("stage") or "score"
            # The epoch is the submission's (docs/scoring.md, "Epochs"), the same one the leaderboard filters by.
            epoch = epoch_of(row["created_at"], self.scoring)
            detail = {"attempt": row["attempt"], "bpb": _finite(score.get("bpb")),
                      "final_score": _finite(score.get("final_score"))}
            self._apply([_Change(submission_id, row["attempt"], "completed", stage, _reasons(report.get("reasons", [])),
                                 "completed", detail, report)], now)
            values = [_finite(score.get(name)) for name in SCORE_FIELDS]
            marks = ", ".join("?" for _ in SCORE_FIELDS)
            self._con.execute(f"INSERT INTO scores (submission_id, hotkey, scored_at, architecture_family, epoch, "
                              f"{', '.join(SCORE_FIELDS)}) VALUES (?, ?, ?, ?, ?, {marks})",
                              [submission_id, row["hotkey"], now, row["architecture_family"], epoch, *values])
            if curve:
                self._con.execute("INSERT INTO curves SELECT ?, ?, unnest(?::BIGINT[]), unnest(?::DOUBLE[])",
                                  [submission_id, row["attempt"], [int(point["bytes"]) for point in curve],
                                   [float(point["bpb"]) for point in curve]])
            return True

    def fail(self, submission_id: str, reasons: Sequence[Reason | dict[str, Any]], stage: str, terminal: bool = True,
             status: Literal["failed", "rejected"] = "failed", report: BaseModel | dict[str, Any] | None = None,
             owner: str | None = None, attempt: int | None = None) -> bool:
        """End a submission `failed` (or `rejected`, e.g. by the gate); terminal=False requeues it instead."""
        typed = _reasons(reasons)
        if not terminal:
            return bool(self._requeue([submission_id], typed, owner, attempt))
        now = self._clock()
        with self._transaction():
            rows = self._guarded([submission_id], ("pending", "running", "held"), owner, attempt)
            self._apply([_Change(row["id"], row["attempt"], status, stage, typed, status, {"reasons": _dump(typed)},
                                 _plain(report) if report is not None else None) for row in rows], now)
            return bool(rows)

    def hold(self, submission_id: str, reasons: Sequence[Reason | dict[str, Any]], stage: str | None = None,
             owner: str | None = None, attempt: int | None = None) -> bool:
        """Park a submission for an operator (the gate failed closed); `release` puts it back in the queue."""
        typed = _reasons(reasons)
        now = self._clock()
        with self._transaction():
            rows = self._guarded([submission_id], ("pending", "running"), owner, attempt)
            self._apply([_Change(row["id"], row["attempt"], "held", stage or row["stage"], typed, "held",
                                 {"reasons": _dump(typed)}) for row in rows], now)
            return bool(rows)

    def release(self, submission_id: str) -> bool:
        """A held submission goes back to the queue (after an operator looked at it)."""
        now = self._clock()
        with self._transaction():
            rows = self._guarded([submission_id], ("held",), None, None)
            self._apply([_Change(row["id"], row["attempt"], "pending", "queued", [], "released", {}) for row in rows],
                        now)
            return bool(rows)

    def requeue(self, submission_id: str, reason: Reason, owner: str | None = None, attempt: int | None = None) -> bool:
        """A system failure (not the miner's): back to pending, or `failed` once the attempts are spent."""
        return bool(self._requeue([submission_id], [reason], owner, attempt))

    def requeue_expired(self, now: float | None = None) -> list[str]:
        """Running submissions whose lease expired: requeued, or failed `infra:attempts_exhausted`."""
        now = self._clock() if now is None else now
        expired = self._con.execute("SELECT id FROM submissions WHERE status = 'running' AND lease_expires_at < ? "
                                    "ORDER BY seq", [now]).fetchall()
        reason = Reason(rule="infra:lease_expired", message="the run stopped reporting before its lease expired")
        return self._requeue([row[0] for row in expired], [reason])

    def recover(self, live_ids: Sequence[str]) -> list[str]:
        """On scheduler start: running submissions it does not know are orphans of a dead scheduler → requeued."""
        orphans = self._con.execute("SELECT id FROM submissions WHERE status = 'running' AND "
                                    "NOT list_contains(?::VARCHAR[], id) ORDER BY seq", [list(live_ids)]).fetchall()
        reason = Reason(rule="infra:orphaned", message="the scheduler restarted while this run was in flight")
        return self._requeue([row[0] for row in orphans], [reason])

    # --- auth nonces and the gate -------------------------------------------------------------------------------

    def check_nonce(self, hotkey: str, nonce: str, ttl: float) -> bool:
        """Insert-once: False on a replay. Nonces older than `ttl` are purged, so callers must refuse stale
        signed timestamps themselves (a nonce is only remembered for `ttl` seconds)."""
        now = self._clock()
        with self._transaction():
            self._con.execute("DELETE FROM nonces WHERE seen_at < ?", [now - ttl])
            inserted = self._con.execute("INSERT INTO nonces VALUES (?, ?, ?) ON CONFLICT DO NOTHING RETURNING nonce",
                                         [hotkey, nonce, now]).fetchall()
            return bool(inserted)

    def get(self, key: str) -> dict[str, Any] | None:
        """Gate verdict cache (the VerdictCache protocol, as plain dicts)."""
        row = self._con.execute("SELECT verdict FROM gate_verdicts WHERE cache_key = ?", [key]).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, verdict: BaseModel | dict[str, Any]) -> None:
        with self._transaction():
            self._con.execute("INSERT OR REPLACE INTO gate_verdicts VALUES (?, ?::JSON, ?)",
                              [key, _json(_plain(verdict)), self._clock()])

    def record_gate_audits(self, submission_id: str | None, audits: Sequence[BaseModel | dict[str, Any]]) -> None:
        """One row per call to the gate's model, exactly what was asked and answered."""
        if not audits:
            return
        columns = ("request_sha256", "model", "prompt_version", "outcome", "raw_reply", "latency_s", "prompt_tokens",
                   "completion_tokens", "attempt", "error")
        types = ("VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "DOUBLE", "INTEGER", "INTEGER", "INTEGER",
                 "VARCHAR")
        plain = [_plain(audit) for audit in audits]
        selects = ", ".join(f"unnest(?::{kind}[]) AS {name}" for name, kind in zip(columns, types, strict=True))
        values = [[audit.get(name) for audit in plain] for name in columns]
        with self._transaction():
            self._con.execute(f"INSERT INTO gate_reviews (submission_id, created_at, {', '.join(columns)}) "
                              f"SELECT ?, ?, {selects}", [submission_id, self._clock(), *values])

    # --- export -------------------------------------------------------------------------------------------------

    def export_parquet(self, out_dir: Path | str) -> list[Path]:
        """Every table to `<out_dir>/<table>.parquet`, from one consistent snapshot."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{table}.parquet" for table in TABLES]
        with self._transaction():
            for table, path in zip(TABLES, paths, strict=True):
                quoted = str(path).replace("'", "''")
                self._con.execute(f"COPY {table} TO '{quoted}' (FORMAT parquet)")
        return paths

    # --- internals ----------------------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self._con.begin()
        try:
            yield self._con
        except BaseException:
            self._con.rollback()
            raise
        self._con.commit()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self._con.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [{name: json.loads(value) if name in _JSON_COLUMNS and value is not None else value
                 for name, value in zip(names, row, strict=True)} for row in cursor.fetchall()]

    def _record(self, submission_id: str) -> SubmissionRecord:
        return SubmissionRecord(**self._rows("SELECT * FROM submissions WHERE id = ?", [submission_id])[0])

    def _insert_submission(self, hotkey: str, filename: str | None, status: str, stage: str, reasons: list[Reason],
                           now: float, metadata: dict[str, Any] | None, bundle: Bundle | None = None,
                           duplicate_of: str | None = None, fingerprints: CodeFingerprints | None = None,
                           copy_of: str | None = None, near_copy_of: str | None = None,
                           notes: Sequence[Reason] = (), zip_sha256: str | None = None) -> str:
        submission_id = f"sub_{uuid.uuid4().hex}"
        finished_at = now if status in TERMINAL_STATUSES else None
        self._con.execute(
            "INSERT INTO submissions (id, hotkey, filename, bundle_sha256, fingerprint, name, tokenizer, status, "
            "stage, reasons, attempt, max_attempts, metadata, created_at, updated_at, finished_at, duplicate_of, "
            "architecture_family, training_fingerprint, canonical_fingerprint, copy_of, near_copy_of, notes, "
            "zip_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?::JSON, 0, ?, ?::JSON, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?::JSON, ?)",
            [submission_id, hotkey, filename, bundle and bundle.sha256, bundle and bundle.fingerprint,
             bundle and bundle.display_name, bundle and bundle.config.tokenizer, status, stage, _json(_dump(reasons)),
             self.max_attempts, None if metadata is None else _json(metadata), now, now, finished_at, duplicate_of,
             fingerprints and fingerprints.architecture_family, fingerprints and fingerprints.training,
             fingerprints and fingerprints.canonical, copy_of, near_copy_of, _json(_dump(notes)), zip_sha256])
        return submission_id

    def _guarded(self, ids: Sequence[str], statuses: Sequence[str], owner: str | None,
                 attempt: int | None) -> list[dict[str, Any]]:
        """Those submissions that are in one of `statuses` and, when given, still leased to owner/attempt."""
        return self._rows(
            "SELECT id, hotkey, attempt, max_attempts, stage, created_at, architecture_family FROM submissions "
            "WHERE list_contains(?::VARCHAR[], id) "
            "AND list_contains(?::VARCHAR[], status) AND (?::VARCHAR IS NULL OR lease_owner = ?) AND "
            "(?::INTEGER IS NULL OR attempt = ?) ORDER BY seq",
            [list(ids), list(statuses), owner, owner, attempt, attempt])

    def _requeue(self, ids: Sequence[str], reasons: list[Reason], owner: str | None = None,
                 attempt: int | None = None) -> list[str]:
        now = self._clock()
        changes: list[_Change] = []
        with self._transaction():
            for row in self._guarded(ids, ("running",), owner, attempt):
                if row["attempt"] >= row["max_attempts"]:
                    exhausted = Reason(rule="infra:attempts_exhausted", message=f"gave up after {row['attempt']} "
                                       f"attempts; the last one ended: {reasons[0].message}")
                    final = [exhausted, *reasons]
                    changes.append(_Change(row["id"], row["attempt"], "failed", row["stage"], final, "failed",
                                           {"attempt": row["attempt"], "reasons": _dump(final)}))
                else:
                    changes.append(_Change(row["id"], row["attempt"], "pending", "queued", reasons, "requeued",
                                           {"attempt": row["attempt"], "reasons": _dump(reasons)}))
            self._apply(changes, now)
        return [change.id for change in changes]

    def _apply(self, changes: list[_Change], now: float) -> None:
        """Write transitions in three statements: submissions, their open run rows, the events."""
        if not changes:
            return
        ids = [change.id for change in changes]
        statuses = [change.status for change in changes]
        stages = [change.stage for change in changes]
        reasons = [_json(_dump(change.reasons)) for change in changes]
        self._con.execute(
            "UPDATE submissions AS s SET status = u.status, stage = u.stage, reasons = u.reasons::JSON, "
            "updated_at = ?, lease_owner = NULL, lease_expires_at = NULL, "
            "finished_at = CASE WHEN list_contains(?::VARCHAR[], u.status) THEN ? END "
            "FROM (SELECT unnest(?::VARCHAR[]) AS id, unnest(?::VARCHAR[]) AS status, unnest(?::VARCHAR[]) AS stage, "
            "unnest(?::VARCHAR[]) AS reasons) AS u WHERE s.id = u.id",
            [now, list(TERMINAL_STATUSES), now, ids, statuses, stages, reasons])
        # The attempt's run row closes with the outcome; a requeued attempt ends `requeued`.
        self._con.execute(
            "UPDATE runs AS r SET status = u.status, stage = u.stage, reasons = u.reasons::JSON, "
            "report = u.report::JSON, finished_at = ? "
            "FROM (SELECT unnest(?::VARCHAR[]) AS id, unnest(?::INTEGER[]) AS attempt, unnest(?::VARCHAR[]) AS status, "
            "unnest(?::VARCHAR[]) AS stage, unnest(?::VARCHAR[]) AS reasons, unnest(?::VARCHAR[]) AS report) AS u "
            "WHERE r.submission_id = u.id AND r.attempt = u.attempt AND r.finished_at IS NULL",
            [now, ids, [change.attempt for change in changes],
             ["requeued" if status == "pending" else status for status in statuses], stages, reasons,
             [None if change.report is None else _json(change.report) for change in changes]])
        self._append_events([(change.id, change.kind, change.stage, change.detail) for change in changes], now)

    def _append_events(self, events: list[tuple[str, str, str | None, dict[str, Any]]], now: float) -> None:
        self._con.execute(_INSERT_EVENTS, [now, [event[0] for event in events], [event[1] for event in events],
                                           [event[2] for event in events], [_json(event[3]) for event in events],
                                           len(events)])


def _reasons(reasons: Sequence[Reason | dict[str, Any]]) -> list[Reason]:
    return [reason if isinstance(reason, Reason) else Reason(**reason) for reason in reasons]


def _dump(reasons: Sequence[Reason]) -> list[dict[str, Any]]:
    return [reason.model_dump() for reason in reasons]


def _plain(value: BaseModel | dict[str, Any]) -> dict[str, Any]:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else dict(value)


def _finite(value: Any) -> Any:
    """NaN/inf become NULL: JSON has no spelling for them and SQL aggregates should skip them."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _json(value: Any) -> str:
    def clean(item: Any) -> Any:
        if isinstance(item, dict):
            return {str(key): clean(inner) for key, inner in item.items()}
        if isinstance(item, list | tuple):
            return [clean(inner) for inner in item]
        return _finite(item)

    return json.dumps(clean(value), allow_nan=False)


def _migrate_to_v2(con: duckdb.DuckDBPyConnection) -> None:
    """Version 1 → 2: code fingerprints and copy links on submissions; original zips in a content-addressed table
    (a version-1 file only has its deterministic re-zips, which become the kept zips)."""
    for name, kind in _V2_SUBMISSION_COLUMNS:
        con.execute(f"ALTER TABLE submissions ADD COLUMN {name} {kind}")
    con.execute("INSERT INTO zips SELECT sha256(zip), zip, size, created_at FROM bundles ON CONFLICT DO NOTHING")
    con.execute("ALTER TABLE bundles ADD COLUMN zip_sha256 VARCHAR")
    con.execute("UPDATE bundles SET zip_sha256 = sha256(zip)")
    con.execute("ALTER TABLE bundles DROP COLUMN zip")
    con.execute("ALTER TABLE bundles DROP COLUMN size")
    con.execute("UPDATE submissions AS s SET zip_sha256 = b.zip_sha256 FROM bundles b WHERE b.sha256 = s.bundle_sha256")
    unlimited = IntakeLimits(max_files=1 << 20, max_member_bytes=1 << 40, max_total_bytes=1 << 40)
    for zip_sha256, zipped in con.execute("SELECT sha256, zip FROM zips").fetchall():
        try:
            prints = code_fingerprints(load_bundle(bytes(zipped), unlimited))
        except BundleError:  # stored under limits this version no longer accepts: no family, as before
            continue
        con.execute("UPDATE submissions SET architecture_family = ?, training_fingerprint = ?, "
                    "canonical_fingerprint = ? WHERE zip_sha256 = ?",
                    [prints.architecture_family, prints.training, prints.canonical, zip_sha256])
    con.execute("UPDATE scores AS sc SET architecture_family = s.architecture_family FROM submissions s "
                "WHERE s.id = sc.submission_id")
