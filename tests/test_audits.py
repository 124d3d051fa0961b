"""Re-execution audits in the store, on a real DuckDB file: who gets audited (each epoch's top k, the two-tier
payees, a random sample), that only audited scores earn weight, how a re-run is judged (bit-identical on CPU, a
relative tolerance on CUDA), that a mismatch invalidates the score, and the audit queue's own leases and retries.
The re-runs themselves run on a real cluster in test_cluster.py."""

from __future__ import annotations

import random

import pytest

from prism_ray.config import AuditSettings, ScoringSettings
from prism_ray.errors import Reason
from prism_ray.evaluation.report import DataInfo, RunReport
from prism_ray.intake.bundle import Bundle, check_contract
from prism_ray.ranking import audit
from prism_ray.ranking.leaderboard import ScoreRow, leaderboard, weights
from prism_ray.store import Store

DATA = DataInfo(path="/data/locked", fingerprint="f" * 64, pinned=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Draws(random.Random):
    """The sample's draws, scripted: each completion takes the next number."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def make_bundle(tag: str, architecture: str | None = None) -> Bundle:
    """Distinct code per tag; bundles given the same `architecture` are one family."""
    return check_contract({"architecture.py": f"def build_model(ctx):\n    return {architecture or tag!r}\n".encode(),
                           "training.py": f"def train(ctx):\n    return {tag!r}\n".encode()})


def report(bpb: float | None, device: str = "cpu", status: str = "completed",
           reasons: list[Reason] | None = None, data: DataInfo = DATA) -> RunReport:
    return RunReport(status=status, stage="score" if status == "completed" else "train", bpb=bpb,
                     final_score=None if bpb is None else 1 / (1 + bpb), device=device, seed=1337, byte_budget=20_000,
                     data=data, reasons=reasons or [])


class Cluster:
    """Plays the scheduler against the store: submit, score, re-run."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def scored(self, hotkey: str, bpb: float, device: str = "cpu", architecture: str | None = None) -> str:
        self.clock.now += 1  # one submission a second
        record = self.store.create_submission(hotkey, f"{hotkey}.zip", make_bundle(f"{hotkey}-{bpb}", architecture))
        [claimed] = self.store.claim_next("sched", 60)
        assert claimed.id == record.id
        self.store.set_stage(record.id, "train", node="node-a", owner="sched")
        assert self.store.complete(record.id, "sched", report(bpb, device))
        return record.id

    def audited(self) -> dict[str, str]:
        return {item.submission_id: item.why for item in self.store.list_audits()}

    def rerun(self, submission_id: str, rerun: RunReport):
        [item] = self.store.list_audits(submission_id=submission_id)
        if item.status == "pending":
            assert item.id in [claimed.id for claimed in self.store.claim_audits("sched", 60, limit=10)]
        assert self.store.set_stage(item.id, "train", node="node-b", owner="sched", attempt=1)
        return self.store.finish_audit(item.id, "sched", rerun, attempt=1)

    def rows(self) -> list[ScoreRow]:
        return self.store.scored_rows()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def cluster_of(tmp_path, clock, rng: random.Random | None = None, **settings) -> Cluster:
    scoring = settings.pop("scoring", ScoringSettings())
    return Cluster(Store(tmp_path / "prism.duckdb", clock=clock, scoring=scoring, rng=rng or Draws(*[0.99] * 20),
                         audit=AuditSettings(**settings)), clock)


def test_the_top_k_of_each_epoch_are_always_audited_and_only_audited_scores_earn(tmp_path, clock):
    cluster = cluster_of(tmp_path, clock, top_k=2)
    ids = {hotkey: cluster.scored(hotkey, bpb) for hotkey, bpb in (("a", 2.0), ("b", 1.0), ("c", 3.0))}
    assert cluster.audited() == {ids["a"]: "top_k", ids["b"]: "top_k"}
    clock.now += 86_400  # the next epoch has its own top k
    ids["d"] = cluster.scored("d", 4.0)
    assert cluster.audited()[ids["d"]] == "top_k"

    rows = cluster.rows()
    assert {row.hotkey: row.audit for row in rows} == {"a": "pending", "b": "pending", "c": "unaudited",
                                                       "d": "pending"}
    assert weights(rows) == {}  # nothing audited yet: nothing earns
    assert [entry.audit for entry in leaderboard(rows)] == ["pending", "pending", "unaudited", "pending"]
    passed = cluster.rerun(ids["b"], report(1.0))
    assert (passed.status, passed.audit_bpb, passed.original_bpb, passed.node) == ("passed", 1.0, 1.0, "node-b")
    assert passed.original_node == "node-a" and passed.tolerance == 0.0
    assert weights(cluster.rows()) == {"b": 1.0}
    cluster.rerun(ids["a"], report(2.0))
    assert weights(cluster.rows()) == pytest.approx({"b": 0.6, "a": 0.4})  # 1/2 : 1/3, c never drawn


def test_a_random_sample_of_the_rest_is_audited_once_each(tmp_path, clock):
    # The top one is audited anyway and draws nothing; each of the others draws once, when it completes.
    cluster = cluster_of(tmp_path, clock, rng=Draws(0.1, 0.05, 0.0999), top_k=1, sample_rate=0.1)
    ids = [cluster.scored(f"h{n}", bpb) for n, bpb in enumerate((1.0, 2.0, 3.0, 4.0))]
    assert cluster.audited() == {ids[0]: "top_k", ids[2]: "sample", ids[3]: "sample"}
    cluster.rerun(ids[0], report(1.0))
    assert cluster.audited() == {ids[0]: "top_k", ids[2]: "sample", ids[3]: "sample"}  # no second draw


def test_two_tier_audits_the_family_owner_outside_the_top_k(tmp_path, clock):
    cluster = cluster_of(tmp_path, clock, top_k=1, scoring=ScoringSettings(weights_mode="two_tier"))
    other = cluster.scored("other", 2.0, architecture="y")
    owner = cluster.scored("owner", 3.0, architecture="x")  # never in the top 1, but first of family x
    assert cluster.audited() == {other: "top_k"}
    best = cluster.scored("best", 1.0, architecture="x")
    assert cluster.audited() == {other: "top_k", best: "top_k", owner: "two_tier"}
    for submission_id, bpb in ((best, 1.0), (owner, 3.0)):
        cluster.rerun(submission_id, report(bpb))
    assert weights(cluster.rows(), ScoringSettings(weights_mode="two_tier")) == pytest.approx({"owner": 0.6,
                                                                                                "best": 0.4})


def test_a_mismatch_on_cpu_invalidates_the_score_and_the_next_in_line_is_audited(tmp_path, clock):
    cluster = cluster_of(tmp_path, clock, top_k=1)
    cheat = cluster.scored("cheat", 0.5)
    honest = cluster.scored("honest", 1.5)
    assert set(cluster.audited()) == {cheat}
    mismatch = cluster.rerun(cheat, report(0.5 + 1e-12))  # one ulp-ish off: on CPU nothing is tolerated
    assert mismatch.status == "mismatch" and mismatch.audit_bpb == 0.5 + 1e-12
    record = cluster.store.get_submission(cheat)
    assert (record.status, record.stage) == ("failed", "audit")
    [reason] = record.reasons
    assert reason.rule == "audit:mismatch" and "0.5" in reason.message and repr(0.5 + 1e-12) in reason.message
    assert cluster.store.events(cheat)[-1].kind == "invalidated"
    assert [row.submission_id for row in cluster.rows()] == [honest]  # off the board, no weight
    assert set(cluster.audited()) == {cheat, honest}  # the next in line entered the top k
    cluster.rerun(honest, report(1.5))
    assert weights(cluster.rows()) == {"honest": 1.0}


@pytest.mark.parametrize(("relative", "status"), [(5e-5, "passed"), (2e-4, "mismatch")])
def test_cuda_runs_are_judged_with_a_relative_tolerance(tmp_path, clock, relative, status):
    cluster = cluster_of(tmp_path, clock, top_k=1)
    submission = cluster.scored("gpu", 2.0, device="cuda:0")
    judged = cluster.rerun(submission, report(2.0 * (1 + relative), device="cuda:0"))
    assert (judged.status, judged.tolerance) == (status, 1e-4)


def test_a_rerun_that_fails_on_the_codes_account_is_a_mismatch_one_the_system_stopped_is_not(tmp_path, clock):
    cluster = cluster_of(tmp_path, clock, top_k=2)
    crashed, unlucky = cluster.scored("crashed", 1.0), cluster.scored("unlucky", 2.0)
    crash = Reason(rule="run:crash", message="train(ctx) raised ValueError", file="training.py", line=7)
    judged = cluster.rerun(crashed, report(None, status="failed", reasons=[crash]))
    assert judged.status == "mismatch" and cluster.store.get_submission(crashed).status == "failed"
    assert "run:crash" in judged.reasons[0].message and judged.reasons[0].line == 7
    missing = Reason(rule="data:missing", message="no dataset at /data/locked")
    judged = cluster.rerun(unlucky, report(None, status="failed", reasons=[missing]))
    assert judged.status == "failed" and judged.reasons[0].rule == "audit:not_run"
    assert cluster.store.get_submission(unlucky).status == "completed"  # no verdict on the code, no weight either
    assert [(row.hotkey, row.audit) for row in cluster.rows()] == [("unlucky", "failed")] and weights(cluster.rows()) == {}


def test_audits_are_queue_items_with_leases_and_capped_retries(tmp_path, clock):
    cluster = cluster_of(tmp_path, clock, top_k=1, max_attempts=2)
    submission = cluster.scored("a", 1.0)
    [item] = cluster.store.list_audits()
    assert (item.status, item.stage, item.attempt, item.why) == ("pending", "queued", 0, "top_k")
    assert cluster.store.audit_stats()["queue_depth"] == 1 and cluster.store.stats()["queue_depth"] == 0
    for attempt in (1, 2):
        [claimed] = cluster.store.claim_audits("sched", 30)
        assert (claimed.id, claimed.attempt, claimed.lease_owner) == (item.id, attempt, "sched")
        assert cluster.store.renew_lease(item.id, "sched", 30, progress_bytes=500, attempt=attempt)
        clock.now += 31
        assert cluster.store.requeue_expired() == [item.id]
    failed = cluster.store.get_audit(item.id)
    assert failed.status == "failed" and [r.rule for r in failed.reasons] == ["infra:attempts_exhausted",
                                                                              "infra:lease_expired"]
    assert [run.status for run in cluster.store.runs(item.id)] == ["requeued", "failed"]
    assert [event.kind for event in cluster.store.events(item.id)] == ["claimed", "requeued", "claimed", "failed"]
    assert cluster.store.runs(item.id)[0].progress_bytes == 500
    assert cluster.store.get_submission(submission).status == "completed" and weights(cluster.rows()) == {}
    assert not cluster.store.finish_audit(item.id, "sched", report(1.0), attempt=2)  # a late result changes nothing


def test_with_audits_off_nothing_is_queued_and_every_score_earns(tmp_path, clock):
    cluster = cluster_of(tmp_path, clock, mode="off")
    cluster.scored("a", 1.0)
    assert cluster.store.list_audits() == [] and cluster.store.claim_audits("sched", 60) == []
    assert [row.audit for row in cluster.rows()] == [None] and weights(cluster.rows()) == {"a": 1.0}


def test_judge_is_exact_on_cpu_and_relative_on_cuda():
    settings = AuditSettings()
    first = audit.FirstRun(bpb=1.25, device="cpu", data=DATA.fingerprint)
    assert audit.judge(first, report(1.25), settings).status == "passed"
    assert audit.judge(first, report(1.25 + 2e-16), settings).status == "mismatch"
    assert audit.judge(first, report(1.25 * (1 + 9e-5), device="cuda"), settings).status == "passed"
    moved = DataInfo(path="/data/locked", fingerprint="e" * 64, pinned=True)
    assert audit.judge(first, report(1.25, data=moved), settings).reasons[0].rule == "audit:data_changed"


def test_a_draining_scheduler_hands_an_audit_back_uncounted(tmp_path, clock):
    cluster = cluster_of(tmp_path, clock, top_k=1, max_attempts=1)
    cluster.scored("a", 1.0)
    [claimed] = cluster.store.claim_audits("draining", 30)
    assert cluster.store.unclaim(claimed.id, "draining", 1)
    back = cluster.store.get_audit(claimed.id)
    assert (back.status, back.attempt, cluster.store.runs(claimed.id)) == ("pending", 0, [])
    [again] = cluster.store.claim_audits("restarted", 30)
    assert again.attempt == 1 and cluster.store.finish_audit(again.id, "restarted", report(1.0)).status == "passed"
