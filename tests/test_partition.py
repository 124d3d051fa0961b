"""A real multi-node cluster on one machine: a head and two GPU workers started with `ray start`, each in a network
namespace of its own joined by veth links (tests/netns.py), a driver on the head (tests/netns_driver.py). One
worker's link is cut while it trains: the lease lapses, the attempt is given back uncharged and scored once on the
other worker; Ray marks the cut node dead; once the link is healed, the operator restarts Ray on that node and it
trains again. docs/operator.md ("What a partition costs") quotes the seconds measured here.

Needs root (`ip netns`) and bubblewrap; every process in the namespaces is killed and the namespaces deleted by the
fixture, whatever happens.
"""

from __future__ import annotations

import json
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster_helpers import tiny_settings, wait_until, warm_token_cache
from netns import Node, Topology, topology
from netns_driver import MARK

LEASE_SECONDS = 6.0
HEARTBEAT_SECONDS = 1.0  # tiny_settings'
# Ray's defaults (a check every 3 s, 10 s to answer, 5 misses) took 63 s to declare a cut node dead; with these,
# 32 to 61 s on a busy 2-core machine: always well after the lease lapses, so the test sees both in order.
RAY_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                     "RAY_health_check_failure_threshold": "5"}


class Driver:
    """tests/netns_driver.py in the head's namespace; `call` sends one request and waits for its answer."""

    def __init__(self, topo: Topology, settings_file: Path) -> None:
        script = Path(__file__).with_name("netns_driver.py")
        self.log = topo.logs / "driver.log"
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", topo.head.name, sys.executable, str(script), topo.gcs, str(settings_file)],
                env=topo.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True)
        self.answers: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._answer(timeout=180, what="the driver to start the store and scheduler")

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith(MARK):
                self.answers.put(json.loads(line[len(MARK):]))

    def _answer(self, timeout: float, what: str) -> dict:
        try:
            return self.answers.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer from the driver in {timeout:g} s ({what}): "
                               f"{self.log.read_text()[-3000:]}") from None

    def call(self, name: str, *args: object, timeout: float = 60) -> object:
        self.process.stdin.write(json.dumps({"call": name, "args": list(args)}) + "\n")
        self.process.stdin.flush()
        answer = self._answer(timeout, name)
        if "error" in answer:
            raise RuntimeError(f"{name}{args}: {answer['error']}")
        return answer["ok"]


@dataclass
class Cluster:
    topo: Topology
    driver: Driver

    def nodes(self) -> list[dict]:
        return self.driver.call("nodes")

    def alive(self) -> dict[str, dict]:
        """ip → the live node there."""
        return {node["ip"]: node for node in self.nodes() if node["alive"]}

    def worker_at(self, node_id: str) -> Node:
        [ip] = [node["ip"] for node in self.nodes() if node["id"] == node_id]
        [worker] = [worker for worker in self.topo.workers if worker.address == ip]
        return worker

    def runs(self, submission_id: str) -> list[dict]:
        return self.driver.call("runs", submission_id)

    def events(self, submission_id: str) -> list[dict]:
        return self.driver.call("events", submission_id)

    def finished(self, submission_id: str, timeout: float) -> dict:
        return wait_until(lambda: (record := self.driver.call("record", submission_id))["finished_at"] and record,
                          timeout=timeout, poll=0.5, what=f"{submission_id} to finish")


def all_up(cluster: Cluster) -> bool:
    alive = cluster.alive()
    return len(alive) == 3 and sum(node["gpus"] for node in alive.values()) == 2


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    cache_dir = tmp_path / "cache"
    warm_token_cache(cache_dir)
    settings = tiny_settings(cache_dir, tmp_path / "prism.duckdb", lease_seconds=LEASE_SECONDS)
    settings_file = tmp_path / "settings.pickle"
    settings_file.write_bytes(pickle.dumps(settings))
    home = tmp_path / "home"
    home.mkdir()
    # Token auth, as Ray 2.60 has it by default: one token in $HOME/.ray, RAY_AUTH_MODE on every node and driver.
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/bin", "HOME": str(home),
           "RAY_AUTH_MODE": "token", "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    with topology(tmp_path, env) as topo:
        for node in topo.nodes:  # the head's GCS is what declares a node dead
            topo.start(node, RAY_HEALTH_CHECKS if node is topo.head else None)
        driver = Driver(topo, settings_file)
        cluster = Cluster(topo, driver)
        try:
            wait_until(lambda: all_up(cluster), timeout=120, poll=1, what="three nodes and two GPUs")
            yield cluster
        finally:
            driver.process.kill()  # the namespaces' processes are killed as they go


def test_a_cut_link_costs_no_attempt_and_the_healed_node_rejoins(cluster):
    topo, driver = cluster.topo, cluster.driver
    slow = driver.call("submit", "miner-a", "cut-off", 0.15)
    other = driver.call("submit", "miner-b", "bystander", 0.05)
    run = wait_until(lambda: next((run for run in cluster.runs(slow) if run["node"] and run["progress_bytes"]), None),
                     timeout=120, poll=0.5, what="the slow training to report progress")
    first_node = run["node"]
    victim = cluster.worker_at(first_node)
    survivor = next(worker for worker in topo.workers if worker is not victim)

    cut_at = time.time()
    topo.cut(victim)
    requeued = wait_until(lambda: [event for event in cluster.events(slow) if event["kind"] == "infra_requeued"],
                          timeout=LEASE_SECONDS + 30, poll=0.5, what="the lease to lapse")
    detection = requeued[0]["created_at"] - cut_at
    assert requeued[0]["detail"]["reasons"][0]["rule"] == "infra:lease_expired"
    assert requeued[0]["detail"]["interrupted"]["node"] == first_node
    assert LEASE_SECONDS - 2 * HEARTBEAT_SECONDS < detection < LEASE_SECONDS + 4 * HEARTBEAT_SECONDS, detection

    done = cluster.finished(slow, timeout=180)
    assert (done["status"], done["attempt"]) == ("completed", 1), done["reasons"]  # the cut attempt was given back
    [scored] = cluster.runs(slow)
    assert (scored["attempt"], scored["status"]) == (1, "completed")
    assert scored["node"] != first_node and cluster.worker_at(scored["node"]) is survivor
    kinds = [event["kind"] for event in cluster.events(slow)]
    assert (kinds.count("claimed"), kinds.count("infra_requeued"), kinds.count("completed")) == (2, 1, 1), kinds
    assert "requeued" not in kinds  # nothing charged
    assert cluster.finished(other, timeout=120)["status"] == "completed"
    assert sorted(driver.call("scored")) == sorted([slow, other])  # each once: the cut attempt wrote nothing

    dead = wait_until(lambda: not any(node["alive"] for node in cluster.nodes() if node["id"] == first_node),
                      timeout=120, poll=1, what="Ray to mark the cut node dead")
    marked_dead = time.time() - cut_at
    topo.heal(victim)
    # Ray never takes a node it marked dead back: its raylet learns it and exits, and the operator starts Ray there
    # again (a new node id).
    exited = wait_until(lambda: not any("raylet" in name for name in process_names(victim)), timeout=60, poll=1,
                        what="the dead node's raylet to exit once healed")
    raylet_gone = time.time() - cut_at
    topo.stop(victim)
    topo.start(victim)
    wait_until(lambda: all_up(cluster), timeout=120, poll=1, what="the restarted node to join")
    again = [driver.call("submit", f"miner-{n}", f"after-{n}", 0.1) for n in range(2)]
    nodes = {cluster.worker_at(cluster.finished(sid, timeout=180) and cluster.runs(sid)[0]["node"]).name
             for sid in again}
    assert nodes == {victim.name, survivor.name}  # both GPUs train again
    print(f"\npartition: lease lapsed {detection:.1f} s after the cut; Ray marked the node dead after "
          f"{marked_dead:.1f} s; its raylet exited {raylet_gone:.1f} s after the cut, once healed")
    assert dead and exited


def process_names(node: Node) -> list[str]:
    names = []
    for pid in node.pids():
        try:
            names.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return names
