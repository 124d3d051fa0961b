"""Ray nodes on one machine, each in a network namespace of its own (`ip netns`, as root), for the partition tests.

The head's namespace is the router: one veth pair to each worker, a /24 per link, forwarding on, each worker's
default route through the head. Cutting a worker's link (`cut`) sets the head's end of its veth down: packets stop
both ways and no connection is reset, as when a switch port or a cable goes; `heal` brings it back. Each node runs
`ray start --block` with its veth address as `--node-ip-address` and a Ray temp dir of its own.

Everything is torn down even when a test fails: every process in each namespace is killed (Ray's processes inherit
their node's namespace), then the namespaces go, and the veths with them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"
GCS_PORT = 6379


def ip(*args: str) -> str:
    done = subprocess.run([IP, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass
class Node:
    name: str  # its namespace
    address: str  # its veth address, Ray's node IP
    link: str  # the head's end of the veth to this node ("" for the head)
    temp_dir: Path
    process: subprocess.Popen | None = None

    def run(self, args: list[str], env: dict[str, str], log: Path, **popen: object) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen([IP, "netns", "exec", self.name, *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, **popen)

    def pids(self) -> list[int]:
        with contextlib.suppress(RuntimeError):
            return [int(pid) for pid in ip("netns", "pids", self.name).split()]
        return []


@dataclass
class Topology:
    """A head and its workers, each in a namespace; `env` is what every Ray process and driver here runs with."""

    root: Path
    env: dict[str, str]
    head: Node
    workers: list[Node]
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def nodes(self) -> list[Node]:
        return [self.head, *self.workers]

    @property
    def gcs(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    def start(self, node: Node, extra_env: dict[str, str] | None = None) -> None:
        """`ray start --block` on `node`; the head with no GPU and the `head` resource, a worker with one logical GPU."""
        args = ["ray", "start", "--block", f"--node-ip-address={node.address}", f"--temp-dir={node.temp_dir}",
                "--disable-usage-stats", "--num-cpus=1"]
        if node is self.head:
            args += ["--head", f"--port={GCS_PORT}", "--num-gpus=0", "--resources={\"head\": 1}",
                     "--include-dashboard=false"]
        else:
            args += [f"--address={self.gcs}", "--num-gpus=1"]
        node.process = node.run(args, {**self.env, **(extra_env or {})}, self.logs / f"{node.name}.log")

    def cut(self, node: Node) -> None:
        ip("-n", self.head.name, "link", "set", node.link, "down")

    def heal(self, node: Node) -> None:
        ip("-n", self.head.name, "link", "set", node.link, "up")

    def stop(self, node: Node, timeout: float = 15.0) -> None:
        """SIGINT to `ray start --block` ends that node's processes; SIGKILL what is left in its namespace."""
        if node.process is not None and node.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=timeout)
        kill_all(node)
        if node.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired, ProcessLookupError):
                node.process.kill()
                node.process.wait(timeout=5)


def kill_all(node: Node, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := node.pids()) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@contextlib.contextmanager
def topology(root: Path, env: dict[str, str], workers: int = 2) -> Iterator[Topology]:
    """Namespaces `prism<tag>-head`, `prism<tag>-w1`, ... wired to the head; removed on exit, whatever happened."""
    tag = str(os.getpid() % 100_000)
    subnet = 20 + os.getpid() % 200  # 10.<subnet>.<link>.0/24, link 1.. per worker
    temp = Path(f"/tmp/rns{tag}")  # short: Ray's socket paths are length-capped
    head = Node(f"prism{tag}-head", f"10.{subnet}.1.1", "", temp / "head")
    nodes = [Node(f"prism{tag}-w{n}", f"10.{subnet}.{n}.2", f"p{tag}w{n}", temp / f"w{n}")
             for n in range(1, workers + 1)]
    made: list[Node] = []
    try:
        for node in (head, *nodes):
            ip("netns", "add", node.name)
            made.append(node)
            ip("-n", node.name, "link", "set", "lo", "up")
        ip("netns", "exec", head.name, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        for n, node in enumerate(nodes, start=1):
            inner = f"p{tag}i{n}"
            ip("link", "add", node.link, "netns", head.name, "type", "veth", "peer", "name", inner, "netns", node.name)
            ip("-n", head.name, "addr", "add", f"10.{subnet}.{n}.1/24", "dev", node.link)
            ip("-n", node.name, "addr", "add", f"{node.address}/24", "dev", inner)
            ip("-n", head.name, "link", "set", node.link, "up")
            ip("-n", node.name, "link", "set", inner, "up")
            ip("-n", node.name, "route", "add", "default", "via", f"10.{subnet}.{n}.1")
        yield Topology(root, env, head, nodes)
    finally:
        for node in reversed(made):
            kill_all(node)
        for node in reversed(made):
            with contextlib.suppress(RuntimeError):
                ip("netns", "delete", node.name)
        shutil.rmtree(temp, ignore_errors=True)
