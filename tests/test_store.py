"""The DuckDB store on a real database file: lifecycle, duplicates, the lease-guarded queue, export, locking."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import textwrap
import zipfile

import duckdb
import pytest

from conftest import scored_report
from prism_ray.config import AuditSettings, ScoringSettings, Settings
from prism_ray.errors import Reason
from prism_ray.evaluation.pipeline import STAGES_BY_NAME, Job, StageContext, evaluate, run_stage
from prism_ray.gate.hard_gate import CachedVerdict, GateAudit
from prism_ray.intake.bundle import Bundle, check_contract, load_bundle
from prism_ray.intake.fingerprint import code_fingerprints
from prism_ray.ranking.leaderboard import epoch_of, leaderboard, weights
from prism_ray.store import TABLES, Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make_bundle(tag: str, line_ending: str = "\n") -> Bundle:
    architecture = f"# {tag}{line_ending}def build_model(ctx):{line_ending}    return None{line_ending}"
    return check_contract({"architecture.py": architecture.encode(),
                           "training.py": b"def train(ctx):\n    pass\n"})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    with Store(tmp_path / "prism.duckdb", clock=clock) as opened:
        yield opened


def kinds(store: Store, submission_id: str) -> list[str]:
    return [event.kind for event in store.events(submission_id)]


def test_full_lifecycle_writes_every_transition(store, clock):
    record = store.create_submission("hk1", "model.zip", make_bundle("a"), metadata={"ip": "127.0.0.1"})
    assert (record.status, record.stage, record.attempt, record.reused) == ("pending", "queued", 0, False)
    assert record.id.startswith("sub_") and record.metadata == {"ip": "127.0.0.1"} and record.name == "architecture"
    assert store.bundle_zip(record.bundle_sha256) == make_bundle("a").to_zip()

    [claimed] = store.claim_next("sched", lease_seconds=60)
    assert (claimed.id, claimed.status, claimed.attempt, claimed.lease_owner) == (record.id, "running", 1, "sched")
    assert claimed.lease_expires_at == clock.now + 60
    assert store.set_stage(record.id, "train", node="gpu-node-1", owner="sched")
    clock.now += 10
    assert store.renew_lease(record.id, "sched", 60, progress_bytes=1000, progress_bpb=2.5, tokens_per_second=99.0)

    curve = [{"bytes": 500, "bpb": 3.0}, {"bytes": 1000, "bpb": 2.0}]
    report = scored_report(1.25, 0.44, curve)
    assert store.complete(record.id, "sched", report)

    done = store.get_submission(record.id)
    assert (done.status, done.stage, done.lease_owner, done.finished_at) == ("completed", "score", None, clock.now)
    assert kinds(store, record.id) == ["submitted", "claimed", "stage", "completed"]
    assert [event.seq for event in store.events(record.id)] == [1, 2, 3, 4]
    [run] = store.runs(record.id)
    assert (run.status, run.node, run.progress_bytes, run.report) == ("completed", "gpu-node-1", 1000, report)
    assert [point.model_dump() for point in store.curve(record.id)] == curve
    [row] = store.scored_rows()
    assert (row.submission_id, row.hotkey, row.bpb, row.final_score) == (record.id, "hk1", 1.25, 0.44)
    assert (row.status, row.submitted_at) == ("completed", record.created_at)
    assert store.detail(record.id).runs == [run] and store.detail("sub_missing") is None
    assert store.stats()["by_status"]["completed"] == 1
    assert not store.complete(record.id, "sched", report)  # scored once, never twice


def test_duplicates_earliest_wins_and_same_hotkey_gets_its_submission_back(store):
    first = store.create_submission("alice", "a.zip", make_bundle("x"))
    copied = make_bundle("x", line_ending="\r\n")  # different bytes, same normalised files
    assert copied.sha256 != first.bundle_sha256 and copied.fingerprint == first.fingerprint

    duplicate = store.create_submission("bob", "b.zip", copied)
    assert (duplicate.status, duplicate.duplicate_of) == ("duplicate", first.id)
    assert duplicate.reasons[0].rule == "duplicate" and first.id in duplicate.reasons[0].message
    assert kinds(store, duplicate.id) == ["duplicate"]

    again = store.create_submission("alice", "renamed.zip", copied)
    assert (again.id, again.reused, again.filename) == (first.id, True, "a.zip")
    assert store.create_submission("bob", "b2.zip", copied).id == duplicate.id
    assert store.create_submission("carol", "c.zip", copied).duplicate_of == first.id
    assert store.stats()["total"] == 3
    assert [claimed.id for claimed in store.claim_next("sched", 60, limit=10)] == [first.id]


def test_claim_respects_limit_and_order_and_never_hands_a_row_out_twice(store):
    ids = [store.create_submission(f"hk{i}", "m.zip", make_bundle(str(i))).id for i in range(5)]
    first = store.claim_next("owner-a", 60, limit=2)
    second = store.claim_next("owner-b", 60, limit=10)
    assert [record.id for record in first] == ids[:2] and [record.id for record in second] == ids[2:]
    assert {record.lease_owner for record in second} == {"owner-b"}
    assert store.claim_next("owner-c", 60, limit=10) == []
    assert store.stats() | {"by_status": None} == {"by_status": None, "queue_depth": 0, "in_flight": 5, "total": 5}


def test_an_expired_lease_is_requeued_uncharged_then_held_for_the_operator(tmp_path, clock):
    """A lapsed lease means prism-ray's own heartbeat stopped (a node hung or cut off): the attempt is given back
    uncharged, `cap` times, then the submission waits for the operator (docs/operator.md, "Liveness and failures")."""
    with Store(tmp_path / "leases.duckdb", clock=clock) as store:
        record = store.create_submission("hk", "m.zip", make_bundle("a"))
        store.claim_next("sched.1", 30)
        assert store.requeue_expired(cap=1) == []  # not expired yet
        assert store.requeue_expired(now=clock.now + 31, cap=1) == [record.id]

        requeued = store.get_submission(record.id)
        assert (requeued.status, requeued.attempt, requeued.lease_owner) == ("pending", 0, None)
        assert requeued.reasons[0].rule == "infra:lease_expired" and "not charged" in requeued.reasons[0].message
        assert store.events(record.id)[-1].kind == "infra_requeued"
        assert store.runs(record.id) == []  # the abandoned attempt's run row goes with its claim
        [again] = store.claim_next("sched.2", 30)
        assert again.attempt == 1
        clock.now += 31
        assert store.requeue_expired(cap=1) == [record.id]
        held = store.get_submission(record.id)
        assert (held.status, held.attempt) == ("held", 0)
        assert [reason.rule for reason in held.reasons] == ["infra:held_for_operator", "infra:lease_expired"]
        assert kinds(store, record.id) == ["submitted", "claimed", "infra_requeued", "claimed", "held"]


def test_attempts_exhausted_fails_with_infra_reason(tmp_path, clock):
    with Store(tmp_path / "capped.duckdb", max_attempts=2, clock=clock) as store:
        record = store.create_submission("hk", "m.zip", make_bundle("a"))
        crashed = Reason(rule="infra:worker_crashed", message="the worker died")
        for attempt in (1, 2):
            store.claim_next("sched", 30)
            assert store.requeue(record.id, crashed, owner="sched", attempt=attempt)
        failed = store.get_submission(record.id)
        assert (failed.status, failed.attempt) == ("failed", 2)
        assert [reason.rule for reason in failed.reasons] == ["infra:attempts_exhausted", "infra:worker_crashed"]
        assert kinds(store, record.id) == ["submitted", "claimed", "requeued", "claimed", "failed"]
        assert store.claim_next("sched", 30) == []


def test_stale_owner_cannot_complete_after_requeue(store, clock):
    """An uncharged requeue gives the attempt's number back, so the scheduler leases each claim under a new owner:
    the abandoned attempt ("old", 1) can neither renew nor complete the new one ("new", 1)."""
    record = store.create_submission("hk", "m.zip", make_bundle("a"))
    store.claim_next("old", 30)
    clock.now += 31
    store.requeue_expired()
    [again] = store.claim_next("new", 30)
    assert again.attempt == 1
    report = scored_report(1.0, 0.5, [{"bytes": 1, "bpb": 1.0}])
    assert not store.renew_lease(record.id, "old", 30, attempt=1)
    assert not store.complete(record.id, "old", report, attempt=1)
    assert store.complete(record.id, "new", report, attempt=1)
    assert len(store.scored_rows()) == 1 and len(store.curve(record.id)) == 1


def test_recover_requeues_running_rows_the_scheduler_does_not_know(store):
    live, orphan = (store.create_submission(f"hk{i}", "m.zip", make_bundle(str(i))).id for i in range(2))
    store.claim_next("sched", 600, limit=2)
    assert store.recover([live]) == [orphan]
    assert store.get_submission(live).status == "running"
    assert store.get_submission(orphan).reasons[0].rule == "infra:orphaned"


def test_fail_hold_release_reject_and_guards(store):
    a, b, c = (store.create_submission(f"hk{i}", "m.zip", make_bundle(str(i))).id for i in range(3))
    store.claim_next("sched", 60, limit=3)
    gate_reject = [Reason(rule="gate:objective", message="trains on the labels", file="training.py", line=3)]
    assert store.fail(a, gate_reject, "gate", status="rejected", owner="sched")
    assert store.get_submission(a).reasons == gate_reject and store.runs(a)[0].status == "rejected"
    assert not store.fail(a, gate_reject, "gate")  # terminal stays terminal

    assert store.hold(b, [Reason(rule="gate:unavailable", message="no verdict")], stage="gate")
    assert store.get_submission(b).status == "held" and not store.complete(b, "sched", scored_report(1.0))
    assert store.release(b) and store.get_submission(b).status == "pending"

    assert store.fail(c, [Reason(rule="infra:node_lost", message="node died")], "train", terminal=False)
    assert store.get_submission(c).status == "pending"
    assert store.requeue(c, Reason(rule="infra:x", message="x")) is False  # only running rows are requeued

    rejected = store.reject_submission("hk9", "bad.zip", [Reason(rule="intake:not_a_zip", message="not a zip")])
    assert (rejected.status, rejected.bundle_sha256, kinds(store, rejected.id)) == ("rejected", None, ["rejected"])


def test_a_check_rejection_is_stored_with_the_report_eval_prints(store, tmp_path):
    """The cluster runs each stage through pipeline.run_stage and stores the ending's report: for a submission that
    ends before training it is the report `prism-ray eval` prints, apart from the seconds."""
    bundle = check_contract({"architecture.py": b"import os\ndef build_model(ctx):\n    return None\n",
                             "training.py": b"def train(ctx):\n    pass\n"})
    settings = Settings(cache_dir=tmp_path / "cache")
    record = store.create_submission("hk", "os.zip", bundle)
    [claimed] = store.claim_next("sched", 60)
    job = Job(record.id, claimed.attempt, "sched", 0.0)
    outcome, _ = run_stage(STAGES_BY_NAME["check"], StageContext(job, settings), bundle)
    assert outcome.verdict == "rejected" and outcome.report is not None
    assert store.fail(record.id, outcome.reasons, "check", status="rejected", report=outcome.report, owner="sched")
    [run] = store.runs(record.id)
    local = evaluate(bundle, settings)
    seconds = {"timings", "wall_seconds"}
    assert (run.report.status, run.report.stage, list(run.report.timings)) == ("rejected", "check", ["check"])
    assert run.report.model_dump(exclude=seconds) == local.model_dump(exclude=seconds)
    assert list(run.report.timings) == list(local.timings)


def test_nonces_refuse_replays_until_purged(store, clock):
    def check_nonce(hotkey: str, nonce: str, ttl: float) -> bool:
        return store.check_nonces([(hotkey, nonce, ttl)])[0]

    assert check_nonce("hk", "n1", ttl=300)
    assert not check_nonce("hk", "n1", ttl=300)
    assert check_nonce("other", "n1", ttl=300)
    clock.now += 301
    assert check_nonce("hk", "n1", ttl=300)
    # a burst checked in one call: a nonce repeated inside the call is a replay too
    assert store.check_nonces([("hk", "n2", 300), ("hk", "n1", 300), ("hk", "n2", 300), ("other", "n2", 300)]) == [
        True, False, False, True]


def test_gate_verdict_cache_and_audits(store, tmp_path):
    key = "ab" * 32
    assert store.cached_verdict(key) is None
    verdict = CachedVerdict(status="rejected", reasons=[Reason(rule="gate:other", message="no")], confidence=0.9,
                            model="m", prompt_version="v1", request_sha256=key)
    store.keep_verdict(key, verdict)
    assert store.cached_verdict(key) == verdict
    store.keep_verdict(key, verdict.model_copy(update={"status": "allowed", "reasons": []}))
    assert store.cached_verdict(key).status == "allowed"

    audits = [GateAudit(model="m", prompt_version="v1", request_sha256=key, latency_s=0.5, attempt=attempt,
                        outcome=outcome, error=error) for attempt, outcome, error in
              ((1, "unavailable", "timeout"), (2, "reject", None))]
    store.record_gate_audits("sub_x", audits)
    exported = store.export_parquet(tmp_path / "export")[TABLES.index("gate_reviews")]
    rows = duckdb.sql(f"SELECT submission_id, attempt, outcome, error FROM '{exported}' ORDER BY attempt").fetchall()
    assert rows == [("sub_x", 1, "unavailable", "timeout"), ("sub_x", 2, "reject", None)]


def test_export_writes_one_readable_parquet_per_table(store, tmp_path):
    record = store.create_submission("hk", "m.zip", make_bundle("a"))
    store.claim_next("sched", 60)
    store.complete(record.id, "sched", scored_report(float("nan"), 0.5, [{"bytes": 10, "bpb": 2.0},
                                                                        {"bytes": 20, "bpb": 1.5}]))
    paths = store.export_parquet(tmp_path / "export")
    assert sorted(path.name for path in paths) == sorted(f"{table}.parquet" for table in TABLES)
    reader = duckdb.connect()
    counts = {path.stem: reader.execute(f"SELECT count(*) FROM '{path}'").fetchone()[0] for path in paths}
    assert counts["submissions"] == counts["bundles"] == counts["scores"] == counts["runs"] == 1
    assert counts["curves"] == 2 and counts["events"] == 3 and counts["schema_version"] == 1
    report = reader.execute(f"SELECT report->>'bpb' FROM '{tmp_path / 'export' / 'runs.parquet'}'").fetchone()[0]
    assert report is None  # NaN is stored as JSON null


def test_reopening_the_file_keeps_everything(tmp_path, clock):
    path = tmp_path / "durable.duckdb"
    with Store(path, clock=clock) as store:
        record = store.create_submission("hk", "m.zip", make_bundle("a"))
        store.claim_next("sched", 60)
        store.check_nonces([("hk", "n1", 300)])
    with Store(path, clock=clock) as reopened:
        assert reopened.get_submission(record.id).status == "running"
        assert kinds(reopened, record.id) == ["submitted", "claimed"]
        assert reopened.check_nonces([("hk", "n1", 300)]) == [False]
        assert reopened.create_submission("hk", "m.zip", make_bundle("a")).reused
    with duckdb.connect(str(path), read_only=True) as reader:
        assert reader.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (2,)


def test_second_process_gets_store_locked(tmp_path):
    path = tmp_path / "locked.duckdb"
    script = textwrap.dedent(f"""
        from prism_ray.store import Store, StoreLocked
        try:
            Store({str(path)!r})
        except StoreLocked as error:
            print("LOCKED", error)
    """)
    with Store(path):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("LOCKED"), result.stderr
    assert "another process" in result.stdout


def test_unclaim_hands_an_attempt_back_without_counting_it(tmp_path, clock):
    with Store(tmp_path / "capped.duckdb", max_attempts=1, clock=clock) as store:
        record = store.create_submission("hk", "m.zip", make_bundle("a"))
        store.claim_next("draining", 30)
        assert store.set_stage(record.id, "train", node="gpu-node-1", owner="draining")
        assert store.renew_lease(record.id, "draining", 30, progress_bytes=1000, attempt=1)
        assert not store.unclaim(record.id, "someone-else", 1) and not store.unclaim(record.id, "draining", 2)
        assert store.unclaim(record.id, "draining", 1)
        assert not store.unclaim(record.id, "draining", 1)  # handed back once

        back = store.get_submission(record.id)
        assert (back.status, back.stage, back.attempt, back.lease_owner) == ("pending", "queued", 0, None)
        assert store.runs(record.id) == []
        event = store.events(record.id)[-1]
        assert (event.kind, event.detail["attempt"], event.detail["interrupted"]["progress_bytes"]) == (
            "unclaimed", 1, 1000)
        # With one attempt allowed, the claim after a restart is still the first, and it can be scored.
        [again] = store.claim_next("restarted", 30)
        assert again.attempt == 1
        assert store.complete(record.id, "restarted", scored_report(1.0), attempt=1)
        assert kinds(store, record.id) == ["submitted", "claimed", "stage", "unclaimed", "claimed", "completed"]


ARCH_X = "from torch import nn\n\n\ndef build_model(ctx):\n    return nn.Embedding(ctx.vocab_size, ctx.vocab_size)\n"
ARCH_Y = ("from torch import nn\n\n\ndef build_model(ctx):\n"
          "    return nn.Sequential(nn.Embedding(ctx.vocab_size, 64), nn.Linear(64, ctx.vocab_size))\n")


def family_bundle(architecture: str, optimizer: str) -> Bundle:
    training = (f"import torch\n\n\ndef train(ctx):\n    model = ctx.build_model()\n"
                f"    opt = torch.optim.{optimizer}(model.parameters())\n"
                "    for batch in ctx.iter_train_batches(model, with_logits=True):\n        batch.loss.backward()\n"
                "        opt.step()\n        opt.zero_grad()\n")
    return check_contract({"architecture.py": architecture.encode(), "training.py": training.encode()})


def test_two_tier_weights_group_real_bundles_by_architecture_family(tmp_path, clock):
    """Two architecture families from real bundles: the winning family's first submitter gets 60%, the owner of
    its best training variant 40%, the other family nothing; the epoch is the submission's, not the scoring's."""
    two_tier = ScoringSettings(weights_mode="two_tier")
    with Store(tmp_path / "prism.duckdb", clock=clock, scoring=two_tier, audit=AuditSettings(mode="off")) as store:
        submitted = clock.now
        entries = [("alice", ARCH_X, "SGD", 0.30), ("carol", ARCH_Y, "SGD", 0.45), ("bob", ARCH_X.replace(
            "return nn", "return  nn"), "Adam", 0.50), ("dave", ARCH_Y, "AdamW", 0.20)]
        ids = {}
        for hotkey, architecture, optimizer, _ in entries:
            ids[hotkey] = store.create_submission(hotkey, f"{hotkey}.zip", family_bundle(architecture, optimizer)).id
            clock.now += 1
        store.claim_next("sched", 60, limit=4)
        clock.now += 2 * 86_400  # scored two days later: still the epoch of submission
        for hotkey, _, _, score in entries:
            assert store.complete(ids[hotkey], "sched", scored_report(1 / score - 1, score))
        rows = store.scored_rows()
        families = {row.hotkey: row.architecture_family for row in rows}
        assert families["alice"] == families["bob"] != families["carol"] == families["dave"]
        scores = store.export_parquet(tmp_path / "export")[TABLES.index("scores")]
        assert duckdb.sql(f"SELECT DISTINCT epoch FROM '{scores}'").fetchall() == [(epoch_of(submitted),)]
        assert [entry.architecture_family for entry in leaderboard(rows, epoch=epoch_of(submitted))] == [
            families["bob"], families["carol"], families["alice"], families["dave"]]
        assert weights(rows, two_tier) == pytest.approx({"alice": 0.60, "bob": 0.40})
        assert weights(rows, two_tier, epoch=epoch_of(clock.now)) == {}
        without_x = [row for row in rows if row.architecture_family != families["bob"]]
        assert weights(without_x, two_tier) == pytest.approx({"carol": 1.0})


def zip_as_miners_make_it(files: dict[str, bytes], stored: bool, comment: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as archive:
        archive.comment = comment
        for name, content in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2025, 6, 1, 12, 0, 0)), content)
    return buffer.getvalue()


def test_the_miners_original_zip_is_kept_content_addressed(store):
    files = make_bundle("orig").files
    sent = zip_as_miners_make_it(files, stored=True, comment=b"made by hand")
    bundle = load_bundle(sent)
    assert sent != bundle.to_zip()
    record = store.create_submission("alice", "a.zip", bundle, zipped=sent)
    assert store.original_zip(record.id) == sent and record.zip_sha256 == hashlib.sha256(sent).hexdigest()
    assert store.bundle_zip(record.bundle_sha256) == sent  # the files' first upload, as sent

    other = zip_as_miners_make_it(files, stored=False, comment=b"")  # the same files, zipped differently
    duplicate = store.create_submission("bob", "b.zip", load_bundle(other), zipped=other)
    assert duplicate.status == "duplicate" and store.original_zip(duplicate.id) == other
    assert store.bundle_zip(record.bundle_sha256) == sent
    rejected = store.reject_submission("carol", "c.zip", [Reason(rule="intake:not_a_zip", message="no")])
    assert store.original_zip(rejected.id) is None


V1_TABLES = """
CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at DOUBLE NOT NULL);
CREATE SEQUENCE submission_seq;
CREATE TABLE submissions (
    id VARCHAR PRIMARY KEY, seq BIGINT NOT NULL DEFAULT nextval('submission_seq'),
    hotkey VARCHAR NOT NULL, filename VARCHAR, bundle_sha256 VARCHAR, fingerprint VARCHAR, name VARCHAR,
    tokenizer VARCHAR, status VARCHAR NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'rejected',
    'failed', 'held', 'duplicate')), stage VARCHAR NOT NULL, reasons JSON NOT NULL, attempt INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL, lease_owner VARCHAR, lease_expires_at DOUBLE, metadata JSON,
    created_at DOUBLE NOT NULL, updated_at DOUBLE NOT NULL, finished_at DOUBLE, duplicate_of VARCHAR);
CREATE TABLE bundles (sha256 VARCHAR PRIMARY KEY, fingerprint VARCHAR NOT NULL, zip BLOB NOT NULL,
    size BIGINT NOT NULL, created_at DOUBLE NOT NULL);
CREATE TABLE scores (
    submission_id VARCHAR PRIMARY KEY, hotkey VARCHAR NOT NULL, bpb DOUBLE, final_score DOUBLE,
    heldout_delta DOUBLE, gap DOUBLE, penalty DOUBLE, anomaly DOUBLE, tie_break DOUBLE, architecture_family VARCHAR,
    scored_at DOUBLE NOT NULL, epoch BIGINT);
INSERT INTO schema_version VALUES (1, 1700000000);
"""


def test_a_version_1_file_is_upgraded_with_its_zips_and_families(tmp_path, clock):
    """A file as prism-ray's first schema wrote it: one scored submission, its bundle stored as a re-zip."""
    path = tmp_path / "v1.duckdb"
    bundle = family_bundle(ARCH_X, "SGD")
    with duckdb.connect(str(path)) as v1:
        v1.execute(V1_TABLES)
        v1.execute("INSERT INTO bundles VALUES (?, ?, ?, ?, 1700000000)",
                   [bundle.sha256, bundle.fingerprint, bundle.to_zip(), len(bundle.to_zip())])
        v1.execute("INSERT INTO submissions (id, hotkey, filename, bundle_sha256, fingerprint, name, tokenizer, status, "
                   "stage, reasons, attempt, max_attempts, created_at, updated_at) VALUES ('sub_old', 'alice', 'a.zip', "
                   "?, ?, 'architecture', 'gpt2', 'completed', 'score', '[]', 1, 3, 1700000000, 1700000100)",
                   [bundle.sha256, bundle.fingerprint])
        v1.execute("INSERT INTO scores (submission_id, hotkey, bpb, final_score, scored_at, epoch) "
                   "VALUES ('sub_old', 'alice', 1.5, 0.4, 1700000100, 19675)")
    with Store(path, clock=clock) as store:
        old = store.get_submission("sub_old")
        assert old.architecture_family == code_fingerprints(bundle).architecture_family and old.notes == []
        assert store.original_zip("sub_old") == bundle.to_zip() == store.bundle_zip(bundle.sha256)
        [row] = store.scored_rows()
        assert row.architecture_family == old.architecture_family
        copy = store.create_submission("bob", "b.zip", family_bundle(ARCH_X.replace("(ctx)", "(context)").replace(
            "ctx.", "context."), "SGD"))
        assert copy.copy_of == "sub_old"
    with duckdb.connect(str(path), read_only=True) as reader:
        assert reader.execute("SELECT version FROM schema_version ORDER BY version").fetchall() == [(1,), (3,)]
        assert [column[0] for column in reader.execute("DESCRIBE bundles").fetchall()] == [
            "sha256", "fingerprint", "created_at", "zip_sha256"]


def test_every_owner_of_the_store_answers_the_port_with_the_same_signatures():
    """The backend and the read model call the store through StorePort: the Store itself, LocalStore (this process)
    and ActorStore (the store actor) must each have every method of it, with the same parameters, so a renamed or
    re-typed store method fails here rather than at run time on a cluster."""
    import inspect

    from prism_ray.backend.store_backend import LocalStore
    from prism_ray.cluster.client import ActorStore
    from prism_ray.store.port import StorePort

    methods = [name for name, _ in inspect.getmembers(StorePort, inspect.isfunction) if not name.startswith("_")]
    assert {"detail", "queue_snapshot", "scored_rows", "create_submissions", "changes_since"} <= set(methods)
    def signature(function) -> inspect.Signature:  # once Ray has made an actor of Store, it adds _ray_trace_ctx
        found = inspect.signature(function)
        return found.replace(parameters=[p for p in found.parameters.values() if p.name != "_ray_trace_ctx"])

    for owner in (Store, LocalStore, ActorStore):
        for name in methods:
            assert signature(getattr(owner, name)) == signature(getattr(StorePort, name)), (owner.__name__, name)
