"""A submission's life in the store: intake (duplicates, copies, the original zip), then the ends of its runs
(completed with a score, failed, rejected, held and released). The lease rules are the queue's."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel

from prism_ray.bundle import Bundle
from prism_ray.config import ScoringSettings
from prism_ray.errors import Reason
from prism_ray.fingerprint import CodeFingerprints, code_fingerprints
from prism_ray.leaderboard import epoch_of
from prism_ray.store.db import Db, StoreError, dump, finite, plain, reasons_of, to_json
from prism_ray.store.queue import Change, Queue
from prism_ray.store.records import SubmissionRecord
from prism_ray.store.schema import SUBMISSION_TERMINAL

SCORE_FIELDS = ("bpb", "final_score", "heldout_delta", "gap", "penalty", "anomaly", "tie_break")


class Submissions:
    def __init__(self, db: Db, queue: Queue, max_attempts: int, scoring: ScoringSettings) -> None:
        self.db = db
        self.queue = queue
        self.max_attempts = max_attempts
        self.scoring = scoring

    def record(self, submission_id: str) -> SubmissionRecord | None:
        rows = self.db.rows("SELECT * FROM submissions WHERE id = ?", [submission_id])
        return SubmissionRecord(**rows[0]) if rows else None

    # --- intake -------------------------------------------------------------------------------------------------

    def create(self, hotkey: str, filename: str, bundle: Bundle, metadata: dict[str, Any] | None,
               zipped: bytes | None, fingerprints: CodeFingerprints | None) -> SubmissionRecord:
        now = self.db.clock()
        zipped = bundle.to_zip() if zipped is None else zipped
        fingerprints = fingerprints or code_fingerprints(bundle)
        with self.db.transaction() as con:
            own = self.db.rows("SELECT id FROM submissions WHERE fingerprint = ? AND hotkey = ? ORDER BY seq LIMIT 1",
                               [bundle.fingerprint, hotkey])
            if own:
                return self.record(own[0]["id"]).model_copy(update={"reused": True})
            earlier = self.db.rows("SELECT id FROM submissions WHERE fingerprint = ? AND status <> 'duplicate' "
                                   "ORDER BY seq LIMIT 1", [bundle.fingerprint])
            zip_sha256 = hashlib.sha256(zipped).hexdigest()
            con.execute("INSERT INTO zips (sha256, zip, size, created_at) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        [zip_sha256, zipped, len(zipped), now])
            con.execute("INSERT INTO bundles (sha256, fingerprint, zip_sha256, created_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT DO NOTHING", [bundle.sha256, bundle.fingerprint, zip_sha256, now])
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
            submission_id = self._insert(hotkey, filename, status, stage, reasons, now, metadata, bundle=bundle,
                                         duplicate_of=original, fingerprints=fingerprints, **links)
            self.db.append_events([(submission_id, kind, stage, {**detail, "reasons": dump(reasons)})], now)
            return self.record(submission_id)

    def _copy_links(self, hotkey: str, fingerprints: CodeFingerprints) -> dict[str, Any]:
        """copy_of / near_copy_of and the note the miner reads, against the earlier submissions of other hotkeys."""
        first = self.db.rows("SELECT id, hotkey FROM submissions WHERE canonical_fingerprint = ? AND "
                             "status <> 'duplicate' ORDER BY seq LIMIT 1", [fingerprints.canonical])
        if first and first[0]["hotkey"] != hotkey:  # a hotkey's own earlier code is never a copy
            original = first[0]["id"]
            return {"copy_of": original, "notes": [Reason(
                rule="copy:duplicate", message=f"the same code as the earlier submission {original} of another "
                "hotkey, up to names, formatting and comments; it is evaluated and shown, but earns no weight: the "
                "earliest submission of the code keeps it")]}
        near = self.db.rows(
            "SELECT id FROM submissions WHERE architecture_family = ? AND training_fingerprint = ? AND "
            "canonical_fingerprint <> ? AND hotkey <> ? AND status <> 'duplicate' ORDER BY seq LIMIT 1",
            [fingerprints.architecture_family, fingerprints.training, fingerprints.canonical, hotkey])
        if near:
            return {"near_copy_of": near[0]["id"], "notes": [Reason(
                rule="copy:near", message=f"the same architecture and training loop as the earlier submission "
                f"{near[0]['id']} of another hotkey, differing only in numeric literals (hyperparameters); shown for "
                "reference, it earns weight as usual")]}
        return {}

    def reject(self, hotkey: str, filename: str | None, reasons: Sequence[Reason | dict[str, Any]], stage: str,
               metadata: dict[str, Any] | None) -> SubmissionRecord:
        now = self.db.clock()
        typed = reasons_of(reasons)
        with self.db.transaction():
            submission_id = self._insert(hotkey, filename, "rejected", stage, typed, now, metadata)
            self.db.append_events([(submission_id, "rejected", stage, {"reasons": dump(typed)})], now)
            return self.record(submission_id)

    def _insert(self, hotkey: str, filename: str | None, status: str, stage: str, reasons: list[Reason], now: float,
                metadata: dict[str, Any] | None, bundle: Bundle | None = None, duplicate_of: str | None = None,
                fingerprints: CodeFingerprints | None = None, copy_of: str | None = None,
                near_copy_of: str | None = None, notes: Sequence[Reason] = (), zip_sha256: str | None = None) -> str:
        submission_id = f"sub_{uuid.uuid4().hex}"
        finished_at = now if status in SUBMISSION_TERMINAL else None
        self.db.execute(
            "INSERT INTO submissions (id, hotkey, filename, bundle_sha256, fingerprint, name, tokenizer, status, "
            "stage, reasons, attempt, max_attempts, metadata, created_at, updated_at, finished_at, duplicate_of, "
            "architecture_family, training_fingerprint, canonical_fingerprint, copy_of, near_copy_of, notes, "
            "zip_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?::JSON, 0, ?, ?::JSON, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?::JSON, ?)",
            [submission_id, hotkey, filename, bundle and bundle.sha256, bundle and bundle.fingerprint,
             bundle and bundle.display_name, bundle and bundle.config.tokenizer, status, stage, to_json(dump(reasons)),
             self.max_attempts, None if metadata is None else to_json(metadata), now, now, finished_at, duplicate_of,
             fingerprints and fingerprints.architecture_family, fingerprints and fingerprints.training,
             fingerprints and fingerprints.canonical, copy_of, near_copy_of, to_json(dump(notes)), zip_sha256])
        return submission_id

    # --- the ends of a run --------------------------------------------------------------------------------------

    def complete(self, submission_id: str, owner: str, report: BaseModel | dict[str, Any], score: dict[str, Any],
                 curve: Sequence[dict[str, float]], attempt: int | None) -> bool:
        unknown = set(score) - set(SCORE_FIELDS)
        if unknown:
            raise StoreError(f"unknown score fields {sorted(unknown)}; known: {', '.join(SCORE_FIELDS)}")
        report = plain(report)
        now = self.db.clock()
        with self.db.transaction() as con:
            rows = self.queue.guarded([submission_id], ("running",), owner, attempt)
            if not rows:
                return False
            row = rows[0]
            detail = {"attempt": row["attempt"], "bpb": finite(score.get("bpb")),
                      "final_score": finite(score.get("final_score"))}
            self.queue.apply([Change(submission_id, row["attempt"], "completed", report.get("stage") or "score",
                                     reasons_of(report.get("reasons", [])), "completed", detail, report)])
            # The epoch is the submission's (docs/scoring.md, "The leaderboard"), the one the board filters by.
            marks = ", ".join("?" for _ in SCORE_FIELDS)
            values = [finite(score.get(name)) for name in SCORE_FIELDS]
            con.execute(f"INSERT INTO scores (submission_id, hotkey, scored_at, architecture_family, epoch, "
                        f"{', '.join(SCORE_FIELDS)}) VALUES (?, ?, ?, ?, ?, {marks})",
                        [submission_id, row["hotkey"], now, row["architecture_family"],
                         epoch_of(row["created_at"], self.scoring), *values])
            if curve:
                con.execute("INSERT INTO curves SELECT ?, ?, unnest(?::BIGINT[]), unnest(?::DOUBLE[])",
                            [submission_id, row["attempt"], [int(point["bytes"]) for point in curve],
                             [float(point["bpb"]) for point in curve]])
            return True

    def fail(self, submission_id: str, reasons: Sequence[Reason | dict[str, Any]], stage: str, terminal: bool,
             status: Literal["failed", "rejected"], report: BaseModel | dict[str, Any] | None, owner: str | None,
             attempt: int | None) -> bool:
        typed = reasons_of(reasons)
        if not terminal:
            return bool(self.queue.requeue([submission_id], typed, owner, attempt))
        with self.db.transaction():
            rows = self.queue.guarded([submission_id], ("pending", "running", "held"), owner, attempt)
            self.queue.apply([Change(row["id"], row["attempt"], status, stage, typed, status, {"reasons": dump(typed)},
                                     plain(report) if report is not None else None) for row in rows])
            return bool(rows)

    def hold(self, submission_id: str, reasons: Sequence[Reason | dict[str, Any]], stage: str | None,
             owner: str | None, attempt: int | None) -> bool:
        typed = reasons_of(reasons)
        with self.db.transaction():
            rows = self.queue.guarded([submission_id], ("pending", "running"), owner, attempt)
            self.queue.apply([Change(row["id"], row["attempt"], "held", stage or row["stage"], typed, "held",
                                     {"reasons": dump(typed)}) for row in rows])
            return bool(rows)

    def release(self, submission_id: str) -> bool:
        with self.db.transaction():
            rows = self.queue.guarded([submission_id], ("held",), None, None)
            self.queue.apply([Change(row["id"], row["attempt"], "pending", "queued", [], "released", {})
                              for row in rows])
            return bool(rows)

    def invalidate(self, submission_id: str, reasons: list[Reason], detail: dict[str, Any]) -> bool:
        """A completed submission whose audit did not reproduce it: `failed`, its score no longer counts."""
        with self.db.transaction():
            rows = self.queue.guarded([submission_id], ("completed",), None, None)
            self.queue.apply([Change(row["id"], row["attempt"], "failed", "audit", reasons, "invalidated",
                                     {**detail, "reasons": dump(reasons)}) for row in rows])
            return bool(rows)
