"""The scheduler (prism_ray/cluster/scheduler.py) turn by turn, on a real local Ray instance (one logical GPU) and the
real store actor over a DuckDB file: whom it claims, how many, and what it takes back. The scheduler runs in the test
process and each test calls `tick()` itself, so nothing moves between two looks. The locked data is missing on
purpose: a chain that got as far as the train stage would fail there, so no sandbox is ever launched. Whole
trainings on several nodes are test_cluster.py's."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import pytest
import ray

from api_helpers import fake_result
from cluster_helpers import tiny_settings
from miners import make_bundle
from prism_ray.cluster.scheduler import Scheduler
from prism_ray.cluster.store_actor import store_actor
from prism_ray.config import Settings

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING)  # "local": never another's cluster
    yield
    ray.shutdown()


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Tiny runs, the store in its own namespace per test, and no locked data (see the module's docstring)."""
    settings = tiny_settings(tmp_path / "cache", tmp_path / "prism.duckdb", audits=True, poll_seconds=0.1,
                             namespace=f"test-{uuid.uuid4().hex[:8]}")
    return settings.model_copy(update={"data_dir": tmp_path / "no-data"})


@pytest.fixture
def store(settings):
    handle = store_actor(settings, on_head=False)
    yield handle
    ray.kill(handle)


@pytest.fixture
def schedulers() -> Iterator[list[Scheduler]]:
    started: list[Scheduler] = []
    yield started
    for scheduler in started:
        scheduler.stop()  # hands back what it still holds and cancels its stage tasks


def scheduler(store, settings: Settings, schedulers: list[Scheduler], capacity: int) -> Scheduler:
    update = {"cluster": settings.cluster.model_copy(update={"capacity": capacity})}
    made = Scheduler(store, settings.model_copy(update=update), has_head=False)
    schedulers.append(made)
    return made


def submit(store, *tags: str) -> list[str]:
    return [ray.get(store.create_submission.remote(f"miner-{tag}", f"{tag}.zip", make_bundle(tag))).id
            for tag in tags]


def record(store, submission_id: str):
    return ray.get(store.get_submission.remote(submission_id))


def holder(item) -> str | None:
    """The scheduler holding an item's lease: each claim's owner is `<scheduler>.<n>`, its own lease."""
    return item.lease_owner.rsplit(".", 1)[0] if item.lease_owner else None


def test_the_oldest_pending_are_claimed_up_to_capacity(store, settings, schedulers):
    ids = submit(store, "a", "b", "c")
    assert scheduler(store, settings, schedulers, capacity=0).capacity() == 1  # 0: the cluster's GPU count
    two = scheduler(store, settings, schedulers, capacity=2)
    two.tick()
    two.tick()
    held = [record(store, submission_id) for submission_id in ids]
    assert [holder(item) for item in held] == [two.owner, two.owner, None]
    assert held[2].status == "pending" and (two.stats()["in_flight"], two.stats()["claimed"]) == (2, 2)

    assert sorted(two.stop()) == sorted(ids[:2])  # a stop hands its attempts back, uncharged
    assert [record(store, submission_id).status for submission_id in ids] == ["pending"] * 3


def test_audits_are_claimed_before_submissions(store, settings, schedulers):
    [scored] = submit(store, "scored")
    [claimed] = ray.get(store.claim_next.remote("earlier-scheduler", 60))
    assert claimed.id == scored and ray.get(store.complete.remote(scored, "earlier-scheduler", fake_result(scored)))
    [audit] = ray.get(store.list_audits.remote(submission_id=scored))
    assert audit.status == "pending"  # the board's top entry is always audited
    [waiting] = submit(store, "waiting")

    one = scheduler(store, settings, schedulers, capacity=1)
    one.tick()
    assert (one.stats()["audits_claimed"], one.stats()["claimed"]) == (1, 0)
    assert holder(ray.get(store.get_audit.remote(audit.id))) == one.owner
    assert record(store, waiting).status == "pending"


def test_an_expired_lease_is_requeued_and_claimed_again(store, settings, schedulers):
    [orphan] = submit(store, "orphan")
    ray.get(store.claim_next.remote("dead-scheduler", 0.05))  # a scheduler that stopped renewing its lease
    time.sleep(0.2)
    live = scheduler(store, settings, schedulers, capacity=1)
    live.tick()
    assert holder(record(store, orphan)) == live.owner and live.stats()["in_flight"] == 1


def test_a_start_requeues_the_running_rows_a_crashed_scheduler_left(store, settings, schedulers):
    [orphan] = submit(store, "orphan")
    ray.get(store.claim_next.remote("crashed-scheduler", 3600))  # its lease would hold for an hour
    assert scheduler(store, settings, schedulers, capacity=1).start() == [orphan]
