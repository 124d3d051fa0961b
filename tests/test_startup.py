"""`prism-ray serve` on a state dir that cannot work, for real: a store file held by another process, a damaged
file, a read-only directory, a disk below the floor and a full disk (real tmpfs mounts). Each ends the command
within seconds with exit 1 and one line that says what to do, and Ray never starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from damage import damaged, seeded
from prism_ray.store import Store
from small_fs import fill, small_filesystem

CLI = [sys.executable, "-m", "prism_ray.cli.command"]


def serve(state_dir: Path, **env: str) -> tuple[int, list[str], float]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    done = subprocess.run([*CLI, "serve", "--state-dir", str(state_dir), "--port", str(port)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200", **env})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done.returncode, lines, time.monotonic() - started


def assert_one_line(result: tuple[int, list[str], float], *says: str) -> None:
    code, lines, seconds = result
    assert code == 1 and len(lines) == 1, lines
    assert all(phrase in lines[0] for phrase in says), lines[0]
    assert seconds < 60, seconds  # only the interpreter and DuckDB start (~9 s at load 16 on 2 cores); Ray never does


def test_a_store_held_by_another_process(tmp_path):
    with Store(tmp_path / "prism.duckdb"):  # this process holds the file, as a running server's store actor would
        assert_one_line(serve(tmp_path), "in use by another process", f"PID {os.getpid()}", "--state-dir")


def test_a_damaged_store(tmp_path):
    original = tmp_path / "seed" / "prism.duckdb"
    original.parent.mkdir()
    seeded(original)
    state = tmp_path / "state"
    state.mkdir()
    damaged(original, tmp_path / "seed", lambda store: store.check_integrity()).rename(state / "prism.duckdb")
    result = serve(state)
    assert_one_line(result, "is damaged", "prism-ray export", "prism-ray check-store")
    checked = subprocess.run([*CLI, "check-store", str(state / "prism.duckdb")], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 1 and "is damaged" in checked.stderr
    ok = subprocess.run([*CLI, "check-store", str(original)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "reads back" in ok.stdout


def test_a_read_only_state_dir(tmp_path):
    with small_filesystem(tmp_path / "ro", "1m", readonly=True) as state:
        assert_one_line(serve(state), "cannot write to", "Read-only file system")


@pytest.mark.parametrize("floor,says", [(None, "below the floor"), ("0", "is full")])
def test_a_disk_below_the_floor_or_full(tmp_path, floor, says):
    with small_filesystem(tmp_path / "small", "4m") as state:
        if floor == "0":
            fill(state)
        env = {"PRISM_CLUSTER_MIN_FREE_BYTES": floor} if floor else {}
        assert_one_line(serve(state, **env), says)
