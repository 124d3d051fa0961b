"""The one launcher for every execution of miner code: a child process in its own session with
rlimits, a wall-clock kill and a process-group kill of everything it started."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessLimits:
    address_space_bytes: int | None = None
    file_size_bytes: int | None = 1 << 30
    cpu_seconds: int | None = None


class Sandboxed:
    """A launched process: poll it, wait for it, kill its whole process group."""

    def __init__(self, process: subprocess.Popen, log_path: Path):
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.wait(5.0)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _apply_limits(limits: ProcessLimits) -> None:
    if limits.address_space_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (limits.address_space_bytes, limits.address_space_bytes))
    if limits.file_size_bytes:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes, limits.file_size_bytes))
    if limits.cpu_seconds:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))


def launch(argv: list[str], env: dict[str, str], log_path: Path, cwd: Path,
           limits: ProcessLimits | None = None) -> Sandboxed:
    limits = limits or ProcessLimits()
    log = open(log_path, "ab")  # noqa: SIM115 — handed to the child, closed below
    try:
        process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, preexec_fn=lambda: _apply_limits(limits),
        )
    finally:
        log.close()
    return Sandboxed(process, log_path)


def deadline_after(seconds: float) -> float:
    return time.monotonic() + seconds
