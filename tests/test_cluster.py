"""The Ray layer on real local Ray clusters: several nodes with one logical GPU each (ray.cluster_utils.Cluster),
real sandboxed trainings, a real DuckDB file, a real OpenAI-compatible gate server on loopback.

Every Ray process a test starts is stopped by its fixture; the module checks that no raylet of ours is left.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster_helpers import pids, tiny_settings, wait_until, warm_token_cache
from miners import CLOCK_LEARNING_RATE, COPIED_ARCHITECTURE, FORBIDDEN_IMPORT, INFINITE_LOOP, make_bundle
from openai_stub import OpenAIStub, StubReply, openai_stub_fixture, openai_stub_server_fixture  # noqa: F401
from prism_ray.cluster import (
    NO_GPU_NOTICE,
    ClusterBackend,
    ClusterHandle,
    leaderboard,
    start_cluster,
    submit,
    wait,
    weights,
)
from prism_ray.config import GateSettings, Settings
from prism_ray.evaluation.pipeline import evaluate
from prism_ray.harness.isolation import sandbox_available
from prism_ray.store import AuditRecord, RunRecord, Store, TimelineEvent

pytestmark = [pytest.mark.cluster, pytest.mark.sandbox, pytest.mark.skipif(not sandbox_available(), reason="the cluster requires bubblewrap")]


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_behind() -> Iterator[None]:
    before = pids("raylet")
    yield
    wait_until(lambda: not pids("raylet") - before, timeout=30, what="our raylets to exit")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prism-cache")
    warm_token_cache(path)
    return path


@pytest.fixture(scope="class")
def ray_cluster() -> Iterator[Cluster]:
    """A head without GPUs (store, scheduler, gate) and two nodes with one logical GPU and one CPU each."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "resources": {"head": 1}})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def start(settings: Settings) -> ClusterHandle:
    handle = start_cluster(None, settings)  # the process is connected already: joins that cluster
    assert not handle.owns_ray
    return handle


@pytest.fixture
def handles() -> Iterator[list[ClusterHandle]]:
    """Handles a test starts on the class's cluster; their actors are stopped after the test."""
    started: list[ClusterHandle] = []
    yield started
    for handle in started:
        handle.stop()


def runs_of(handle: ClusterHandle, submission_id: str) -> list[RunRecord]:
    return ray.get(handle.store.runs.remote(submission_id))


def audits_of(handle: ClusterHandle, submission_id: str) -> list[AuditRecord]:
    return ray.get(handle.store.list_audits.remote(submission_id=submission_id))


def events_of(handle: ClusterHandle, submission_id: str) -> list[TimelineEvent]:
    return ray.get(handle.store.events.remote(submission_id))


def first_event(events: list[TimelineEvent], kind: str, stage: str | None = None) -> float:
    return min(event.created_at for event in events if event.kind == kind and stage in (None, event.stage))


def stage_task_of(sandboxed: set[int]) -> int:
    """The Ray worker running a training: the parent of the outermost sandbox process."""
    parents = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in sandboxed}
    [outermost] = [parent for pid, parent in parents.items() if parent not in sandboxed]
    return outermost


class TestOnTwoGpuNodes:
    def test_two_submissions_train_concurrently_on_two_nodes(self, ray_cluster, handles, cache_dir, tmp_path):
        handle = start(tiny_settings(cache_dir, tmp_path / "prism.duckdb"))
        handles.append(handle)
        ids = [submit(handle, f"hotkey-{n}", f"{n}.zip", make_bundle(f"concurrent-{n}", pause=0.02).to_zip()).id
               for n in range(2)]
        records = [wait(handle, submission_id, timeout=120) for submission_id in ids]
        assert [record.status for record in records] == ["completed", "completed"], [r.reasons for r in records]

        runs = [runs_of(handle, submission_id) for submission_id in ids]
        assert [len(attempts) for attempts in runs] == [1, 1]
        (first,), (second,) = runs
        assert max(first.started_at, second.started_at) < min(first.finished_at, second.finished_at)
        assert first.node and second.node and first.node != second.node
        # Both trainings had started before either finished: they really ran side by side.
        events = [events_of(handle, submission_id) for submission_id in ids]
        train_started = [first_event(timeline, "stage", "train") for timeline in events]
        assert max(train_started) < min(first_event(timeline, "completed") for timeline in events)
        assert first.progress_bytes >= 20_000 and first.report.isolation == "bubblewrap"
        assert ray.get(handle.store.curve.remote(ids[0]))[-1].bpb == pytest.approx(first.report.bpb)
        assert {entry.submission_id for entry in leaderboard(handle)} == set(ids)
        assert ray.get(handle.scheduler.stats.remote())["max_in_flight"] == 2

    def test_the_top_entry_is_re_run_under_a_secret_seed_and_the_board_shows_its_spread(
            self, ray_cluster, handles, cache_dir, tmp_path):
        handle = start(tiny_settings(cache_dir, tmp_path / "prism.duckdb", replicas=True))
        handles.append(handle)
        record = submit(handle, "alice", "honest.zip", make_bundle("replicated"))
        assert wait(handle, record.id, timeout=120).status == "completed"
        [replica] = wait_until(lambda: [item for item in ray.get(handle.store.list_replicas.remote(
            submission_id=record.id)) if item.status == "completed"], timeout=120, what="the replica")
        assert (replica.why, replica.replica, replica.seed) == ("top_k", 1, None)  # the epoch is open: seed hidden
        [scored] = [run.report for run in runs_of(handle, record.id)]
        [rerun] = [run.report for run in runs_of(handle, replica.id)]
        assert rerun.seed != scored.seed and rerun.byte_budget == scored.byte_budget
        assert rerun.chunks.span == scored.chunks.span == 20_000
        [entry] = leaderboard(handle)
        assert (entry.seeds, entry.replicas) == (2, "done") and entry.mean_bpb == pytest.approx(
            (scored.bpb + replica.bpb) / 2)
        assert entry.spread_bpb > 0 and entry.gpu_seconds > scored.train_seconds  # another init, another bpb
        assert ray.get(handle.scheduler.stats.remote())["replicas_claimed"] == 1

    def test_a_copy_earns_nothing_and_the_original_keeps_its_weight_once_audited_on_the_other_node(
            self, ray_cluster, handles, cache_dir, tmp_path):
        handle = start(tiny_settings(cache_dir, tmp_path / "prism.duckdb", audits=True))
        handles.append(handle)
        original = submit(handle, "alice", "honest.zip", make_bundle("honest"))
        copy = submit(handle, "bob", "mine.zip", make_bundle("honest", architecture=COPIED_ARCHITECTURE))
        assert (copy.status, copy.copy_of, [note.rule for note in copy.notes]) == ("pending", original.id,
                                                                                 ["copy:duplicate"])
        records = [wait(handle, record.id, timeout=120) for record in (original, copy)]
        assert [record.status for record in records] == ["completed", "completed"], [r.reasons for r in records]

        audit = wait_until(lambda: [item for item in audits_of(handle, original.id) if item.status == "passed"],
                           timeout=120, what="the original's audit")[0]
        [first_run] = runs_of(handle, original.id)
        assert (audit.why, audit.original_node) == ("top_k", first_run.node)
        assert audit.node != audit.original_node  # re-run on the other GPU node
        assert audit.audit_bpb == audit.original_bpb == first_run.report.bpb  # bit-identical on CPU
        assert [run.status for run in runs_of(handle, audit.id)] == ["passed"]
        assert audits_of(handle, copy.id) == []  # a copy earns nothing, so it is never audited
        board = leaderboard(handle)
        assert {(entry.hotkey, entry.copy_of, entry.audit) for entry in board} == {
            ("alice", None, "passed"), ("bob", original.id, "unaudited")}
        assert weights(handle) == {"alice": 1.0}
        assert ray.get(handle.scheduler.stats.remote())["audits_claimed"] == 1

    def test_a_rerun_that_does_not_reproduce_invalidates_the_score(self, ray_cluster, handles, cache_dir, tmp_path):
        handle = start(tiny_settings(cache_dir, tmp_path / "prism.duckdb", audits=True))
        handles.append(handle)
        clocked = submit(handle, "mallory", "clock.zip", make_bundle("clock", training=CLOCK_LEARNING_RATE))
        assert wait(handle, clocked.id, timeout=120).status == "completed"
        audit = wait_until(lambda: [item for item in audits_of(handle, clocked.id) if item.status == "mismatch"],
                           timeout=120, what="the audit's verdict")[0]
        record = ray.get(handle.store.get_submission.remote(clocked.id))
        assert (record.status, [reason.rule for reason in record.reasons]) == ("failed", ["audit:mismatch"])
        assert repr(audit.original_bpb) in record.reasons[0].message and repr(audit.audit_bpb) in \
            record.reasons[0].message
        assert leaderboard(handle) == [] and weights(handle) == {}

    def test_rejections_are_final_and_never_train(self, ray_cluster, handles, cache_dir, tmp_path,
                                                  openai_stub: OpenAIStub):
        key_file = tmp_path / "gate.key"
        key_file.write_text("sk-test-gate\n")
        settings = tiny_settings(cache_dir, tmp_path / "prism.duckdb")
        settings.gate = GateSettings(mode="required", base_url=openai_stub.base_url, model="test/reviewer",
                                     api_key_file=key_file, timeout_s=5, max_attempts=1, backoff_s=0)
        handle = start(settings)
        handles.append(handle)

        backend = ClusterBackend(handle)  # what the HTTP layer calls
        broken = backend.submit("alice", "broken.zip", b"this is not a zip", None)
        assert (broken.status, broken.stage) == ("rejected", "intake") and broken.reasons[0].rule.startswith("intake")
        assert backend.check_nonce("alice", "n-1", 300) and not backend.check_nonce("alice", "n-1", 300)

        forbidden = submit(handle, "alice", "os.zip", make_bundle("os", training=FORBIDDEN_IMPORT).to_zip())
        forbidden = wait(handle, forbidden.id, timeout=60)
        assert (forbidden.status, forbidden.stage) == ("rejected", "check")
        assert forbidden.reasons[0].file == "training.py"
        [run] = runs_of(handle, forbidden.id)  # stored with the report eval prints for the same bundle
        local = evaluate(make_bundle("os", training=FORBIDDEN_IMPORT), settings)
        seconds = {"timings", "wall_seconds"}
        assert run.report.model_dump(exclude=seconds) == local.model_dump(exclude=seconds)
        assert list(run.report.timings) == list(local.timings) == ["check"]

        openai_stub.script([{"verdict": "reject", "confidence": 0.9, "reasons": [
            {"rule": "io_network", "message": "train opens a socket", "file": "training.py", "line": 3}]}])
        refused = wait(handle, submit(handle, "alice", "net.zip", make_bundle("refused")).id, timeout=60)
        assert (refused.status, refused.stage) == ("rejected", "gate")
        assert [reason.rule for reason in refused.reasons] == ["gate:io_network"]

        openai_stub.script([StubReply.error(500)])
        held = wait(handle, submit(handle, "alice", "held.zip", make_bundle("held")).id, timeout=60)
        assert (held.status, held.stage) == ("held", "gate") and held.reasons

        duplicate = submit(handle, "bob", "copy.zip", make_bundle("refused"))
        assert (duplicate.status, duplicate.duplicate_of) == ("duplicate", refused.id)
        again = submit(handle, "alice", "net-again.zip", make_bundle("refused"))
        assert again.reused and again.id == refused.id

        assert len(openai_stub.requests) == 2  # the statically rejected bundle never reached the gate
        for record in (broken, duplicate):
            assert runs_of(handle, record.id) == []
        for record in (forbidden, refused, held):
            assert all(event.stage != "train" for event in events_of(handle, record.id))
        assert ray.get(handle.scheduler.stats.remote())["claimed"] == 3
        assert backend.stats()["by_status"] == {"pending": 0, "running": 0, "completed": 0, "rejected": 3,
                                                "failed": 0, "held": 1, "duplicate": 1}

    def test_infinite_loop_is_cut_by_its_stage_limit_while_others_flow(self, ray_cluster, handles, cache_dir,
                                                                        tmp_path):
        # room for a tiny training beside the loop on two slow cores (on one 2-core VM it ended 2 s after a 15-s cut)
        settings = tiny_settings(cache_dir, tmp_path / "prism.duckdb", stage_limits={"train": 30.0})
        settings.time_limit = 600  # the harness's own clock would be far too late: the stage limit cuts it
        handle = start(settings)
        handles.append(handle)
        looping = make_bundle("loop", training=INFINITE_LOOP)
        loop_id = submit(handle, "looper", "loop.zip", looping).id
        others = [submit(handle, f"miner-{n}", f"{n}.zip", make_bundle(f"flow-{n}")).id for n in range(2)]

        loop = wait(handle, loop_id, timeout=120)
        assert (loop.status, loop.stage, loop.reasons[0].rule) == ("failed", "train", "run:timeout")
        finished = [wait(handle, submission_id, timeout=120) for submission_id in others]
        assert [record.status for record in finished] == ["completed"] * 2, [r.reasons for r in finished]
        assert min(record.finished_at for record in finished) < loop.finished_at  # the queue kept moving
        assert not pids(looping.sha256[:10])  # the cancelled task took its sandboxed runner with it
        stats = ray.get(handle.scheduler.stats.remote())
        assert stats["capacity"] == 2 and stats["max_in_flight"] == 2 and stats["claimed"] == 3

    def test_a_silent_training_loses_its_lease_and_is_requeued(self, ray_cluster, handles, cache_dir, tmp_path):
        handle = start(tiny_settings(cache_dir, tmp_path / "prism.duckdb", lease_seconds=4.0))
        handles.append(handle)
        bundle = make_bundle("frozen", pause=0.05)
        submission_id = submit(handle, "frozen", "f.zip", bundle).id
        # The trainer's sandbox binds <run dir>/bundle; the exporter's binds <run dir>/exporter-bundle.
        training = f"{bundle.sha256[:10]}-[0-9a-f]{{6}}/bundle "
        worker = stage_task_of(wait_until(lambda: pids(training), timeout=60, what="the training's runner"))
        os.kill(worker, signal.SIGSTOP)  # the task and its heartbeat thread go silent, as on a hung host
        try:
            requeued = wait_until(lambda: [event for event in events_of(handle, submission_id)
                                           if event.kind == "infra_requeued"], timeout=60,
                                  what="the lease to expire")
        finally:
            os.kill(worker, signal.SIGCONT)  # lets the cancelled worker take its kill
        assert requeued[0].detail["reasons"][0]["rule"] == "infra:lease_expired"  # not charged: the claim undone
        record = wait(handle, submission_id, timeout=120)
        assert record.status == "completed", record.reasons
        assert [(run.attempt, run.status) for run in runs_of(handle, submission_id)] == [(1, "completed")]
        wait_until(lambda: not pids(bundle.sha256[:10]), timeout=10, what="the frozen attempt's runner to die")

    def test_eval_and_the_cluster_give_the_same_report(self, ray_cluster, handles, cache_dir, tmp_path):
        """One stage table, run in-process by `prism-ray eval` and as Ray tasks by the cluster: the two reports agree
        field by field, apart from where and when (run dir, seconds)."""
        settings = tiny_settings(cache_dir, tmp_path / "prism.duckdb")
        handle = start(settings)
        handles.append(handle)
        bundle = make_bundle("both-ways")
        local = evaluate(bundle, settings.model_copy(update={"sandbox": handle.settings.sandbox}))
        submission_id = submit(handle, "both", "b.zip", bundle).id
        assert wait(handle, submission_id, timeout=180).status == "completed"
        [run] = runs_of(handle, submission_id)
        remote = run.report
        assert local.status == remote.status == "completed", (local.reasons, remote.reasons)
        assert (Path(remote.run_dir) / "report.json").exists() and (Path(local.run_dir) / "report.json").exists()
        assert list(local.timings) == list(remote.timings) == ["check", "gate", "train"]  # score writes the report
        where_and_when = {"run_dir": True, "timings": True, "wall_seconds": True, "train_seconds": True,
                          "tokens_per_second": True, "heldout": {"seconds"}, "probes": {"max_drift", "rows"}}  # probed batches are drawn in secret
        assert local.model_dump(exclude=where_and_when) == remote.model_dump(exclude=where_and_when)

    def test_a_runner_killed_from_outside_is_requeued_not_charged(self, ray_cluster, handles, cache_dir, tmp_path):
        """SIGKILL of the trainer's sandbox by an operator (no out-of-memory kill in its cgroup) is a system
        failure: the attempt is requeued as infra:runner_killed and the submission completes on the next one. (The
        pattern matches bwrap's command line, which names the run dir; status 137 from inside is the bundle's.)"""
        handle = start(tiny_settings(cache_dir, tmp_path / "prism.duckdb"))
        handles.append(handle)
        bundle = make_bundle("shot", pause=0.05)
        submission_id = submit(handle, "shot", "s.zip", bundle).id
        trainer = wait_until(lambda: pids(f"{bundle.sha256[:10]}.*runner.sock trainer"), timeout=60,
                             what="the trainer to start")
        for pid in trainer:
            os.kill(pid, signal.SIGKILL)
        record = wait(handle, submission_id, timeout=180)
        assert record.status == "completed", record.reasons
        first, second = runs_of(handle, submission_id)
        assert (first.attempt, first.status) == (1, "requeued")
        assert first.reasons[0].rule == "infra:runner_killed"
        assert (second.attempt, second.status) == (2, "completed")

    def test_killing_the_training_node_requeues_and_scores_once(self, ray_cluster, handles, cache_dir, tmp_path):
        handle = start(tiny_settings(cache_dir, tmp_path / "prism.duckdb"))
        handles.append(handle)
        submission_id = submit(handle, "survivor", "s.zip", make_bundle("survivor", pause=0.05)).id
        node_id = wait_until(lambda: next((run.node for run in runs_of(handle, submission_id)), None), timeout=60,
                             what="the training to start")
        [victim] = [node for node in ray_cluster.list_all_nodes() if node.node_id == node_id]
        ray_cluster.remove_node(victim)

        record = wait(handle, submission_id, timeout=180)
        assert record.status == "completed", record.reasons
        [scored] = runs_of(handle, submission_id)  # the lost node's attempt was given back, not charged
        assert (scored.attempt, scored.status) == (1, "completed") and scored.node != node_id
        events = events_of(handle, submission_id)
        [lost] = [event for event in events if event.kind == "infra_requeued"]
        print(f"\nthe killed node's attempt: {lost.detail['reasons'][0]['rule']}")
        assert lost.detail["reasons"][0]["rule"] in ("infra:node_died", "infra:object_lost", "infra:lease_expired")
        assert lost.detail["interrupted"]["node"] == node_id
        kinds = [event.kind for event in events]
        assert "requeued" not in kinds and kinds.count("completed") == 1
        assert [row.submission_id for row in ray.get(handle.store.scored_rows.remote())] == [submission_id]


def test_a_crashed_scheduler_loses_nothing_and_scores_nothing_twice(cache_dir, tmp_path):
    """The scheduler dies with a queue of submissions, without draining (a crash; a clean stop is
    tests/test_restart.py), then the store and Ray stop; the DuckDB file carries every submission over."""
    store_path = tmp_path / "prism.duckdb"
    settings = tiny_settings(cache_dir, store_path)
    handle = start_cluster(None, settings)
    try:
        assert handle.owns_ray and handle.notice.startswith(NO_GPU_NOTICE)
        ids = [submit(handle, f"miner-{n}", f"{n}.zip", make_bundle(f"queued-{n}", pause=0.02)).id for n in range(2)]
        wait_until(lambda: next((run.node for run in runs_of(handle, ids[0])), None), timeout=60, what="the first training")
    finally:
        ray.kill(handle.scheduler)
        ray.get(handle.store.close.remote())
        ray.kill(handle.store)
        ray.shutdown()
    with Store(store_path) as store:  # Ray is gone: the file is ours to read
        assert [store.get_submission(submission_id).status for submission_id in ids] == ["running", "pending"]
    handle = start_cluster(None, settings)
    try:
        records = [wait(handle, submission_id, timeout=120) for submission_id in ids]
        assert [record.status for record in records] == ["completed"] * 2, [record.reasons for record in records]
        interrupted = runs_of(handle, ids[0])
        assert [(run.attempt, run.status) for run in interrupted] == [(1, "requeued"), (2, "completed")]
        assert interrupted[0].reasons[0].rule == "infra:orphaned"
        assert [len(runs_of(handle, submission_id)) for submission_id in ids[1:]] == [1]
        scored = [row.submission_id for row in ray.get(handle.store.scored_rows.remote())]
        assert sorted(scored) == sorted(ids)
        # The metrics reach Ray's Prometheus endpoint, which the dashboard reads.
        endpoint = f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"
        wait_until(lambda: {"ray_prism_outcomes_total", "ray_prism_queue_depth", "ray_prism_bpb_count",
                            "ray_prism_stage_seconds_count"} <= metric_names(endpoint), timeout=60, what="the metrics")
    finally:
        handle.close()


def metric_names(endpoint: str) -> set[str]:
    text = urllib.request.urlopen(endpoint, timeout=5).read().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
