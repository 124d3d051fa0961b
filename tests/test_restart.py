"""An operator's restart costs nothing: SIGTERM to a real `prism-ray serve` in the middle of a training drains it
(no new claims, leases handed back without charging an attempt), it exits cleanly and takes every process of its
cluster with it, and the restarted server completes every submission once, each at its first attempt."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster_helpers import make_bundle, wait_until, warm_token_cache
from prism_ray.client import PrismClient
from prism_ray.store import Store

CLI = [sys.executable, "-m", "prism_ray.cli"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def left_behind(session: int, markers: tuple[str, ...]) -> list[str]:
    """`pid command` of every live process in the server's session, or whose command line names its Ray temp dir or
    its state dir (a process that left the session is still found). Zombies have exited: init reaps them."""
    rows = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout.splitlines()
    found = []
    for row in rows:
        pid, sid, stat, args = row.strip().split(None, 3)
        if stat.startswith("Z") or int(pid) == os.getpid():
            continue
        if int(sid) == session or any(marker in args for marker in markers):
            found.append(f"{pid} {args[:200]}")
    return found


class Server:
    """`prism-ray serve` in a session of its own, on a Ray temp dir of its own."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.url = f"http://127.0.0.1:{port}"
        self.ray_tmp = f"/tmp/ray-restart-{port}"  # short: Ray's socket paths are length-capped
        self.env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(root / "home"),
                    "RAY_TMPDIR": self.ray_tmp, "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                    "PRISM_RUNNER_THREADS": "1", "PRISM_SCORING_HELDOUT_BYTE_BUDGET": "2000",
                    "PRISM_CLUSTER_HEARTBEAT_SECONDS": "0.5", "PRISM_GATE_MODE": "off", "PRISM_AUDIT_MODE": "off"}
        self.line = [*CLI, "serve", "--auth", "dev", "--port", str(port), "--state-dir", str(root / "state"),
                     "--byte-budget", "3000"]
        self.runs = 0

    @contextlib.contextmanager
    def running(self) -> Iterator[subprocess.Popen]:
        self.runs += 1
        self.log = self.root / f"serve-{self.runs}.log"
        with open(self.log, "w") as log:
            process = subprocess.Popen(self.line, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            wait_until(lambda: self.up(process), timeout=180, poll=0.5, what=f"the server to come up: {self.output()}")
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    def up(self, process: subprocess.Popen) -> bool:
        assert process.poll() is None, self.output()
        with contextlib.suppress(httpx.HTTPError):
            return "serving at" in self.output() and httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        return False

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, process: subprocess.Popen, sig: signal.Signals) -> None:
        """Signal the server, wait for it to exit, and check it exited cleanly and alone."""
        process.send_signal(sig)
        process.wait(timeout=120)
        assert process.returncode == 0, self.output()
        assert "Traceback" not in self.output(), self.output()
        left = left_behind(process.pid, (self.ray_tmp, str(self.root)))
        assert left == [], "\n".join(left) + "\n" + self.output()


@pytest.fixture
def server(tmp_path):
    warm_token_cache(tmp_path / "state")
    server = Server(tmp_path, free_port())
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
        assert (handed_back["kind"], handed_back["detail"]["interrupted"]["stage"]) == ("unclaimed", "train")

    with server.running() as process, PrismClient(server.url, dev_hotkey="restart") as client:
        finals = [client.wait(submission_id, poll_s=0.5, timeout_s=300) for submission_id in ids]
        assert [(final["status"], final["attempt"]) for final in finals] == [("completed", 1), ("completed", 1)]
        server.stop(process, signal.SIGINT)
    with Store(server.root / "state" / "prism.duckdb") as store:
        assert [[run["attempt"] for run in store.runs(submission_id)] for submission_id in ids] == [[1], [1]]
        kinds = [event["kind"] for event in store.events(ids[0])]
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
