"""Operator faults are never the miner's: the real train stage on a real full disk (a small tmpfs) and on a
read-only cache raises what `operator_fault` types as `infra:disk_full` / `infra:unwritable`; the store requeues
such an attempt without charging it up to the cap, then holds the submission for the operator, who releases it;
intake answers 503 `infra:disk_full` while the disk is below its floor and stores nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from api_helpers import bundle_zip, new_allowlist, serve, server_settings
from prism_ray.cluster.faults import RULES, operator_fault
from prism_ray.config import ClusterSettings, Settings
from prism_ray.errors import Reason
from prism_ray.evaluation import run
from prism_ray.intake.bundle import load_bundle
from prism_ray.store import Store
from serve_app import StoreBackend, create_app
from small_fs import small_filesystem

BUNDLE = load_bundle(bundle_zip("operator-faults"))


def train_on(cache_dir: Path) -> BaseException:
    """The train stage's work with its token caches and run dirs under `cache_dir`; what it raised."""
    settings = Settings(cache_dir=cache_dir, byte_budget=10_000, runner_threads=1)
    with pytest.raises(Exception) as raised:
        run.train(BUNDLE, settings, run.new_run_dir(settings, BUNDLE))
    return raised.value


def test_a_full_disk_under_the_token_cache_is_infra_disk_full(tmp_path):
    with small_filesystem(tmp_path / "small", "3m") as cache_dir:  # the token cache needs ~17 MB
        fault = operator_fault(train_on(cache_dir))
    assert fault is not None and fault.rule == "infra:disk_full", fault
    assert "not charged" in fault.message


def test_a_read_only_cache_is_infra_unwritable(tmp_path):
    with small_filesystem(tmp_path / "ro", "1m", readonly=True) as cache_dir:
        fault = operator_fault(train_on(cache_dir))
    assert fault is not None and fault.rule == "infra:unwritable", fault


def test_a_node_dead_or_cut_off_is_infra_node_died():
    """Ray's NodeDiedError ("dead or unreachable") is the partition a lapsed lease also reports: never charged."""
    from ray.exceptions import NodeDiedError

    fault = operator_fault(NodeDiedError("node 1234 is dead or unreachable"))
    assert fault is not None and fault.rule == "infra:node_died" and "not charged" in fault.message


def test_a_bug_is_not_an_operator_fault():
    assert operator_fault(ValueError("a bug")) is None
    assert operator_fault(RuntimeError("wrapped")) is None


def test_operator_faults_requeue_uncharged_then_hold_then_release(tmp_path):
    cap = 2
    with Store(tmp_path / "prism.duckdb", max_attempts=3) as store:
        submission = store.create_submission("miner", "b.zip", BUNDLE)
        fault = Reason(rule="infra:disk_full", message="a disk on the operator's side is full")
        for _ in range(cap):
            [claimed] = store.claim_next("scheduler", 60)
            assert claimed.attempt == 1  # never charged: the claim was undone each time
            assert store.requeue_uncharged(submission.id, fault, "other-owner", 1, cap) is None  # lease guarded
            assert store.requeue_uncharged(submission.id, fault, "scheduler", 1, cap) == "pending"
            record = store.get_submission(submission.id)
            assert (record.status, record.attempt, record.reasons[0].rule) == ("pending", 0, "infra:disk_full")
        [claimed] = store.claim_next("scheduler", 60)
        assert store.requeue_uncharged(submission.id, fault, "scheduler", claimed.attempt, cap) == "held"
        held = store.get_submission(submission.id)
        assert (held.status, held.attempt) == ("held", 0)
        assert [reason.rule for reason in held.reasons] == ["infra:held_for_operator", "infra:disk_full"]
        kinds = [event.kind for event in store.events(submission.id)]
        assert kinds.count("infra_requeued") == cap and kinds[-1] == "held"
        assert store.runs(submission.id) == []  # no attempt was left on the miner's record
        assert store.release(submission.id)
        [again] = store.claim_next("scheduler", 60)
        assert (again.id, again.attempt) == (submission.id, 1)


def test_every_operator_fault_is_documented():
    documents = {name: (Path(__file__).parents[1] / "docs" / name).read_text() for name in ("miner.md", "operator.md")}
    for rule in [*RULES, "infra:held_for_operator"]:
        for name, text in documents.items():
            assert f"`{rule}`" in text, (rule, name)


def test_intake_answers_503_while_the_disk_is_below_its_floor(tmp_path):
    with small_filesystem(tmp_path / "small", "8m") as state:
        store = Store(state / "prism.duckdb")
        try:
            settings = Settings(cache_dir=state, cluster=ClusterSettings(health_probe_seconds=0.05))
            api = server_settings(new_allowlist(tmp_path), auth_mode="dev", registry={"mode": "open"})
            with serve(create_app(StoreBackend(store, settings), api)) as url, httpx.Client(base_url=url) as http:
                posted = http.post("/v1/submissions", content=bundle_zip("while-full"),
                                   headers={"Content-Type": "application/zip", "X-Hotkey": "miner"})
                assert posted.status_code == 503 and posted.json()["error"] == "infra:disk_full", posted.text
                assert int(posted.headers["retry-after"]) > 0
                health = http.get("/health")
                assert health.status_code == 503 and health.json()["error"] == "infra:disk_full"
                assert "PRISM_CLUSTER_MIN_FREE_BYTES" in health.json()["message"]
            assert store.list_submissions() == []
            lowered = Settings(cache_dir=state, cluster=ClusterSettings(min_free_bytes=1 << 20))
            with serve(create_app(StoreBackend(store, lowered), api)) as url, httpx.Client(base_url=url) as http:
                posted = http.post("/v1/submissions", content=bundle_zip("after-floor-lowered"),
                                   headers={"Content-Type": "application/zip", "X-Hotkey": "miner"})
                assert posted.status_code == 200, posted.text
        finally:
            store.close()
