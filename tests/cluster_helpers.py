"""Settings and waiting helpers for the tests on a real Ray cluster; their bundles are miners.py's."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from prism_ray.config import AuditSettings, ClusterSettings, GateSettings, ReplicaSettings, Settings
from prism_ray.data.dataset import open_dataset
from prism_ray.data.token_cache import load_token_stream


def tiny_settings(cache_dir: Path, store_path: Path, audits: bool = False, replicas: bool = False,
                  **cluster: object) -> Settings:
    """A 20 kB byte budget, one runner thread, the gate off, fast heartbeats, and re-execution audits and seed
    replicas only for the tests about them (elsewhere they would re-run every top score beside the work under test)."""
    return Settings(cache_dir=cache_dir, byte_budget=20_000, runner_threads=1, time_limit=120,
                    gate=GateSettings(mode="off"), audit=AuditSettings(mode="on" if audits else "off"),
                    replicas=ReplicaSettings(mode="on" if replicas else "off", top_k=1, count=1),
                    cluster=ClusterSettings(store_path=store_path, heartbeat_seconds=1.0, **cluster))


def warm_token_cache(cache_dir: Path) -> None:
    """Build the bytes token cache once, so no training pays for it."""
    settings = Settings(cache_dir=cache_dir)
    load_token_stream(open_dataset(settings.data_dir), "train", "bytes", cache_dir)


def wait_until(predicate, timeout: float, poll: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def pids(pattern: str) -> set[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}
