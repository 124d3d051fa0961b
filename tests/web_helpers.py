"""Helpers for the web-page tests: a scheduler thread that plays each kind of run (scored at once, failed with
typed reasons, crashed mid-training, tried again after a lost node, or training slowly with live progress), the
Ray node it pretends to run on, and headless Chromium."""

from __future__ import annotations

import base64
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from api_helpers import fake_result
from prism_ray.errors import Reason
from prism_ray.evaluation.report import RunReport
from prism_ray.store import Store, SubmissionRecord
from serve_app import StoreBackend

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900")
OWNER = "page-scheduler"
NODE_ID = "7f3a" * 14  # what Ray calls a node: 56 hex digits, meaningless to a person
NODE_ADDRESS = "gpu-node-7 (10.0.0.7)"  # what the pages show instead (ClusterBackend reads it from Ray's node table)
HOSTILE_REASON = Reason(rule="sandbox:forbidden_import", message="import of `os` is not allowed <img src=x "
                        "onerror=\"window.pwned=1\">", file="training.py", line=7)


def artifacts_dir() -> Path:
    """Where screenshots go: $PRISM_ARTIFACTS_DIR/web, else tests/artifacts/web (ignored by git)."""
    root = os.environ.get("PRISM_ARTIFACTS_DIR") or Path(__file__).parent / "artifacts"
    path = Path(root) / "web"
    path.mkdir(parents=True, exist_ok=True)
    return path


class PageScheduler(threading.Thread):
    """Claims pending work and plays it by name: `live-*` trains for `live_seconds` with a heartbeat (one at a time,
    so a second one waits in the queue), `fail-*` fails the check with a typed reason, `crash-*` fails in training
    before the runner reported its device, `retry-*` loses its node on the first attempt and is scored on the
    second, `twin-*` are scored with one and the same curve, `gap-*` scores the lowest bpb but has its final score
    halved by a memorisation gap, anything else is scored at once. Every run's gate is skipped (on its timeline)."""

    def __init__(self, backend: StoreBackend, live_seconds: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.backend = backend
        self.live_seconds = live_seconds
        self.stop = threading.Event()
        self.training: dict[str, float] = {}  # live submission id → when its training started

    def run(self) -> None:
        while not self.stop.wait(0.2):
            with self.backend.use() as store:
                for record in store.claim_next(OWNER, lease_seconds=60, limit=1 if not self.training else 0):
                    self._start(store, record)
                for submission_id, started in self.training.items():
                    self._heartbeat(store, submission_id, started)

    def _start(self, store: Store, record: SubmissionRecord) -> None:
        for stage in ("check", "gate"):
            store.set_stage(record.id, stage, owner=OWNER)
        store.note(record.id, "gate", {"gate": "skipped", "message": "the gate is off on this server"}, OWNER,
                   record.attempt)
        name = record.name or ""
        if name.startswith("fail-"):
            store.fail(record.id, [HOSTILE_REASON], stage="check", owner=OWNER)
            return
        store.set_stage(record.id, "train", node=NODE_ID, owner=OWNER)
        if name.startswith("live-"):
            self.training[record.id] = time.monotonic()
            return
        if name.startswith("crash-"):
            crash = Reason(rule="run:crash", message="the runner exited with signal 9")
            store.fail(record.id, [crash], stage="train", owner=OWNER,
                       report=RunReport(status="failed", stage="train", reasons=[crash], wall_seconds=3.2))
            return
        if name.startswith("retry-") and record.attempt == 1:
            store.requeue(record.id, Reason(rule="infra:node_died", message="the node running it was lost"),
                          owner=OWNER)
            return
        store.set_stage(record.id, "heldout", owner=OWNER)
        report = fake_result("twin", bpb=0.5) if name.startswith("twin-") else fake_result(record.id)
        if name.startswith("gap-"):  # the best bpb on the board, ranked below worse ones by its penalty
            report = fake_result(record.id, bpb=0.3, penalty=0.25, gap=0.4)
        store.complete(record.id, OWNER, report)

    def _heartbeat(self, store: Store, submission_id: str, started: float) -> None:
        budget = self.backend.settings.byte_budget
        scored = int(budget * min(0.02 + (time.monotonic() - started) / self.live_seconds, 0.99))
        store.renew_lease(submission_id, OWNER, 60, progress_bytes=scored, progress_bpb=1.3 + 1000 / scored,
                          tokens_per_second=61_500.0)


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """Headless Chromium under chromedriver, with a fresh profile; nothing here reaches beyond loopback."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with tempfile.TemporaryDirectory(prefix="prism-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    """The whole page, not just the window, as artifacts_dir()/name."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                              "clip": clip})
    path = artifacts_dir() / name
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
