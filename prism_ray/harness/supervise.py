"""Process supervision for the trusted parent: launch a runner in the sandbox behind a private socket, accept its
connections, and turn however it ended into a typed reason.

Each runner gets its own socket dir, bound into its sandbox only, so the trainer cannot connect where the scorer
does. A runner killed by SIGKILL is told apart: the memory limit (the cgroup's OOM killer) is the miner's
`run:out_of_memory`; the sandbox itself killed from outside is a system failure (`infra:runner_killed`), retried
and never charged to the miner; status 137 from inside the sandbox without an OOM kill is a crash, since exit(137)
reads the same.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from prism_ray.errors import PrismError, Reason
from prism_ray.harness.isolation import Sandboxed, SandboxPolicy, launch
from prism_ray.harness.protocol import Channel, ProtocolError


def runner_env(threads: int, role: str, world_size: int = 1) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "PYTHONPATH",
            "VIRTUAL_ENV", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0",
                "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONSAFEPATH": "1", "TORCHINDUCTOR_DETERMINISTIC": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    if role == "trainer":  # the single-rank torch.distributed environment torchrun would set, without its agent
        env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})  # its own network namespace: no clash
        # each rank sets its own RANK and LOCAL_RANK from the parent's config (runner.py)
        env.update({"WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)})
        if world_size > 1:  # the sandbox's loopback is its only interface: the process group's transport uses it
            env.update({"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"})
    return env


class Runner:
    """One sandboxed runner process and the listener it connects to."""

    def __init__(self, role: str, run_dir: Path, threads: int, policy: SandboxPolicy, readable: tuple[Path, ...],
                 artifacts_dir: Path | None, module: str = "prism_ray.harness.runner", world_size: int = 1):
        self.role = role
        # AF_UNIX paths are limited to ~108 bytes, so the socket lives in a short private dir, not in the run dir.
        self.ipc_dir = Path(tempfile.mkdtemp(prefix=f"prism-{role}-", dir="/tmp" if os.path.isdir("/tmp") else None))
        os.chmod(self.ipc_dir, 0o711)  # the unprivileged sandbox uid may pass through, not list
        socket_path = self.ipc_dir / "runner.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(socket_path))
        self.listener.listen(world_size + 2)
        self.connections = world_size  # then the socket and its dir go (`accept`)
        os.chmod(socket_path, 0o777)  # the sandbox runs as an unprivileged uid; the dir around it stays private
        policy = replace(policy, readable=(*policy.readable, *readable, self.ipc_dir), artifacts_dir=artifacts_dir)
        self.oom_kills = _oom_kills()
        self.stopped = False  # killed by us (it outlived its time): never an outside kill
        argv = [sys.executable, "-m", module, str(socket_path), role]
        if world_size > 1:  # N trainer ranks in this one sandbox, started by a launcher of ours
            argv = [sys.executable, "-m", "prism_ray.harness.launch_ranks", str(socket_path), str(world_size)]
        try:
            self.process: Sandboxed = launch(argv, runner_env(threads, role, world_size), run_dir / f"{role}.log",
                                             cwd=run_dir, policy=policy)
        except PrismError:
            self.close()
            raise

    def accept(self, deadline: float) -> Channel:
        self.listener.settimeout(0.2)
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                if self.process.poll() is not None:
                    raise ProtocolError(f"the {self.role} exited before connecting", closed=True) from None
                continue
            self.connections -= 1
            if not self.connections:  # nothing left on disk for a killed parent to leave behind in /tmp
                self._stop_listening()
            return Channel(connection)

    def end_reason(self, detail: str, closed: bool = True) -> Reason:
        """Why the runner is gone: memory, an outside kill, or a crash with its last output. One that went away
        (`closed`) is on its way out and its exit status says why; one that broke the protocol while still running is
        stopped at once: it has failed, and waiting on it would only hold the node."""
        if not closed and self.process.poll() is None:
            self.process.kill()  # waits for it: its output is all in the log then
            return Reason(rule="run:crash", message=f"the {self.role} broke the harness's protocol ({detail}) and was "
                          f"stopped. Last output:\n{self.process.log_tail(12)}")
        code = self.process.wait(5.0)
        if self.stopped:  # our own kill: the runner outlived the time it had, which is the bundle's doing
            return Reason(rule="run:crash", message=f"the {self.role} did not exit when its work was done ({detail}) "
                          "and was stopped")
        if code in (-signal.SIGKILL, 128 + signal.SIGKILL) and _oom_kills() > self.oom_kills:
            return Reason(rule="run:out_of_memory", message=f"the {self.role} was killed by the kernel's "
                          "out-of-memory killer: the run used more memory than this node has for it")
        # Only the sandbox itself killed is an outside kill: status 137 from inside is also what exit(137) gives,
        # and a bundle must not turn its own failure into a free retry (docs/operator.md, "Liveness and failures").
        if code == -signal.SIGKILL:
            return Reason(rule="infra:runner_killed", message=f"the {self.role} was killed from outside (an operator "
                          "or the node); this is not charged to your bundle and the run is retried")
        if code is None:  # its channel closed but it lingers (another rank still running): it is done either way
            self.process.kill()
        tail = self.process.log_tail(12)
        return Reason(rule="run:crash", message=f"the {self.role} died ({detail}). Last output:\n{tail}")

    def wait(self, timeout: float) -> int | None:
        code = self.process.wait(timeout)
        if code is None:
            self.stopped = True
            self.process.kill()
        return code

    def _stop_listening(self) -> None:
        self.listener.close()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def close(self) -> None:
        self._stop_listening()
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            self.stopped = True
            process.kill()


def _oom_kills() -> int:
    """The OOM killer's count for this process's cgroup (v2); 0 where it cannot be read."""
    try:
        relative = Path("/proc/self/cgroup").read_text().strip().split("\n")[-1].split("::", 1)[1]
        events = (Path("/sys/fs/cgroup") / relative.lstrip("/") / "memory.events").read_text()
    except (OSError, IndexError):
        return 0
    for line in events.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return 0
