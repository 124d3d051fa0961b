"""Requests as miners make them and a server to send them to (test_api, test_registry, test_pages, test_service):
real sr25519 keypairs, signed JSON bodies, real bundle zips, the app under uvicorn on loopback over a real DuckDB
store, and a scheduler thread that completes pending submissions with a made-up score.

The default bundle is a real learner (a bigram table trained with Adam through the harness's forward), so wherever
a test lets it run it passes the check stage, trains and is scored."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from bittensor_wallet import Keypair

from miners import bigram_architecture, learner_loop
from prism_ray.access.auth import sign_request
from prism_ray.config import ApiSettings, ConnectionLimits, Settings
from prism_ray.evaluation.report import RunReport
from prism_ray.store import TERMINAL_STATUSES, Store
from serve_app import StoreBackend, create_app
from serve_app.connection_guard import guarded

BIGRAM_ARCHITECTURE = bigram_architecture()
TOKEN = "internal-test-token"


def zip_files(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def bundle_zip(tag: str, training: str | None = None, architecture: str = BIGRAM_ARCHITECTURE) -> bytes:
    """A real bundle zip; `tag` makes its code (and so its fingerprints) distinct — a constant, not a comment, since
    copies are recognised whatever their comments say."""
    if training is None:
        training = f"TAG = {tag!r}\n{learner_loop(seq_len=64, lr=0.1)}"
    return zip_files({"architecture.py": architecture, "training.py": training,
                      "prism.yaml": f"tokenizer: bytes\nname: {tag}\n"})


def new_keypair() -> Keypair:
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


def signed_json(keypair: Keypair, zipped: bytes, filename: str = "model.zip") -> tuple[bytes, dict[str, str]]:
    """A PRISM JSON submission body and its signed headers."""
    body = json.dumps({"filename": filename, "code": base64.b64encode(zipped).decode(),
                       "metadata": {"source": "test"}}).encode()
    return body, {"Content-Type": "application/json", **sign_request(keypair, body)}


def server_settings(allowlist: Path, **overrides: Any) -> ApiSettings:
    """The test server's settings: the hotkeys of `allowlist` may submit, and the per-address limit is out of the
    way (every test client is 127.0.0.1); `overrides` win."""
    return ApiSettings(**{"internal_token": TOKEN, "address_rate_limit_burst": 100_000,
                          "registry": {"mode": "allowlist", "file": allowlist}, **overrides})


# --- a server -----------------------------------------------------------------------------------------------------

class FakeScheduler(threading.Thread):
    """Claims pending submissions and completes them with a made-up score, and re-runs the audits the store asks for
    with the same result, as the real scheduler would."""

    def __init__(self, backend: StoreBackend) -> None:
        super().__init__(daemon=True)
        self.backend = backend
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            with self.backend.use() as store:
                for record in store.claim_next("fake-scheduler", lease_seconds=60, limit=64):
                    store.complete(record.id, "fake-scheduler", fake_result(record.id))
                for audit in store.claim_audits("fake-scheduler", lease_seconds=60, limit=64):  # a re-run reproduces
                    store.finish_audit(audit.id, "fake-scheduler", fake_result(audit.submission_id))


def fake_result(submission_id: str, bpb: float | None = None, penalty: float = 1.0, gap: float = 0.01) -> RunReport:
    """A made-up completed run's report; its bpb (in [1, 2) unless given) and its curve follow from `submission_id`.
    The score and held-out blocks carry every field a real run's report has; `penalty` scales final_score."""
    if bpb is None:
        bpb = 1.0 + int(hashlib.sha256(submission_id.encode()).hexdigest()[:4], 16) / 65536
    curve = [{"bytes": 1000 * (i + 1), "bpb": bpb + 1.0 / (i + 1)} for i in range(800)]
    curve[-1]["bpb"] = bpb
    final = penalty / (1.0 + bpb)
    breakdown = {"final_score": final, "base": 1.0 / (1.0 + bpb), "penalty": penalty, "anomaly": 1, "tie_break": 0.0,
                 "flags": [], "inputs": {"bpb": bpb, "vocab_size": 257, "step0_loss": 5.6, "heldout_delta": 0.4,
                                         "gap": gap}}
    heldout = {"status": "completed", "heldout_delta": 0.4, "gap": gap, "val_bpb_trained": bpb + 0.05,
               "val_bpb_twin": bpb + 0.45, "train_slice_bpb": bpb + 0.04, "val_bytes": 50_000}
    report = RunReport(status="completed", stage="score", bpb=bpb, final_score=final, bytes_scored=800_000,
                       tokens_scored=800_000, batches=100, batch_size=8, seq_len=1001, tokenizer="bytes",
                       model_params=66_049, device="cpu", wall_seconds=12.5, train_seconds=10.0,
                       tokens_per_second=80_000.0, byte_budget=800_000, score=breakdown, heldout=heldout,
                       curve=curve)
    return report


@contextmanager
def serve(app, limits: ConnectionLimits | None = None) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, in a background thread, behind the connection guard as in
    production (`limits`, or the defaults); stopped on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           http=guarded(limits or ConnectionLimits())))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@dataclass
class Api:
    url: str
    http: httpx.Client
    backend: StoreBackend
    allowlist: Path

    def miner(self) -> Keypair:
        """A fresh keypair, registered: added to the allow-list (the server reads the file again on change)."""
        keypair = new_keypair()
        with self.allowlist.open("a") as allowed:
            allowed.write(f"{keypair.ss58_address}\n")
        return keypair

    def submit(self, keypair: Keypair, zipped: bytes) -> httpx.Response:
        body, headers = signed_json(keypair, zipped)
        return self.http.post("/v1/submissions", content=body, headers=headers)

    def wait_settled(self, submission_id: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.http.get(f"/v1/submissions/{submission_id}").json()
            if status["status"] in TERMINAL_STATUSES or time.monotonic() > deadline:
                return status
            time.sleep(0.05)


@contextmanager
def scored_backend(path: Path) -> Iterator[StoreBackend]:
    """A StoreBackend on a fresh DuckDB file at `path`, with a FakeScheduler completing what is submitted."""
    store = Store(path)
    backend = StoreBackend(store, Settings(byte_budget=800_000))
    scheduler = FakeScheduler(backend)
    scheduler.start()
    try:
        yield backend
    finally:
        scheduler.stop.set()
        scheduler.join(10)
        store.close()


def new_allowlist(directory: Path) -> Path:
    path = directory / "allowed-hotkeys.txt"
    path.write_text("# the test miners, added by Api.miner()\n")
    return path


@contextmanager
def api_server(backend: StoreBackend, allowlist: Path, **overrides: Any) -> Iterator[Api]:
    """The app over `backend` with server_settings(allowlist, **overrides), served on loopback, and a client."""
    with serve(create_app(backend, server_settings(allowlist, **overrides))) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        yield Api(url, http, backend, allowlist)
