"""The HTTP API for real: the app served by uvicorn on 127.0.0.1 over a StoreBackend on a DuckDB file, signed
requests with real sr25519 keys, and a small scheduler thread that scores pending submissions (no training)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import select
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
import typer
import uvicorn
from bittensor_wallet import Keypair
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance
from typer.testing import CliRunner

from api_helpers import LINEAR_ARCHITECTURE, bundle_zip, new_keypair, signed_json
from prism_ray.auth import sign_request
from prism_ray.client import bundle_bytes
from prism_ray.client_cli import register
from prism_ray.config import Settings
from prism_ray.report import RunReport
from prism_ray.store import TERMINAL_STATUSES, Store
from serve_app import ApiSettings, StoreBackend, create_app
from serve_app.app import TokenBuckets

TOKEN = "internal-test-token"
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
                    report, score, curve = fake_result(record.id)
                    store.complete(record.id, "fake-scheduler", report, score, curve)
                for audit in store.claim_audits("fake-scheduler", lease_seconds=60, limit=64):  # a re-run reproduces
                    store.finish_audit(audit.id, "fake-scheduler", fake_result(audit.submission_id)[0])


def fake_result(submission_id: str) -> tuple[RunReport, dict, list[dict]]:
    bpb = 1.0 + int(hashlib.sha256(submission_id.encode()).hexdigest()[:4], 16) / 65536
    curve = [{"bytes": 1000 * (i + 1), "bpb": bpb + 1.0 / (i + 1)} for i in range(800)]
    curve[-1]["bpb"] = bpb
    final = 1.0 / (1.0 + bpb)
    report = RunReport(status="completed", stage="score", bpb=bpb, final_score=final, bytes_scored=800_000,
                       tokens_scored=800_000, batches=100, batch_size=8, seq_len=1001, tokenizer="bytes",
                       model_params=66_049, device="cpu", wall_seconds=12.5, train_seconds=10.0,
                       tokens_per_second=80_000.0, byte_budget=800_000,
                       score={"final_score": final, "penalty": 1.0, "anomaly": 1, "tie_break": 0.0, "flags": []},
                       heldout={"status": "completed", "heldout_delta": 0.4, "gap": 0.01})
    score = {"bpb": bpb, "final_score": final, "penalty": 1.0, "anomaly": 1.0, "tie_break": 0.0,
             "heldout_delta": 0.4, "gap": 0.01}
    return report, score, curve


@contextmanager
def serve(app) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, in a background thread; stopped on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
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


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> Iterator[StoreBackend]:
    store = Store(tmp_path_factory.mktemp("api") / "prism.duckdb")
    backend = StoreBackend(store, Settings(byte_budget=800_000))
    scheduler = FakeScheduler(backend)
    scheduler.start()
    yield backend
    scheduler.stop.set()
    scheduler.join(10)
    store.close()


@pytest.fixture(scope="module")
def api(backend) -> Iterator[Api]:
    with serve(create_app(backend, ApiSettings(internal_token=TOKEN))) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        yield Api(url, http, backend)


@pytest.fixture
def api_with(backend):
    """A second app over the same store with other settings."""
    @contextmanager
    def start(**overrides) -> Iterator[Api]:
        with serve(create_app(backend, ApiSettings(**overrides))) as url, \
                httpx.Client(base_url=url, timeout=30) as http:
            yield Api(url, http, backend)
    return start


# --- the full path ------------------------------------------------------------------------------------------------

def test_a_submission_goes_from_post_to_scores_leaderboard_and_weights(api):
    miner = new_keypair()
    accepted = api.submit(miner, bundle_zip("full-path"))
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert (body["status"], body["reused"], body["hotkey"]) == ("pending", False, miner.ss58_address)

    status = api.wait_settled(body["id"])
    assert status["status"] == "completed"
    assert status["scores"]["bpb"] == pytest.approx(fake_result(body["id"])[0].bpb)
    assert status["scores"]["heldout_delta"] == pytest.approx(0.4)
    assert status["progress"]["bytes_scored"] == 800_000 and status["progress"]["byte_budget"] == 800_000
    assert [event["kind"] for event in status["events"]] == ["submitted", "claimed", "completed"]

    curve = api.http.get(f"/v1/submissions/{body['id']}/curve").json()
    assert 2 <= len(curve["points"]) <= 500
    assert curve["points"][-1] == {"bytes": 800_000, "bpb": pytest.approx(status["scores"]["bpb"])}
    assert curve["profile"]["tokens_per_second"] == 80_000.0 and curve["profile"]["model_params"] == 66_049
    assert curve["profile"]["device"] == "cpu" and curve["profile"]["wall_seconds"] == 12.5

    board = api.http.get("/v1/leaderboard").json()
    row = next(entry for entry in board["entries"] if entry["hotkey"] == miner.ss58_address)
    assert row["submission_id"] == body["id"] and row["rank"] >= 1
    epoch = api.http.get("/v1/epochs/current").json()
    assert epoch["starts_at"] <= epoch["now"] < epoch["ends_at"]
    assert any(entry["hotkey"] == miner.ss58_address
               for entry in api.http.get("/v1/leaderboard", params={"epoch": epoch["epoch"]}).json()["entries"])
    assert api.http.get("/v1/leaderboard", params={"epoch": epoch["epoch"] - 1}).json()["entries"] == []

    weights = api.http.get("/internal/v1/get_weights", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert weights["dry_run"] is True and weights["epoch"] == epoch["epoch"]
    assert weights["weights"][miner.ss58_address] > 0
    assert sum(weights["weights"].values()) == pytest.approx(1.0)

    again = api.submit(miner, bundle_zip("full-path"))  # identical code, fresh nonce
    assert again.status_code == 200 and again.json()["reused"] is True and again.json()["id"] == body["id"]


def test_a_raw_zip_body_is_accepted(api):
    miner = new_keypair()
    zipped = bundle_zip("raw-zip")
    headers = {"Content-Type": "application/zip", "X-Submission-Filename": "raw.zip", **sign_request(miner, zipped)}
    response = api.http.post("/v1/submissions", content=zipped, headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["filename"] == "raw.zip"
    assert api.wait_settled(response.json()["id"])["status"] == "completed"


# --- refusals -----------------------------------------------------------------------------------------------------

def test_an_oversized_streamed_body_is_cut_off_while_reading(api_with):
    limit, total = 64_000, 256 << 20
    with api_with(max_body_bytes=limit) as small:
        port = int(small.url.rsplit(":", 1)[1])
        headers = sign_request(new_keypair(), b"")  # the size is refused before the signature is checked
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.setblocking(False)
            conn.sendall(f"POST /v1/submissions HTTP/1.1\r\nHost: x\r\nContent-Type: application/zip\r\n{head}"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
            sent, reply, reset, deadline = 0, b"", False, time.monotonic() + 30
            while sent < total and b"\r\n\r\n" not in reply and time.monotonic() < deadline:
                readable, writable, _ = select.select([conn], [conn], [], 1.0)
                try:
                    if readable:
                        data = conn.recv(65536)
                        reply += data
                        if not data:
                            break
                    elif writable:
                        sent += conn.send(chunk)
                except BlockingIOError:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    # The server answered 413 and closed while we were still sending: the kernel may drop the
                    # unread answer on the reset, so the reset itself is the evidence that reading stopped.
                    reset = True
                    break
        assert reply.startswith(b"HTTP/1.1 413") or (reset and not reply), reply[:200]
        assert sent < total // 8, f"the server read on: {sent:,} of {total:,} bytes went out before it answered"

        declared = small.http.post("/v1/submissions", content=b"\0" * (limit + 1),
                                   headers={"Content-Type": "application/zip", **headers})
        assert declared.status_code == 413 and declared.json()["error"] == "request:too_large"


def test_a_broken_bundle_is_answered_422_with_reasons_and_stored(api):
    miner = new_keypair()
    response = api.submit(miner, bundle_zip("broken", training="def not_train(ctx):\n    pass\n"))
    assert response.status_code == 422
    body = response.json()
    assert body["status"] == "rejected" and body["id"]
    assert [reason["rule"] for reason in body["reasons"]] == ["contract:missing_symbol"]
    assert body["reasons"][0]["file"] == "training.py"
    stored = api.http.get(f"/v1/submissions/{body['id']}").json()
    assert (stored["status"], stored["hotkey"]) == ("rejected", miner.ss58_address)
    assert stored["reasons"] == body["reasons"] and stored["events"][0]["kind"] == "rejected"

    garbage = b"definitely not a zip"
    headers = {"Content-Type": "application/zip", **sign_request(miner, garbage)}
    not_zip = api.http.post("/v1/submissions", content=garbage, headers=headers).json()
    assert not_zip["reasons"][0]["rule"] == "intake:not_a_zip"
    body = json.dumps({"filename": "x.zip", "code": "%%% not base64"}).encode()
    headers = {"Content-Type": "application/json", **sign_request(miner, body)}
    bad_base64 = api.http.post("/v1/submissions", content=body, headers=headers)
    assert bad_base64.status_code == 422 and bad_base64.json()["reasons"][0]["rule"] == "intake:bad_base64"
    assert api.backend.get_submission(bad_base64.json()["id"]).status == "rejected"


def test_a_malformed_request_is_422_and_an_unknown_media_type_415(api):
    miner = new_keypair()
    body = json.dumps({"filename": "x.zip"}).encode()
    response = api.http.post("/v1/submissions", content=body,
                             headers={"Content-Type": "application/json", **sign_request(miner, body)})
    assert response.status_code == 422 and response.json()["error"] == "request:invalid"
    assert "code" in response.json()["reasons"][0]["message"]
    text = b"hello"
    response = api.http.post("/v1/submissions", content=text,
                             headers={"Content-Type": "text/plain", **sign_request(miner, text)})
    assert response.status_code == 415


def test_a_hotkey_over_its_rate_is_answered_429_with_retry_after(api_with):
    with api_with(rate_limit_burst=2, rate_limit_per_minute=1) as limited:
        miner, other = new_keypair(), new_keypair()
        assert [limited.submit(miner, bundle_zip(f"rate-{i}")).status_code for i in range(2)] == [202, 202]
        refused = limited.submit(miner, bundle_zip("rate-2"))
        assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert limited.submit(other, bundle_zip("rate-other")).status_code == 202  # buckets are per hotkey


def test_token_buckets_refill_at_their_rate():
    now = [0.0]
    buckets = TokenBuckets(burst=2, per_minute=6, clock=lambda: now[0])
    assert [buckets.take("a"), buckets.take("a")] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(10.0)  # one token per 10 s
    assert buckets.take("b") == 0.0
    now[0] = 10.0
    assert buckets.take("a") == 0.0 and buckets.take("a") == pytest.approx(10.0)


def test_submissions_answer_404_when_public_submissions_are_off(api_with):
    with api_with(public_submissions=False) as closed:
        response = closed.submit(new_keypair(), bundle_zip("closed"))
        assert response.status_code == 404 and response.json()["error"] == "submissions_disabled"
        assert closed.http.get("/v1/leaderboard").status_code == 200


def test_weights_need_the_bearer_token(api, api_with, monkeypatch):
    assert api.http.get("/internal/v1/get_weights").status_code == 401
    wrong = api.http.get("/internal/v1/get_weights", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert api.http.get("/internal/v1/get_weights", headers={"Authorization": TOKEN}).status_code == 401
    monkeypatch.delenv("PRISM_INTERNAL_TOKEN", raising=False)
    monkeypatch.delenv("PRISM_API_INTERNAL_TOKEN", raising=False)
    with api_with() as unconfigured:
        closed = unconfigured.http.get("/internal/v1/get_weights", headers={"Authorization": "Bearer anything"})
        assert closed.status_code == 503 and "PRISM_INTERNAL_TOKEN" in closed.json()["message"]


def test_replayed_forged_and_stale_requests_are_refused(api):
    miner = new_keypair()
    body, headers = signed_json(miner, bundle_zip("replay"))
    assert api.http.post("/v1/submissions", content=body, headers=headers).status_code == 202
    replay = api.http.post("/v1/submissions", content=body, headers=headers)
    assert replay.status_code == 409 and replay.json()["error"] == "auth:replayed_nonce"

    forged = {**sign_request(new_keypair(), body), "X-Hotkey": miner.ss58_address}
    response = api.http.post("/v1/submissions", content=body, headers={"Content-Type": "application/json", **forged})
    assert response.status_code == 401 and response.json()["error"] == "auth:bad_signature"
    stale = sign_request(miner, body, timestamp=int(time.time()) - 600)
    response = api.http.post("/v1/submissions", content=body, headers={"Content-Type": "application/json", **stale})
    assert response.status_code == 401 and response.json()["error"] == "auth:stale_timestamp"
    assert api.http.post("/v1/submissions", content=body,
                         headers={"Content-Type": "application/json"}).status_code == 401


def test_dev_auth_mode_is_announced(api_with, caplog):
    with caplog.at_level(logging.WARNING, logger="prism_ray.api"), api_with(auth_mode="dev") as dev:
        response = dev.http.post("/v1/submissions", content=bundle_zip("dev-mode"),
                                 headers={"Content-Type": "application/zip", "X-Hotkey": "local-miner"})
        assert response.status_code == 202 and response.headers["X-Prism-Auth"] == "dev"
        assert dev.http.get("/health").headers["X-Prism-Auth"] == "dev"
    assert any("DEV" in record.message for record in caplog.records)


def test_unknown_submissions_are_404_and_meta_routes_answer(api):
    assert api.http.get("/v1/submissions/sub_missing").status_code == 404
    assert api.http.get("/v1/submissions/sub_missing/curve").status_code == 404
    health = api.http.get("/health").json()
    assert health["status"] == "ok" and health["auth_mode"] == "signed"
    assert api.http.get("/version").json()["api"] == "v1"
    for page, asset in (("/docs", "/static-docs/swagger-ui-bundle.js"), ("/redoc", "/static-docs/redoc.standalone.js")):
        html = api.http.get(page).text
        assert asset in html and "cdn." not in html  # served from the package: works without internet
        assert api.http.get(asset).status_code == 200
    assert "/v1/submissions" in api.http.get("/openapi.json").json()["paths"]


# --- the CLI against the live server ------------------------------------------------------------------------------

def test_the_cli_submits_waits_and_reads_the_leaderboard(api, tmp_path):
    mnemonic = Keypair.generate_mnemonic()
    (tmp_path / "key").write_text(mnemonic)
    bundle = tmp_path / "bundle"
    with zipfile.ZipFile(io.BytesIO(bundle_zip("cli"))) as archive:
        archive.extractall(bundle)
    zipped = bundle_bytes(bundle)
    os.utime(bundle / "training.py", (1_000_000, 1_000_000))
    assert bundle_bytes(bundle) == zipped  # zipped deterministically: names and contents only
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["submit", str(bundle), "--url", api.url, "--key-file", str(tmp_path / "key"),
                                 "--wait", "--poll", "0.1", "--timeout", "60"])
    assert result.exit_code == 0, result.output
    assert "completed" in result.output
    submission_id = result.output.split()[1]  # "submitted <id>"
    status = runner.invoke(app, ["status", submission_id, "--url", api.url])
    assert status.exit_code == 0 and "bpb" in status.output and "completed" in status.output
    board = runner.invoke(app, ["leaderboard", "--url", api.url, "--json"])
    hotkey = Keypair.create_from_mnemonic(mnemonic).ss58_address
    assert any(entry["hotkey"] == hotkey for entry in json.loads(board.stdout)["entries"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "architecture.py").write_text(LINEAR_ARCHITECTURE)
    result = runner.invoke(app, ["submit", str(broken), "--url", api.url, "--key-file", str(tmp_path / "key")])
    assert result.exit_code == 1 and "contract:missing_file" in result.output


# --- the schema ---------------------------------------------------------------------------------------------------

schemathesis.serializer.alias("application/zip", "application/octet-stream")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_generated_request_gets_a_server_error(backend, mode):
    """schemathesis generates requests for every operation and body media type of the OpenAPI schema; none may get
    a 5xx, and valid ones must answer as the schema says. A dev-mode app, so generated requests reach intake."""
    scored = backend.submit("fuzz-miner", "fuzz.zip", bundle_zip("fuzz"), None)
    deadline = time.monotonic() + 30
    while backend.get_submission(scored.id).status != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
    app = create_app(backend, ApiSettings(auth_mode="dev", internal_token=TOKEN, rate_limit_burst=10_000,
                                          max_body_bytes=200_000))
    with serve(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()
            inputs = (operation.path_parameters, operation.query, operation.headers, operation.body)
            if mode == GenerationMode.NEGATIVE and not any(len(kind) for kind in inputs):
                continue  # without inputs there is no invalid request to make
            fixed = {}
            if mode == GenerationMode.POSITIVE and "{submission_id}" in operation.path:
                fixed["path_parameters"] = {"submission_id": scored.id}  # random ids would only ever be 404
            if mode == GenerationMode.POSITIVE and operation.path.startswith("/internal/"):
                fixed["headers"] = {"Authorization": f"Bearer {TOKEN}"}
            for media_type in [body.media_type for body in operation.body] or [None]:
                strategy = operation.as_strategy(generation_mode=mode, media_type=media_type, **fixed)

                @given(case=strategy)
                @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                def no_server_error(case):
                    response = case.call(timeout=30)
                    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
                    if mode == GenerationMode.POSITIVE:
                        case.validate_response(response, checks=[response_schema_conformance])

                no_server_error()
