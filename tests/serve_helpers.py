"""A real `prism-ray serve` in a subprocess (test_restart, test_conformance): a session of its own, a Ray temp dir of
its own, a tiny byte budget, and a check that stopping it leaves no process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from cluster_helpers import wait_until

CLI = [sys.executable, "-m", "prism_ray.cli.command"]


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
    """`prism-ray serve` in a session of its own, on a Ray temp dir of its own; `env` adds to (or overrides) its
    environment, `auth` is its --auth."""

    def __init__(self, root: Path, port: int, name: str, auth: str = "dev", env: dict[str, str] | None = None) -> None:
        self.root = root
        self.url = f"http://127.0.0.1:{port}"
        self.ray_tmp = f"/tmp/ray-{name}-{port}"  # short: Ray's socket paths are length-capped
        self.env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(root / "home"),
                    "RAY_TMPDIR": self.ray_tmp, "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                    "PRISM_RUNNER_THREADS": "1", "PRISM_SCORING_HELDOUT_BYTE_BUDGET": "2000",
                    "PRISM_CLUSTER_HEARTBEAT_SECONDS": "0.5", "PRISM_GATE_MODE": "off", "PRISM_AUDIT_MODE": "off",
                    "PRISM_REPLICA_MODE": "off", "PRISM_CONTRACT_WORLD_SIZES": "", "PRISM_CLUSTER_DASHBOARD": "false",
                    **(env or {})}
        self.line = [*CLI, "serve", "--auth", auth, "--port", str(port), "--state-dir", str(root / "state"),
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
