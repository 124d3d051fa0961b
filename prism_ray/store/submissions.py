"""A submission's life in the store: intake (duplicates, copies, the original zip), then the ends of its runs
(completed with a score, failed, rejected, held and released). The lease rules are the queue's."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Literal

from prism_ray.config import ScoringSettings
from prism_ray.errors import Reason
from prism_ray.evaluation.report import RunReport
from prism_ray.evaluation.scoring import ScoreFields
from prism_ray.intake.bundle import Bundle
from prism_ray.intake.fingerprint import CodeFingerprints, code_fingerprints
from prism_ray.ranking.leaderboard import epoch_of
from prism_ray.store.db import Db, dump, finite, to_json
from prism_ray.store.queue import Change, Queue
from prism_ray.store.reads import submission_records
from prism_ray.store.records import SubmissionRecord
from prism_ray.store.schema import SUBMISSION_TERMINAL

_COLUMNS = (("id", "VARCHAR"), ("hotkey", "VARCHAR"), ("filename", "VARCHAR"), ("bundle_sha256", "VARCHAR"),
            ("fingerprint", "VARCHAR"), ("name", "VARCHAR"), ("tokenizer", "VARCHAR"), ("status", "VARCHAR"),
            ("stage", "VARCHAR"), ("reasons", "JSON"), ("attempt", "INTEGER"), ("max_attempts", "INTEGER"),
            ("metadata", "JSON"), ("created_at", "DOUBLE"), ("updated_at", "DOUBLE"), ("finished_at", "DOUBLE"),
            ("duplicate_of", "VARCHAR"), ("architecture_family", "VARCHAR"), ("training_fingerprint", "VARCHAR"),
            ("canonical_fingerprint", "VARCHAR"), ("copy_of", "VARCHAR"), ("near_copy_of", "VARCHAR"),
            ("notes", "JSON"), ("zip_sha256", "VARCHAR"))

_INSERT_ZIPS = ("INSERT INTO zips (sha256, zip, size, created_at) "
                "SELECT unnest(?::VARCHAR[]), unnest(?::BLOB[]), unnest(?::BIGINT[]), ? ON CONFLICT DO NOTHING")
_INSERT_BUNDLES = ("INSERT INTO bundles (sha256, fingerprint, zip_sha256, created_at) "
                   "SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), ? ON CONFLICT DO NOTHING")

# Per item of a batch, the first stored submission each intake rule can pick (create() and _copy_links() apply the
# rules): its own earlier same code, the first same code that is no duplicate, the first same canonical code, the
# first near copy by another hotkey.
_CANDIDATES = """
WITH batch AS (SELECT unnest(?::VARCHAR[]) AS fingerprint, unnest(?::VARCHAR[]) AS hotkey,
                      unnest(?::VARCHAR[]) AS canonical, unnest(?::VARCHAR[]) AS family,
                      unnest(?::VARCHAR[]) AS training, unnest(range(?)) AS position),
firsts AS (
    SELECT b.position, arg_min(s.id, s.seq) AS id FROM batch b JOIN submissions s
        ON s.fingerprint = b.fingerprint AND s.hotkey = b.hotkey GROUP BY b.position
    UNION ALL
    SELECT b.position, arg_min(s.id, s.seq) FROM batch b JOIN submissions s
        ON s.fingerprint = b.fingerprint AND s.status <> 'duplicate' GROUP BY b.position
    UNION ALL
    SELECT b.position, arg_min(s.id, s.seq) FROM batch b JOIN submissions s
        ON s.canonical_fingerprint = b.canonical AND s.status <> 'duplicate' GROUP BY b.position
    UNION ALL
    SELECT b.position, arg_min(s.id, s.seq) FROM batch b JOIN submissions s
        ON s.architecture_family = b.family AND s.training_fingerprint = b.training
        AND s.canonical_fingerprint <> b.canonical AND s.hotkey <> b.hotkey AND s.status <> 'duplicate'
        GROUP BY b.position)
SELECT DISTINCT f.position, s.seq, s.id, s.hotkey, s.status, s.fingerprint, s.canonical_fingerprint,
       s.architecture_family, s.training_fingerprint
FROM firsts f JOIN submissions s ON s.id = f.id
ORDER BY f.position, s.seq
"""


@dataclass(frozen=True)
class NewSubmission:
    """One checked bundle to store: the zip as the miner sent it (None: the bundle's files, zipped
    deterministically) and its code fingerprints (None: computed by the store; callers compute them off the
    store's owner)."""

    hotkey: str
    filename: str
    bundle: Bundle
    metadata: dict[str, Any] | None = None
    zipped: bytes | None = None
    fingerprints: CodeFingerprints | None = None

    def completed(self) -> NewSubmission:
        return replace(self, zipped=self.bundle.to_zip() if self.zipped is None else self.zipped,
                       fingerprints=self.fingerprints or code_fingerprints(self.bundle))

    @cached_property
    def zip_sha256(self) -> str:  # of a completed() one
        return hashlib.sha256(self.zipped).hexdigest()


class Submissions:
    def __init__(self, db: Db, queue: Queue, max_attempts: int, scoring: ScoringSettings) -> None:
        self.db = db
        self.queue = queue
        self.max_attempts = max_attempts
        self.scoring = scoring

    def record(self, submission_id: str) -> SubmissionRecord | None:
        return submission_records(self.db, [submission_id]).get(submission_id)

    # --- intake -------------------------------------------------------------------------------------------------

    def create(self, items: Sequence[NewSubmission]) -> list[SubmissionRecord]:
        """Each item's record, as if the items were created one by one in this order (an item sees the earlier ones,
        those of the same call included), in one transaction of a few statements however many items there are."""
        now = self.db.clock()
        items = [item.completed() for item in items]
        with self.db.transaction():
            candidates = self._candidates(items)
            answers: list[tuple[str, bool]] = []  # (submission id, reused) per item
            rows: list[dict[str, Any]] = []
            stored: list[NewSubmission] = []
            events = []
            for item, stored_rows in zip(items, candidates, strict=True):
                known = [*stored_rows, *rows]
                same_code = [row for row in known if row["fingerprint"] == item.bundle.fingerprint]
                own = next((row for row in same_code if row["hotkey"] == item.hotkey), None)
                if own:
                    answers.append((own["id"], True))
                    continue
                earlier = next((row for row in same_code if row["status"] != "duplicate"), None)
                links: dict[str, Any] = {"zip_sha256": item.zip_sha256}
                if earlier:
                    original = earlier["id"]
                    reasons = [Reason(rule="duplicate", message=f"identical to the earlier submission {original}; "
                                      "the earliest submission of the same code wins")]
                    status, stage, kind, detail = "duplicate", "intake", "duplicate", {"duplicate_of": original}
                else:
                    original, reasons = None, []
                    status, stage, kind, detail = "pending", "queued", "submitted", {"filename": item.filename}
                    links |= _copy_links(item.hotkey, item.fingerprints, known)
                    detail |= {name: links[name] for name in ("copy_of", "near_copy_of") if links.get(name)}
                row = self._row(item.hotkey, item.filename, status, stage, reasons, now, item.metadata,
                                bundle=item.bundle, duplicate_of=original, fingerprints=item.fingerprints, **links)
                rows.append(row)
                stored.append(item)
                answers.append((row["id"], False))
                events.append((row["id"], kind, stage, {**detail, "reasons": dump(reasons)}))
            self._keep_zips(stored, now)
            self._insert(rows)
            self.db.append_events(events, now)
            records = submission_records(self.db, [submission_id for submission_id, _ in answers])
            return [records[submission_id].model_copy(update={"reused": reused}) for submission_id, reused in answers]

    def _candidates(self, items: list[NewSubmission]) -> list[list[dict[str, Any]]]:
        """Per item, oldest first, the stored rows its rules can pick (the first of each): so, for every rule, the
        first match among them and the rows created before it in the same call is the one a call of its own finds."""
        rows = self.db.rows(_CANDIDATES, [[item.bundle.fingerprint for item in items], [item.hotkey for item in items],
                                          [item.fingerprints.canonical for item in items],
                                          [item.fingerprints.architecture_family for item in items],
                                          [item.fingerprints.training for item in items], len(items)])
        candidates: list[list[dict[str, Any]]] = [[] for _ in items]
        for row in rows:
            candidates[row.pop("position")].append(row)
        return candidates

    def _keep_zips(self, items: list[NewSubmission], now: float) -> None:
        """The original zips of new submissions, and the first zip of each bundle (its files, by sha256)."""
        zips = {item.zip_sha256: item.zipped for item in items}
        bundles = {item.bundle.sha256: (item.bundle.fingerprint, item.zip_sha256) for item in reversed(items)}
        if zips:
            self.db.execute(_INSERT_ZIPS, [list(zips), list(zips.values()), [len(zip_) for zip_ in zips.values()], now])
            self.db.execute(_INSERT_BUNDLES, [list(bundles), [fingerprint for fingerprint, _ in bundles.values()],
                                              [zip_sha256 for _, zip_sha256 in bundles.values()], now])

    def reject(self, hotkey: str, filename: str | None, reasons: Sequence[Reason], stage: str,
               metadata: dict[str, Any] | None) -> SubmissionRecord:
        now = self.db.clock()
        typed = list(reasons)
        with self.db.transaction():
            row = self._row(hotkey, filename, "rejected", stage, typed, now, metadata)
            self._insert([row])
            self.db.append_events([(row["id"], "rejected", stage, {"reasons": dump(typed)})], now)
            return self.record(row["id"])

    def _row(self, hotkey: str, filename: str | None, status: str, stage: str, reasons: list[Reason], now: float,
             metadata: dict[str, Any] | None, bundle: Bundle | None = None, duplicate_of: str | None = None,
             fingerprints: CodeFingerprints | None = None, copy_of: str | None = None, near_copy_of: str | None = None,
             notes: Sequence[Reason] = (), zip_sha256: str | None = None) -> dict[str, Any]:
        """A new row of `submissions`, JSON columns spelled as JSON text."""
        return {"id": f"sub_{uuid.uuid4().hex}", "hotkey": hotkey, "filename": filename,
                "bundle_sha256": bundle and bundle.sha256, "fingerprint": bundle and bundle.fingerprint,
                "name": bundle and bundle.display_name, "tokenizer": bundle and bundle.config.tokenizer,
                "status": status, "stage": stage, "reasons": to_json(dump(reasons)), "attempt": 0,
                "max_attempts": self.max_attempts, "metadata": None if metadata is None else to_json(metadata),
                "created_at": now, "updated_at": now, "finished_at": now if status in SUBMISSION_TERMINAL else None,
                "duplicate_of": duplicate_of,
                "architecture_family": fingerprints and fingerprints.architecture_family,
                "training_fingerprint": fingerprints and fingerprints.training,
                "canonical_fingerprint": fingerprints and fingerprints.canonical, "copy_of": copy_of,
                "near_copy_of": near_copy_of, "notes": to_json(dump(notes)), "zip_sha256": zip_sha256}

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        """One statement for all rows; they take their `seq` in list order."""
        if not rows:
            return
        columns = ", ".join(name for name, _ in _COLUMNS)
        values = ", ".join(f"unnest(?::{'VARCHAR' if kind == 'JSON' else kind}[])::{kind} AS {name}"
                           for name, kind in _COLUMNS)
        self.db.execute(f"INSERT INTO submissions ({columns}) SELECT {columns} FROM (SELECT {values}, "
                        f"unnest(range(?)) AS position) ORDER BY position",
                        [*([row[name] for row in rows] for name, _ in _COLUMNS), len(rows)])

    # --- the ends of a run --------------------------------------------------------------------------------------

    def complete(self, submission_id: str, owner: str, report: RunReport, attempt: int | None) -> bool:
        """Store a scored run: its report, its scores row and its curve, all read off the report."""
        score = report.score_row()
        now = self.db.clock()
        with self.db.transaction() as con:
            rows = self.queue.guarded([submission_id], ("running",), owner, attempt)
            if not rows:
                return False
            row = rows[0]
            detail = {"attempt": row["attempt"], "bpb": score.bpb, "final_score": score.final_score}
            self.queue.apply([Change(submission_id, row["attempt"], "completed", report.stage or "score",
                                     report.reasons, "completed", detail, report)])
            # The epoch is the submission's (docs/scoring.md, "The leaderboard"), the one the board filters by.
            names = list(ScoreFields.model_fields)
            con.execute(f"INSERT INTO scores (submission_id, hotkey, scored_at, architecture_family, epoch, "
                        f"{', '.join(names)}) VALUES (?, ?, ?, ?, ?, {', '.join('?' for _ in names)})",
                        [submission_id, row["hotkey"], now, row["architecture_family"],
                         epoch_of(row["created_at"], self.scoring), *(getattr(score, name) for name in names)])
            # The run's own curve replaces the points its heartbeats left (Queue.renew).
            con.execute("DELETE FROM curves WHERE submission_id = ? AND attempt = ?", [submission_id, row["attempt"]])
            if report.curve:
                con.execute("INSERT INTO curves SELECT ?, ?, unnest(?::BIGINT[]), unnest(?::DOUBLE[])",
                            [submission_id, row["attempt"], [int(point["bytes"]) for point in report.curve],
                             [finite(float(point["bpb"])) for point in report.curve]])
            return True

    def fail(self, submission_id: str, reasons: Sequence[Reason], stage: str, terminal: bool,
             status: Literal["failed", "rejected"], report: RunReport | None, owner: str | None,
             attempt: int | None) -> bool:
        typed = list(reasons)
        if not terminal:
            return bool(self.queue.requeue([submission_id], typed, owner, attempt))
        with self.db.transaction():
            rows = self.queue.guarded([submission_id], ("pending", "running", "held"), owner, attempt)
            self.queue.apply([Change(row["id"], row["attempt"], status, stage, typed, status, {"reasons": dump(typed)},
                                     report) for row in rows])
            return bool(rows)

    def hold(self, submission_id: str, reasons: Sequence[Reason], stage: str | None, report: RunReport | None,
             owner: str | None, attempt: int | None) -> bool:
        typed = list(reasons)
        with self.db.transaction():
            rows = self.queue.guarded([submission_id], ("pending", "running"), owner, attempt)
            self.queue.apply([Change(row["id"], row["attempt"], "held", stage or row["stage"], typed, "held",
                                     {"reasons": dump(typed)}, report) for row in rows])
            return bool(rows)

    def release(self, submission_id: str) -> bool:
        with self.db.transaction():
            rows = self.queue.guarded([submission_id], ("held",), None, None)
            self.queue.apply([Change(row["id"], row["attempt"], "pending", "queued", [], "released", {})
                              for row in rows])
            return bool(rows)

    def invalidate(self, submission_id: str, reasons: list[Reason], detail: dict[str, Any],
                   stage: str = "audit") -> bool:
        """A completed submission whose audit did not reproduce it, or whose seed replica failed on the code's
        account: `failed`, its score no longer counts."""
        with self.db.transaction():
            rows = self.queue.guarded([submission_id], ("completed",), None, None)
            self.queue.apply([Change(row["id"], row["attempt"], "failed", stage, reasons, "invalidated",
                                     {**detail, "reasons": dump(reasons)}) for row in rows])
            return bool(rows)


def _copy_links(hotkey: str, fingerprints: CodeFingerprints, known: list[dict[str, Any]]) -> dict[str, Any]:
    """copy_of / near_copy_of and the note the miner reads, against the earlier submissions of other hotkeys
    (`known`, oldest first)."""
    kept = [row for row in known if row["status"] != "duplicate"]
    first = next((row for row in kept if row["canonical_fingerprint"] == fingerprints.canonical), None)
    if first and first["hotkey"] != hotkey:  # a hotkey's own earlier code is never a copy
        original = first["id"]
        return {"copy_of": original, "notes": [Reason(
            rule="copy:duplicate", message=f"the same code as the earlier submission {original} of another "
            "hotkey, up to names, formatting and comments; it is evaluated and shown, but earns no weight: the "
            "earliest submission of the code keeps it")]}
    near = next((row for row in kept if row["architecture_family"] == fingerprints.architecture_family
                 and row["training_fingerprint"] == fingerprints.training
                 and row["canonical_fingerprint"] != fingerprints.canonical and row["hotkey"] != hotkey), None)
    if near:
        return {"near_copy_of": near["id"], "notes": [Reason(
            rule="copy:near", message=f"the same architecture and training loop as the earlier submission "
            f"{near['id']} of another hotkey, differing only in numeric literals (hyperparameters); shown for "
            "reference, it earns weight as usual")]}
    return {}
