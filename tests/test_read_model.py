"""The read model (prism_ray/backend/read_model.py) over a real DuckDB file, read through the backend that keeps it: what it
returns for a stored submission, how stale it may be, and what a change drops. test_api.py reads it over HTTP."""

from __future__ import annotations

import pytest

from api_helpers import bundle_zip, fake_result
from prism_ray.backend.store_backend import StoreBackend
from prism_ray.config import Settings
from prism_ray.errors import Reason
from prism_ray.store import Store

UNKNOWN = "sub_" + "0" * 32


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "prism.duckdb") as opened:
        yield opened


def backend_over(store: Store, max_staleness_s: float = 3600) -> StoreBackend:
    """By default the model looks at the store only when told to (or after this backend's own writes)."""
    return StoreBackend(store, Settings(byte_budget=800_000), max_staleness_s=max_staleness_s)


def claim(backend: StoreBackend, count: int = 1) -> list[str]:
    """The scheduler's side: claim the oldest pending submissions, as the cluster would."""
    with backend.use() as owner:
        return [record.id for record in owner.claim_next("scheduler", lease_seconds=60, limit=count)]


def complete(backend: StoreBackend, submission_id: str) -> None:
    """The scheduler's side: a made-up completed run for a claimed submission."""
    with backend.use() as owner:
        assert owner.complete(submission_id, "scheduler", fake_result(submission_id))


def test_a_stored_submission_reads_back_through_each_stage_of_its_life(store):
    backend = backend_over(store)
    reads = backend.reads
    accepted = backend.submit("miner-a", "a.zip", bundle_zip("a"))
    waiting = reads.detail(accepted.id)
    assert (waiting.record.hotkey, waiting.record.filename, waiting.record.status) == ("miner-a", "a.zip", "pending")
    assert waiting.runs == [] and waiting.events and reads.leaderboard(None) == []
    assert reads.detail(UNKNOWN) is None and reads.curve(UNKNOWN) == []

    assert claim(backend) == [accepted.id]
    reads.refresh(force=True)
    running = reads.detail(accepted.id)
    assert running.record.status == "running" and len(running.runs) == 1 and len(running.events) > len(waiting.events)

    complete(backend, accepted.id)
    reads.refresh(force=True)
    done = reads.detail(accepted.id)
    assert done.record.status == "completed" and len(done.runs) == 1
    [entry] = reads.leaderboard(None)
    assert (entry.submission_id, entry.hotkey, entry.rank) == (accepted.id, "miner-a", 1)
    assert entry.bpb == pytest.approx(fake_result(accepted.id).bpb)
    assert len(reads.curve(accepted.id)) == backend.settings.curve_points  # the stored 800 points, thinned
    assert reads.stats()["in_flight"] == 0


def test_a_rejection_reads_back_with_its_typed_reasons(store):
    backend = backend_over(store)
    reason = Reason(rule="contract:syntax", message="training.py does not parse", file="training.py", line=2)
    rejected = backend.reject("miner-b", "b.zip", [reason])
    view = backend.reads.detail(rejected.id)
    assert (view.record.status, view.record.stage, view.record.reasons) == ("rejected", "intake", [reason])
    assert backend.reads.queue().items == [] and backend.reads.leaderboard(None) == []


def test_the_queue_shows_the_running_first_then_the_waiting_in_arrival_order(store):
    backend = backend_over(store)
    ids = [backend.submit(f"miner-{tag}", f"{tag}.zip", bundle_zip(tag)).id for tag in "abc"]
    assert [item.record.id for item in backend.reads.queue().items] == ids
    assert claim(backend) == [ids[0]]  # the oldest is claimed first
    assert claim(backend) == [ids[1]]
    with backend.use() as owner:  # handed back to the queue: it waits behind the running one again
        assert owner.unclaim(ids[1], "scheduler", 1)
    backend.reads.refresh(force=True)
    queue = backend.reads.queue().items
    assert [(item.record.id, item.record.status, item.position) for item in queue] == [
        (ids[0], "running", 1), (ids[1], "pending", 2), (ids[2], "pending", 3)]


def test_a_read_is_at_most_max_staleness_old_and_a_change_drops_only_what_it_touches(store):
    kept, fresh = backend_over(store), backend_over(store, max_staleness_s=0)
    first, second = (kept.submit(f"miner-{tag}", f"{tag}.zip", bundle_zip(tag)).id for tag in ("first", "second"))
    before, untouched = kept.reads.detail(first), kept.reads.detail(second)
    board, queue = kept.reads.leaderboard(None), kept.reads.queue()

    claim(kept)  # a write that did not go through the read model's backend
    assert kept.reads.detail(first) is before  # within max_staleness_s: the kept view
    assert fresh.reads.detail(first).record.status == "running"  # no staleness allowed: it looked
    kept.reads.invalidate()  # what a backend does after its own writes: the next read looks first
    assert kept.reads.detail(first).record.status == "running"
    assert kept.reads.detail(second) is untouched and kept.reads.leaderboard(None) is board  # nothing completed
    assert kept.reads.queue() is not queue and kept.reads.queue().items[0].record.status == "running"

    complete(kept, first)
    kept.reads.invalidate()
    assert [entry.submission_id for entry in kept.reads.leaderboard(None)] == [first]  # a completion drops the board
    assert kept.reads.detail(second) is untouched
