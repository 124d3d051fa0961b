"""A full disk on a real local Ray cluster (one logical GPU): the token cache lives on a small tmpfs, so the train
stage fails writing it. The attempt is requeued without charge (`infra:disk_full`), then the submission is held for
the operator; once the disk is grown and the submission released, it trains and is scored on attempt 1 (its
timeline says the gate was skipped)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from cluster_helpers import tiny_settings, wait_until
from miners import make_bundle
from prism_ray.cluster import ClusterHandle, start_cluster, submit, wait
from small_fs import resize, small_filesystem

pytestmark = [pytest.mark.cluster, pytest.mark.sandbox]


@pytest.fixture
def cluster_on_a_small_disk(tmp_path) -> Iterator[ClusterHandle]:
    with small_filesystem(tmp_path / "cache", "3m") as cache_dir:  # the bytes token cache needs ~17 MB
        settings = tiny_settings(cache_dir, tmp_path / "prism.duckdb", max_infra_requeues=1)
        handle = start_cluster(None, settings)
        try:
            yield handle
        finally:
            handle.close()


def test_a_full_disk_never_costs_the_miner_an_attempt(cluster_on_a_small_disk):
    handle = cluster_on_a_small_disk
    submission = submit(handle, "miner", "full.zip", make_bundle("disk-full").to_zip())
    held = wait_until(lambda: (record := ray.get(handle.store.get_submission.remote(submission.id))).status == "held"
                      and record, timeout=240, what="the submission to be held")
    assert held.attempt == 0, held  # two claims, both given back
    assert [reason.rule for reason in held.reasons] == ["infra:held_for_operator", "infra:disk_full"]
    events = ray.get(handle.store.events.remote(submission.id))
    assert [event.kind for event in events].count("infra_requeued") == 1
    assert ray.get(handle.store.runs.remote(submission.id)) == []

    resize(handle.settings.cache_dir, "64m")  # the operator frees space, then releases it
    assert ray.get(handle.store.release.remote(submission.id))
    handle.scheduler.wake.remote()
    done = wait(handle, submission.id, timeout=240)
    assert (done.status, done.attempt) == ("completed", 1), done.reasons
    decided = [event for event in ray.get(handle.store.events.remote(submission.id)) if event.kind == "decided"]
    assert decided and decided[-1].stage == "gate" and decided[-1].detail["gate"] == "skipped"  # gate off
