"""The HTTP API for real: the app served by uvicorn on 127.0.0.1 over a StoreBackend on a DuckDB file, signed
requests with real sr25519 keys of registered miners, and a small scheduler thread that scores pending submissions
(no training; the bundle it scores is shown to train for real by the first test)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import select
import socket
import time
import zipfile

import httpx
import pytest
import schemathesis
import typer
from bittensor_wallet import Keypair
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance
from typer.testing import CliRunner

from api_helpers import (
    BIGRAM_ARCHITECTURE,
    TOKEN,
    api_server,
    bundle_zip,
    fake_result,
    new_allowlist,
    new_keypair,
    scored_backend,
    serve,
    signed_json,
)
from prism_ray.access.auth import sign_request
from prism_ray.backend.queue_eta import plan_queue
from prism_ray.cli.client import bundle_bytes
from prism_ray.cli.client_commands import register
from prism_ray.config import ApiSettings, Settings
from prism_ray.evaluation.pipeline import evaluate
from prism_ray.store import QueueSnapshot, RunRecord, Store, SubmissionRecord
from serve_app import StoreBackend, create_app
from serve_app.limits import TokenBuckets


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with scored_backend(tmp_path_factory.mktemp("api") / "prism.duckdb") as backend:
        yield backend


@pytest.fixture(scope="module")
def api(backend, tmp_path_factory):
    with api_server(backend, new_allowlist(tmp_path_factory.mktemp("registry"))) as api:
        yield api


@pytest.fixture
def api_with(backend, api):
    """Another app over the same store and allow-list, with other settings."""
    return lambda **overrides: api_server(backend, api.allowlist, **overrides)


# --- the helper's bundle is real ---------------------------------------------------------------------------------

@pytest.mark.sandbox
def test_the_helper_bundle_passes_the_check_trains_and_is_scored(tmp_path):
    """The bundle every test here posts, run through the real pipeline (static check, sandboxed probe, training,
    held-out, score): what the fake scheduler below stands in for would really complete it."""
    settings = Settings(byte_budget=4_000, runner_threads=1, cache_dir=tmp_path)
    settings.gate.mode = "off"
    settings.scoring.heldout_byte_budget = 2_000
    report = evaluate(bundle_zip("helper"), settings)
    assert (report.status, report.stage, report.reasons) == ("completed", "score", []), report.reasons
    assert report.bpb is not None and report.bytes_scored >= 4_000
    assert report.curve[-1]["bpb"] < report.curve[0]["bpb"] - 0.1  # it learned: the running bpb falls
    assert report.model_dump(mode="json")["heldout"]["status"] == "completed"


# --- the full path ------------------------------------------------------------------------------------------------

def test_a_submission_goes_from_post_to_scores_leaderboard_and_weights(api):
    miner = api.miner()
    accepted = api.submit(miner, bundle_zip("full-path"))
    assert accepted.status_code == 200, accepted.text
    body = accepted.json()
    assert (body["status"], body["reused"], body["hotkey"]) == ("pending", False, miner.ss58_address)

    status = api.wait_settled(body["id"])
    assert status["status"] == "completed"
    assert status["scores"]["bpb"] == pytest.approx(fake_result(body["id"]).bpb)
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
    miner = api.miner()
    zipped = bundle_zip("raw-zip")
    headers = {"Content-Type": "application/zip", "X-Submission-Filename": "raw.zip", **sign_request(miner, zipped)}
    response = api.http.post("/v1/submissions", content=zipped, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "raw.zip"
    assert api.wait_settled(response.json()["id"])["status"] == "completed"


# --- the read model -----------------------------------------------------------------------------------------------

def test_the_read_model_shows_a_score_once_it_lands_and_keeps_what_did_not_change(tmp_path):
    """Reads come from the model the server keeps; a look at the store's changes drops exactly what they touch."""
    with Store(tmp_path / "prism.duckdb") as store:
        backend = StoreBackend(store, Settings(), max_staleness_s=3600)  # looks at the store only when told to
        scored, waiting = (backend.submit(f"miner-{tag}", f"{tag}.zip", bundle_zip(tag)) for tag in ("lands", "waits"))
        assert backend.leaderboard() == [] and backend.get_submission(scored.id).status == "pending"
        assert [item.record.id for item in backend.queue().items] == [scored.id, waiting.id]
        waiting_view = backend.detail(waiting.id)
        with backend.use() as owner:  # the scheduler's side: claim and score one, as the cluster would
            owner.claim_next("scorer", lease_seconds=60, limit=1)
            assert owner.complete(scored.id, "scorer", fake_result(scored.id))
        assert backend.get_submission(scored.id).status == "pending"  # not looked yet: the kept view

        backend.reads.refresh(force=True)
        assert backend.get_submission(scored.id).status == "completed"
        assert [entry.submission_id for entry in backend.leaderboard()] == [scored.id]
        assert [item.record.id for item in backend.queue().items] == [waiting.id]
        assert len(backend.curve(scored.id)) == backend.settings.curve_points < len(fake_result(scored.id).curve)  # thinned once, kept
        assert backend.detail(waiting.id) is waiting_view  # untouched by the change: still the kept object

        board = backend.leaderboard()
        with backend.use() as owner:
            assert owner.claim_next("scorer", lease_seconds=60, limit=1)[0].id == waiting.id
        backend.reads.refresh(force=True)
        assert backend.leaderboard() is board  # nothing completed: the board was kept
        assert backend.get_submission(waiting.id).status == "running" and backend.stats()["in_flight"] == 1


def test_the_queue_estimate_fills_the_slots_in_order():
    """Two running (claimed 100 s and 250 s ago), three waiting; runs take the median of the recent ones (300 s)."""
    def record(n: int, status: str) -> SubmissionRecord:
        return SubmissionRecord(id=f"sub_{n}", seq=n, hotkey="h", filename=None, bundle_sha256=None, fingerprint=None,
                                name=None, tokenizer=None, status=status, stage="train", attempt=1, max_attempts=3,
                                lease_owner=None, lease_expires_at=None, metadata=None, created_at=0.0,
                                updated_at=0.0, finished_at=None, duplicate_of=None)

    def run(n: int, started_at: float, **progress: float) -> RunRecord:
        return RunRecord(id=f"run_{n}", submission_id=f"sub_{n}", attempt=1, started_at=started_at, status="running",
                         **progress)

    def snapshot(running: list, waiting: list, runs: dict, recent: list[float]) -> QueueSnapshot:
        return QueueSnapshot(running=running, current_runs=runs, pending=waiting, recent_run_seconds=recent)

    running, waiting = [record(1, "running"), record(2, "running")], [record(n, "pending") for n in (3, 4, 5)]
    runs = {"sub_1": run(1, 900.0), "sub_2": run(2, 750.0)}
    items, typical = plan_queue(snapshot(running, waiting, runs, [280.0, 300.0, 900.0]), now=1000.0)
    assert typical == 300.0
    assert [(item.record.id, item.position, item.starts_in, item.done_in) for item in items] == [
        ("sub_1", 1, 0.0, 200.0), ("sub_2", 2, 0.0, 50.0),  # 300 s each, from when it was claimed
        ("sub_3", 3, 50.0, 350.0), ("sub_4", 4, 200.0, 500.0), ("sub_5", 5, 350.0, 650.0)]  # the earliest free slot
    assert [item.starts_in for item in plan_queue(snapshot([], waiting, {}, []), now=0.0)[0]] == [None, None, None]
    # With progress, a run's own rate decides: sub_1 scored 100,000 of 300,000 bytes in its first 50 s (reported
    # 10 s ago), so 200,000 more take 100 s, 90 s from now; one other run's 14 s says nothing about it.
    runs["sub_1"] = run(1, 900.0, progress_at=950.0, progress_bytes=100_000)
    items, _ = plan_queue(snapshot(running, waiting, runs, [14.0]), now=960.0, byte_budget=300_000)
    assert items[0].done_in == 90.0 and items[2].starts_in == items[1].done_in


# --- refusals -----------------------------------------------------------------------------------------------------

def test_an_oversized_streamed_body_is_cut_off_while_reading(api_with):
    limit, total = 64_000, 256 << 20
    with api_with(max_body_bytes=limit) as small:
        port = int(small.url.rsplit(":", 1)[1])
        headers = sign_request(small.miner(), b"")  # the size is refused before the signature is checked
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
    miner = api.miner()
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


def test_a_malformed_request_is_422_and_any_other_media_type_is_read_as_the_zip(api):
    miner = api.miner()
    body = json.dumps({"filename": "x.zip"}).encode()
    response = api.http.post("/v1/submissions", content=body,
                             headers={"Content-Type": "application/json", **sign_request(miner, body)})
    assert response.status_code == 422 and response.json()["error"] == "request:invalid"
    assert "code" in response.json()["reasons"][0]["message"]
    assert response.json()["detail"] == response.json()["message"]  # where PRISM's clients read it
    text = b"hello"
    response = api.http.post("/v1/submissions", content=text,
                             headers={"Content-Type": "text/plain", **sign_request(miner, text)})
    assert response.status_code == 422 and response.json()["reasons"][0]["rule"] == "intake:not_a_zip"


def test_a_hotkey_over_its_rate_is_answered_429_with_retry_after(api_with):
    with api_with(rate_limit_burst=2, rate_limit_per_minute=1) as limited:
        miner, other = limited.miner(), limited.miner()
        assert [limited.submit(miner, bundle_zip(f"rate-{i}")).status_code for i in range(2)] == [200, 200]
        refused = limited.submit(miner, bundle_zip("rate-2"))
        assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert limited.submit(other, bundle_zip("rate-other")).status_code == 200  # buckets are per hotkey


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
    with api_with(internal_token=None) as unconfigured:
        closed = unconfigured.http.get("/internal/v1/get_weights", headers={"Authorization": "Bearer anything"})
        assert closed.status_code == 503 and "PRISM_INTERNAL_TOKEN" in closed.json()["message"]


def test_replayed_forged_and_stale_requests_are_refused(api):
    miner = api.miner()
    body, headers = signed_json(miner, bundle_zip("replay"))
    assert api.http.post("/v1/submissions", content=body, headers=headers).status_code == 200
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
    with caplog.at_level(logging.WARNING, logger="prism_ray.api"), api_with(auth_mode="dev", registry={}) as dev:  # dev: open by default
        response = dev.http.post("/v1/submissions", content=bundle_zip("dev-mode"),
                                 headers={"Content-Type": "application/zip", "X-Hotkey": "local-miner"})
        assert response.status_code == 200 and response.headers["X-Prism-Auth"] == "dev"
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
    with api.allowlist.open("a") as allowed:
        allowed.write(Keypair.create_from_mnemonic(mnemonic).ss58_address + "\n")
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
    (broken / "architecture.py").write_text(BIGRAM_ARCHITECTURE)
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


# --- PRISM's wire format: the answers a real server's conformance run (test_conformance.py) does not reach ---------

def bridge_post(api, zipped: bytes, hotkey: str, **headers: str) -> httpx.Response:
    """An upload as the BASE platform forwards it: bearer, slug, verified hotkey and nonce, the body's sha256."""
    base = {"Authorization": f"Bearer {TOKEN}", "X-Base-Challenge-Slug": "prism", "X-Base-Verified-Hotkey": hotkey,
            "X-Base-Verified-Nonce": os.urandom(6).hex(), "X-Base-Request-Hash": hashlib.sha256(zipped).hexdigest(),
            "Content-Type": "application/zip", "X-Submission-Filename": "bridged.zip"}
    return api.http.post("/internal/v1/bridge/submissions", content=zipped,
                         headers={k: v for k, v in {**base, **headers}.items() if v is not None})


def test_the_bridge_checks_token_slug_request_hash_registry_and_nonce(api):
    miner, zipped = api.miner(), bundle_zip("bridge-checks")
    refusals = [({"Authorization": None}, 401, "auth:bad_token"),
                ({"X-Base-Challenge-Slug": "agent-challenge"}, 400, "request:challenge_slug"),
                ({"X-Base-Challenge-Slug": None}, 400, "request:challenge_slug"),
                ({"X-Base-Request-Hash": hashlib.sha256(b"another body").hexdigest()}, 400, "request:hash_mismatch"),
                ({"X-Base-Request-Hash": None}, 400, "request:hash_mismatch"),
                ({"X-Base-Verified-Hotkey": "not-ss58"}, 422, "request:invalid"),
                ({"X-Base-Verified-Hotkey": new_keypair().ss58_address}, 403, "registry:unregistered")]
    for changed, code, error in refusals:
        response = bridge_post(api, zipped, miner.ss58_address, **changed)
        assert (response.status_code, response.json()["error"]) == (code, error), (changed, response.text)
    accepted = bridge_post(api, zipped, miner.ss58_address, **{"X-Base-Verified-Nonce": "base-n1"})
    assert accepted.status_code == 200 and accepted.json()["hotkey"] == miner.ss58_address, accepted.text
    assert accepted.json()["filename"] == "bridged.zip"
    replay = bridge_post(api, bundle_zip("bridge-replay"), miner.ss58_address, **{"X-Base-Verified-Nonce": "base-n1"})
    assert (replay.status_code, replay.json()["error"]) == (409, "auth:replayed_nonce")


def test_internal_routes_check_the_slug_when_sent(api):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    wrong = api.http.get("/internal/v1/get_weights", headers={**bearer, "X-Base-Challenge-Slug": "other"})
    assert (wrong.status_code, wrong.json()["error"]) == (400, "request:challenge_slug")
    assert "detail" in wrong.json()
    right = api.http.get("/internal/v1/get_weights", headers={**bearer, "X-Base-Challenge-Slug": "prism"})
    assert right.status_code == 200 and right.json()["challenge_slug"] == "prism"
    assert api.http.get("/internal/v1/get_weights", headers=bearer).status_code == 200  # prism-ray's own callers


def test_a_duplicate_is_rejected_for_prism_clients_and_a_duplicate_in_state(api):
    first, second, zipped = api.miner(), api.miner(), bundle_zip("copied-whole")
    original = api.submit(first, zipped).json()
    copy = api.submit(second, zipped)
    assert copy.status_code == 200
    assert (copy.json()["status"], copy.json()["state"], copy.json()["duplicate_of"]) == \
        ("rejected", "duplicate", original["id"])
    status = api.http.get(f"/v1/submissions/{copy.json()['id']}").json()
    assert (status["status"], status["state"]) == ("rejected", "duplicate")
    assert status["error"].startswith(f"duplicate of {original['id']}") and status["final_score"] is None


def test_a_curve_is_404_until_scored_and_a_bad_timestamp_400(api):
    miner = api.miner()
    body = json.dumps({"code": "not base64 at all!"}).encode()  # no filename: PRISM's default
    rejected = api.http.post("/v1/submissions", content=body,
                             headers={"Content-Type": "application/json", **sign_request(miner, body)}).json()
    assert rejected["status"] == "rejected" and rejected["id"]
    curve = api.http.get(f"/v1/submissions/{rejected['id']}/curve")
    assert (curve.status_code, curve.json()["error"]) == (404, "curve:not_scored")
    status = api.http.get(f"/v1/submissions/{rejected['id']}").json()
    assert status["error"].startswith("intake:bad_base64") and status["code_hash"] == ""
    bad_time = {**sign_request(miner, body), "X-Timestamp": "soon"}
    response = api.http.post("/v1/submissions", content=body, headers={"Content-Type": "application/json", **bad_time})
    assert (response.status_code, response.json()["error"]) == (400, "auth:bad_timestamp")


def test_the_board_defaults_to_the_current_epoch(api):
    miner = api.miner()
    accepted = api.submit(miner, bundle_zip("board-epochs")).json()
    api.wait_settled(accepted["id"])
    current = api.http.get("/v1/epochs/current").json()["epoch_id"]
    board = api.http.get("/v1/leaderboard").json()
    assert (board["epoch_id"], board["epoch"], board["all_epochs"]) == (current, current, False)
    row = next(entry for entry in board["entries"] if entry["submission_id"] == accepted["id"])
    assert row["score"] == row["final_score"]
    assert api.http.get("/v1/leaderboard", params={"epoch_id": current + 1}).json()["entries"] == []
    everything = api.http.get("/v1/leaderboard", params={"all_epochs": "true"}).json()
    assert (everything["epoch"], everything["epoch_id"], everything["all_epochs"]) == (None, current, True)
    assert accepted["id"] in [entry["submission_id"] for entry in everything["entries"]]
