"""What the store answers without changing anything: submissions, timelines, runs, curves, the scored rows the
leaderboard and weights are computed from, audits, the kept zips, counts and a Parquet snapshot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prism_ray.evaluation.scoring import CurvePoint, ScoreFields, bits_per_byte
from prism_ray.ranking.leaderboard import ScoreRow
from prism_ray.store.db import Db
from prism_ray.store.records import (
    AuditRecord,
    QueueSnapshot,
    RunRecord,
    SubmissionDetail,
    SubmissionRecord,
    TimelineEvent,
)
from prism_ray.store.schema import AUDIT_STATUSES, REPLICA_STATUSES, SUBMISSION_STATUSES, TABLES

# The audit state of a score, as leaderboard.ScoreRow.audit spells it (a mismatch has left `completed` already).
_AUDIT_STATE = ("CASE WHEN a.id IS NULL THEN 'unaudited' WHEN a.status IN ('pending', 'running') THEN 'pending' "
                "WHEN a.status = 'passed' THEN 'passed' ELSE 'failed' END")
# The replicas of a score, as leaderboard.ScoreRow.replicas spells it.
_REPLICA_STATE = ("CASE WHEN NOT EXISTS (SELECT 1 FROM replicas p WHERE p.submission_id = s.id) THEN 'none' "
                  "WHEN EXISTS (SELECT 1 FROM replicas p WHERE p.submission_id = s.id AND p.status IN "
                  "('pending', 'running')) THEN 'pending' ELSE 'done' END")
# Every completed run of a completed submission: the scored run first, then its replicas in order.
_SEED_RUNS = """
SELECT r.submission_id, r.seed, r.bpb, r.span, r.nats, r.bytes, r.train_seconds FROM seed_runs r
JOIN submissions s ON s.id = r.submission_id LEFT JOIN replicas p ON p.id = r.replica_id
WHERE s.status = 'completed' ORDER BY r.submission_id, p.replica NULLS FIRST
"""


def submission_records(db: Db, ids: Sequence[str]) -> dict[str, SubmissionRecord]:
    """Several submissions in one query, by id."""
    rows = db.rows("SELECT * FROM submissions WHERE id IN (SELECT unnest(?::VARCHAR[]))", [list(ids)])
    return {row["id"]: SubmissionRecord(**row) for row in rows}


class Reads:
    def __init__(self, db: Db, audits_kept: bool, replicas_kept: bool) -> None:
        self.db = db
        self.audits_kept = audits_kept
        self.replicas_kept = replicas_kept

    def submissions(self, status: str | None, hotkey: str | None, limit: int) -> list[SubmissionRecord]:
        """Newest first."""
        rows = self.db.rows("SELECT * FROM submissions WHERE (?::VARCHAR IS NULL OR status = ?) AND "
                            "(?::VARCHAR IS NULL OR hotkey = ?) ORDER BY seq DESC LIMIT ?",
                            [status, status, hotkey, hotkey, limit])
        return [SubmissionRecord(**row) for row in rows]

    def audits(self, status: str | None, submission_id: str | None, limit: int) -> list[AuditRecord]:
        """Oldest first (the order they are claimed in)."""
        rows = self.db.rows("SELECT * FROM audits WHERE (?::VARCHAR IS NULL OR status = ?) AND "
                            "(?::VARCHAR IS NULL OR submission_id = ?) ORDER BY seq LIMIT ?",
                            [status, status, submission_id, submission_id, limit])
        return [AuditRecord(**row) for row in rows]

    def events(self, item_id: str) -> list[TimelineEvent]:
        return [TimelineEvent(**row) for row in self.db.rows(
            "SELECT seq, created_at, kind, stage, detail FROM events WHERE submission_id = ? ORDER BY seq", [item_id])]

    def runs(self, item_id: str) -> list[RunRecord]:
        return [RunRecord(**row) for row in self.db.rows("SELECT * FROM runs WHERE submission_id = ? ORDER BY attempt",
                                                         [item_id])]

    def detail(self, submission_id: str) -> SubmissionDetail | None:
        """A submission with its attempts and its timeline, from one transaction."""
        with self.db.transaction():
            record = submission_records(self.db, [submission_id]).get(submission_id)
            if record is None:
                return None
            return SubmissionDetail(record=record, runs=self.runs(submission_id), events=self.events(submission_id))

    def queue_snapshot(self, limit: int, recent: int) -> QueueSnapshot:
        """Up to `limit` running (oldest first) and pending submissions (in line), the current attempt of each running
        one, and the claim-to-finish seconds of the latest `recent` completed runs, from one transaction."""
        with self.db.transaction():
            running = sorted(self.submissions("running", None, limit), key=lambda record: record.seq)
            pending = sorted(self.submissions("pending", None, limit), key=lambda record: record.seq)
            current = {row["submission_id"]: RunRecord(**row) for row in self.db.rows(
                "SELECT r.* FROM runs r JOIN submissions s ON s.id = r.submission_id AND s.attempt = r.attempt "
                "WHERE list_contains(?::VARCHAR[], s.id)", [[record.id for record in running]])}
            return QueueSnapshot(running=running, current_runs=current, pending=pending,
                                 recent_run_seconds=self.recent_run_seconds(recent))

    def curve(self, submission_id: str) -> list[CurvePoint]:
        """The scored attempt's learning curve: cumulative target bytes vs. running bpb."""
        return [CurvePoint(**row) for row in self.db.rows(
            "SELECT bytes, bpb FROM curves WHERE submission_id = ? AND attempt = (SELECT max(attempt) FROM curves "
            "WHERE submission_id = ?) ORDER BY bytes", [submission_id, submission_id])]

    def scored_rows(self) -> list[ScoreRow]:
        """Completed submissions with their scores, best first; ties → earliest submission, then id
        (submitted_at = created_at, epoch seconds); `audit` is null when no audits
        are kept, `replicas` when no replicas are. Each row carries its seed runs: `seed_bpbs` (the scored run
        first), `chunk_bpb` and `chunk_span` (the runs whose chunks cover the scored run's span), `gpu_seconds`
        (training seconds of all its runs), `tokens_per_second` and `model_params` of the scored run."""
        audit_state = _AUDIT_STATE if self.audits_kept else "NULL"
        replica_state = _REPLICA_STATE if self.replicas_kept else "NULL"
        rows = self.db.rows(
            "SELECT s.id AS submission_id, s.hotkey, s.status, s.name, s.filename, s.tokenizer, s.bundle_sha256, "
            "s.seq, s.created_at AS submitted_at, s.finished_at, s.architecture_family, s.copy_of, s.near_copy_of, "
            f"{', '.join(f'sc.{name}' for name in ScoreFields.model_fields)}, sc.scored_at, "
            f"sc.epoch, {audit_state} AS audit, a.id AS audit_id, {replica_state} AS replicas, "
            "(r.report->>'tokens_per_second')::DOUBLE AS tokens_per_second, "
            "(r.report->>'model_params')::BIGINT AS model_params, (r.report->>'tokens_scored')::BIGINT AS tokens "
            "FROM submissions s JOIN scores sc ON sc.submission_id = s.id LEFT JOIN audits a ON a.submission_id = s.id "
            "LEFT JOIN runs r ON r.submission_id = s.id AND r.attempt = s.attempt "
            "WHERE s.status = 'completed' ORDER BY sc.final_score DESC NULLS LAST, s.seq, s.id")
        runs: dict[str, list[dict[str, Any]]] = {}
        for run in self.db.rows(_SEED_RUNS):
            runs.setdefault(run.pop("submission_id"), []).append(run)
        return [ScoreRow(**row, **_seed_runs(runs.get(row["submission_id"], []))) for row in rows]

    def original_zip(self, submission_id: str) -> bytes | None:
        row = self.db.execute("SELECT z.zip FROM submissions s JOIN zips z ON z.sha256 = s.zip_sha256 "
                              "WHERE s.id = ?", [submission_id]).fetchone()
        return bytes(row[0]) if row else None

    def bundle_zip(self, sha256: str) -> bytes | None:
        row = self.db.execute("SELECT z.zip FROM bundles b JOIN zips z ON z.sha256 = b.zip_sha256 WHERE b.sha256 = ?",
                              [sha256]).fetchone()
        return bytes(row[0]) if row else None

    def stats(self) -> dict[str, Any]:
        counts = dict.fromkeys(SUBMISSION_STATUSES, 0)
        counts.update(self.db.execute("SELECT status, count(*) FROM submissions GROUP BY status").fetchall())
        return {"by_status": counts, "queue_depth": counts["pending"], "in_flight": counts["running"],
                "total": sum(counts.values())}

    def changes_since(self, since: float | None) -> tuple[float | None, list[tuple[str, str]]]:
        """The newest `updated_at`, and (submission id, its status) of each submission — or audited submission —
        updated after `since` (none when since is None): how a reader's cache (read_model.py) learns what changed.
        Every write a reader can see (a status, a stage, progress, a score, an audit's state) stamps updated_at."""
        newest = self.db.execute("SELECT greatest((SELECT max(updated_at) FROM submissions), "
                                 "(SELECT max(updated_at) FROM audits), (SELECT max(updated_at) FROM replicas))"
                                 ).fetchone()[0]
        if since is None or newest is None or newest <= since:
            return newest, []
        rows = self.db.execute(
            "SELECT id, status FROM submissions WHERE updated_at > ? UNION "
            "SELECT s.id, s.status FROM audits a JOIN submissions s ON s.id = a.submission_id WHERE a.updated_at > ? "
            "UNION SELECT s.id, s.status FROM replicas p JOIN submissions s ON s.id = p.submission_id "
            "WHERE p.updated_at > ?", [since, since, since]).fetchall()
        return newest, [(row[0], row[1]) for row in rows]

    def rejection_counts(self, hotkey: str, since: float) -> tuple[int, int]:
        """(rejected submissions created since `since` in all, of them this hotkey's): the bound on stored
        rejections (docs/api.md)."""
        row = self.db.execute("SELECT count(*), count(*) FILTER (WHERE hotkey = ?) FROM submissions "
                              "WHERE status = 'rejected' AND created_at >= ?", [hotkey, since]).fetchone()
        return int(row[0]), int(row[1])

    def recent_run_seconds(self, limit: int) -> list[float]:
        """Seconds from claim to finish of the latest completed runs, newest first: the queue's ETA basis."""
        rows = self.db.execute("SELECT finished_at - started_at FROM runs WHERE status = 'completed' "
                               "ORDER BY finished_at DESC LIMIT ?", [limit]).fetchall()
        return [row[0] for row in rows]

    def audit_stats(self) -> dict[str, Any]:
        counts = dict.fromkeys(AUDIT_STATUSES, 0)
        counts.update(self.db.execute("SELECT status, count(*) FROM audits GROUP BY status").fetchall())
        return {"by_status": counts, "queue_depth": counts["pending"], "in_flight": counts["running"],
                "total": sum(counts.values())}

    def replica_stats(self) -> dict[str, Any]:
        counts = dict.fromkeys(REPLICA_STATUSES, 0)
        counts.update(self.db.execute("SELECT status, count(*) FROM replicas GROUP BY status").fetchall())
        return {"by_status": counts, "queue_depth": counts["pending"], "in_flight": counts["running"],
                "total": sum(counts.values())}

    def export_parquet(self, out_dir: Path | str, open_epoch: int) -> list[Path]:
        """Every table to `<out_dir>/<table>.parquet`, from one consistent snapshot; the seeds and seed secrets of
        the epoch still open (`open_epoch` and later) are left out."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{table}.parquet" for table in TABLES]
        with self.db.transaction() as con:
            for table, path in zip(TABLES, paths, strict=True):
                quoted = str(path).replace("'", "''")
                source = _SECRET_TABLES[table].format(open=int(open_epoch)) if table in _SECRET_TABLES else table
                con.execute(f"COPY {source} TO '{quoted}' (FORMAT parquet)")
        return paths


# What an export may show of a table that holds secrets: nothing of an open epoch (docs/scoring.md, "Seed replicas").
_SECRET_TABLES = {
    "epoch_secrets": "(SELECT * FROM epoch_secrets WHERE epoch < {open})",
    "replicas": "(SELECT * REPLACE (CASE WHEN epoch < {open} THEN seed END AS seed) FROM replicas)",
    "runs": "(SELECT r.* REPLACE (CASE WHEN p.epoch >= {open} AND r.report IS NOT NULL "
            "THEN json_merge_patch(r.report, '{{\"seed\": null}}') ELSE r.report END AS report) "
            "FROM runs r LEFT JOIN replicas p ON p.id = r.submission_id)",
    "seed_runs": "(SELECT r.* REPLACE (CASE WHEN p.epoch IS NULL OR p.epoch < {open} THEN r.seed END AS seed) "
                 "FROM seed_runs r LEFT JOIN replicas p ON p.id = r.replica_id)",
}


def _seed_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A scored row's seed runs: bpb per seed, chunk bpb of the runs that cover the scored run's span, GPU time."""
    span = runs[0]["span"] if runs else None
    same = [run for run in runs if span is not None and run["span"] == span and run["nats"]]
    return {"seed_bpbs": [run["bpb"] for run in runs if run["bpb"] is not None],
            "gpu_seconds": math.fsum(run["train_seconds"] or 0.0 for run in runs) or None,
            "chunk_span": span if same else None,
            "chunk_bpb": [[bits_per_byte(nats, size) for nats, size in zip(run["nats"], run["bytes"], strict=True)]
                          for run in same]}
