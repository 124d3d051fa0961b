"""An operator's restart costs nothing: SIGTERM to a real `prism-ray serve` in the middle of a training drains it
(no new claims, leases handed back without charging an attempt), it exits cleanly and takes every process of its
cluster with it, and the restarted server completes every submission once, each at its first attempt."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import pytest

from cluster_helpers import wait_until, warm_token_cache
from miners import make_bundle
from prism_ray.cli.client import PrismClient
from prism_ray.store import Store
from serve_helpers import Server, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.sandbox]


@pytest.fixture
def server(tmp_path):
    warm_token_cache(tmp_path / "state")
    server = Server(tmp_path, free_port(), "restart")
    yield server
    shutil.rmtree(server.ray_tmp, ignore_errors=True)


def test_sigterm_mid_training_drains_and_the_restart_charges_no_attempt(server):
    slow = make_bundle("restart-slow", pause=0.5)  # about 12 batches: long enough to be caught mid-training
    quick = make_bundle("restart-quick")
    with server.running() as process, PrismClient(server.url, dev_hotkey="restart") as client:
        ids = [client.submit(bundle.to_zip())["id"] for bundle in (slow, quick)]
        wait_until(lambda: (client.status(ids[0])["progress"] or {}).get("bytes_scored"), timeout=240,
                   what="the first training to report progress")
        assert client.status(ids[1])["status"] == "pending"  # one logical GPU: the second one waits
        server.stop(process, signal.SIGTERM)
    assert f"stopped; 1 running submission(s) handed back to the queue: {ids[0]}" in " ".join(server.output().split())

    with Store(server.root / "state" / "prism.duckdb") as store:  # the server is gone: the file is free
        drained = [store.get_submission(submission_id) for submission_id in ids]
        assert [(record.status, record.attempt) for record in drained] == [("pending", 0), ("pending", 0)]
        handed_back = store.events(ids[0])[-1]
        assert (handed_back.kind, handed_back.detail["interrupted"]["stage"]) == ("unclaimed", "train")

    with server.running() as process, PrismClient(server.url, dev_hotkey="restart") as client:
        finals = [client.wait(submission_id, poll_s=0.5, timeout_s=300) for submission_id in ids]
        assert [(final["status"], final["attempt"]) for final in finals] == [("completed", 1), ("completed", 1)]
        server.stop(process, signal.SIGINT)
    with Store(server.root / "state" / "prism.duckdb") as store:
        assert [[run.attempt for run in store.runs(submission_id)] for submission_id in ids] == [[1], [1]]
        kinds = [event.kind for event in store.events(ids[0])]
        assert kinds.count("claimed") == 2 and kinds.count("completed") == 1 and "requeued" not in kinds, kinds


def orphaned_agents(ray_tmp: str) -> list[int]:
    """Ray processes (`ray::…`) re-parented to init that still hold files of this server's Ray temp dir."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            title = (stat.parent / "cmdline").read_bytes()
            if fields[0] != "Z" and fields[1] == "1" and title.startswith(b"ray::") and any(
                    os.readlink(fd).startswith(ray_tmp) for fd in (stat.parent / "fd").iterdir()):
                found.append(int(stat.parent.name))
    return found


def test_a_hard_kill_leaves_ray_agents_that_the_next_start_reaps(server):
    with server.running() as process:
        process.kill()  # kill -9: no drain, no clean-up
        process.wait()
    store_file = server.root / "state" / "prism.duckdb"

    def store_free() -> bool:  # the store actor's process has gone with its raylet
        with contextlib.suppress(Exception), Store(store_file):
            return True
        return False

    wait_until(store_free, timeout=60, what="the store file to be released")
    orphans = orphaned_agents(server.ray_tmp)
    assert orphans  # ray::DashboardAgent, ray::RuntimeEnvAgent: they hold their ports long after
    with server.running() as process:
        assert not [pid for pid in orphans if Path(f"/proc/{pid}").exists() and pid in orphaned_agents(server.ray_tmp)]
        assert "orphaned Ray process(es) of the previous cluster" in server.output()  # reaped, not gone by themselves
        server.stop(process, signal.SIGTERM)  # and nothing of either run is left behind
