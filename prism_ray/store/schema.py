"""The store's tables (docs/store.md describes every column) and the upgrades of files an older prism-ray wrote."""

from __future__ import annotations

import duckdb

from prism_ray.config import IntakeLimits
from prism_ray.errors import BundleError
from prism_ray.evaluation.scoring import ScoreFields
from prism_ray.intake.bundle import load_bundle
from prism_ray.intake.fingerprint import code_fingerprints
from prism_ray.store.db import Db, StoreError

SCHEMA_VERSION = 3

SUBMISSION_STATUSES = ("pending", "running", "completed", "rejected", "failed", "held", "duplicate")
SUBMISSION_TERMINAL = ("completed", "rejected", "failed", "duplicate")
AUDIT_STATUSES = ("pending", "running", "passed", "mismatch", "failed")
AUDIT_TERMINAL = ("passed", "mismatch", "failed")
REPLICA_STATUSES = ("pending", "running", "completed", "failed")
REPLICA_TERMINAL = ("completed", "failed")
TABLES = ("schema_version", "submissions", "zips", "bundles", "runs", "scores", "curves", "behaviours", "audits",
          "seed_runs", "replicas", "epoch_secrets", "gate_reviews", "gate_verdicts", "nonces", "events")

# Added in version 2: each submission's code fingerprints, copy links and original zip.
_V2_SUBMISSION_COLUMNS = (("architecture_family", "VARCHAR"), ("training_fingerprint", "VARCHAR"),
                          ("canonical_fingerprint", "VARCHAR"), ("copy_of", "VARCHAR"), ("near_copy_of", "VARCHAR"),
                          ("notes", "JSON DEFAULT '[]'"), ("zip_sha256", "VARCHAR"))


# The scores row's columns: one DOUBLE per field of the one definition (scoring.ScoreFields), in its order.
_SCORE_COLUMNS = ", ".join(f"{name} DOUBLE" for name in ScoreFields.model_fields)


def _checked(statuses: tuple[str, ...]) -> str:
    return f"CHECK (status IN ({', '.join(repr(status) for status in statuses)}))"


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at DOUBLE NOT NULL);
CREATE SEQUENCE IF NOT EXISTS submission_seq;
CREATE TABLE IF NOT EXISTS submissions (
    id VARCHAR PRIMARY KEY, seq BIGINT NOT NULL DEFAULT nextval('submission_seq'),
    hotkey VARCHAR NOT NULL, filename VARCHAR, bundle_sha256 VARCHAR, fingerprint VARCHAR, name VARCHAR,
    tokenizer VARCHAR, status VARCHAR NOT NULL {_checked(SUBMISSION_STATUSES)}, stage VARCHAR NOT NULL,
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
    submission_id VARCHAR PRIMARY KEY, hotkey VARCHAR NOT NULL, {_SCORE_COLUMNS},
    architecture_family VARCHAR, scored_at DOUBLE NOT NULL, epoch BIGINT);
CREATE TABLE IF NOT EXISTS curves (submission_id VARCHAR NOT NULL, attempt INTEGER NOT NULL, bytes BIGINT NOT NULL,
    bpb DOUBLE);
CREATE TABLE IF NOT EXISTS behaviours (
    submission_id VARCHAR PRIMARY KEY, key VARCHAR NOT NULL, head_sha256 VARCHAR NOT NULL, head DOUBLE[] NOT NULL,
    head_sum DOUBLE NOT NULL, device VARCHAR NOT NULL, original VARCHAR NOT NULL, copy_of VARCHAR,
    created_at DOUBLE NOT NULL);
CREATE INDEX IF NOT EXISTS behaviours_by_key ON behaviours (key);
CREATE SEQUENCE IF NOT EXISTS audit_seq;
CREATE TABLE IF NOT EXISTS audits (
    id VARCHAR PRIMARY KEY, seq BIGINT NOT NULL DEFAULT nextval('audit_seq'), submission_id VARCHAR NOT NULL UNIQUE,
    hotkey VARCHAR NOT NULL, why VARCHAR NOT NULL, status VARCHAR NOT NULL {_checked(AUDIT_STATUSES)},
    stage VARCHAR NOT NULL, reasons JSON NOT NULL, attempt INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
    lease_owner VARCHAR, lease_expires_at DOUBLE, original_bpb DOUBLE, original_node VARCHAR, original_device VARCHAR,
    original_data VARCHAR, seed BIGINT, byte_budget BIGINT, audit_bpb DOUBLE, tolerance DOUBLE, node VARCHAR,
    created_at DOUBLE NOT NULL, updated_at DOUBLE NOT NULL, finished_at DOUBLE);
CREATE TABLE IF NOT EXISTS seed_runs (
    submission_id VARCHAR NOT NULL, replica_id VARCHAR, seed BIGINT, bpb DOUBLE, span BIGINT, nats DOUBLE[],
    bytes BIGINT[], device VARCHAR, train_seconds DOUBLE, created_at DOUBLE NOT NULL);
CREATE SEQUENCE IF NOT EXISTS replica_seq;
CREATE TABLE IF NOT EXISTS replicas (
    id VARCHAR PRIMARY KEY, seq BIGINT NOT NULL DEFAULT nextval('replica_seq'), submission_id VARCHAR NOT NULL,
    hotkey VARCHAR NOT NULL, replica INTEGER NOT NULL, epoch BIGINT NOT NULL, why VARCHAR NOT NULL,
    status VARCHAR NOT NULL {_checked(REPLICA_STATUSES)}, stage VARCHAR NOT NULL, reasons JSON NOT NULL,
    attempt INTEGER NOT NULL, max_attempts INTEGER NOT NULL, lease_owner VARCHAR, lease_expires_at DOUBLE,
    seed BIGINT NOT NULL, byte_budget BIGINT, bpb DOUBLE, node VARCHAR, created_at DOUBLE NOT NULL,
    updated_at DOUBLE NOT NULL, finished_at DOUBLE, UNIQUE (submission_id, replica));
CREATE TABLE IF NOT EXISTS epoch_secrets (epoch BIGINT PRIMARY KEY, secret VARCHAR NOT NULL,
    created_at DOUBLE NOT NULL);
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


def create_or_upgrade(db: Db) -> None:
    """Create the tables of a fresh file, or bring an older file up to this version; refuse a newer one."""
    with db.transaction() as con:
        con.execute(_SCHEMA)
        version = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(f"{db.path} has schema version {version}; this prism-ray knows {SCHEMA_VERSION}")
        if version == 1:
            _upgrade_to_v2(con)
        # Version 2 → 3 adds tables only (seed_runs, replicas, epoch_secrets), created above.
        if version != SCHEMA_VERSION:
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, db.clock()])


def _upgrade_to_v2(con: duckdb.DuckDBPyConnection) -> None:
    """Version 1 → 2: code fingerprints and copy links on submissions; the zips in a content-addressed table (a
    version-1 file only has its deterministic re-zips, which become the kept zips); audits (a new table)."""
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
