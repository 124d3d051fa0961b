"""The real service: a local Ray cluster, the API on Ray Serve with signed sr25519 hotkeys, bundles posted over HTTP,
trained in the sandbox, scored, ranked and weighted — the path `prism-ray serve` and `prism-ray demo` run."""

from __future__ import annotations

import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve

from api_helpers import bundle_zip, new_keypair, signed_json, zip_files
from miners import BIGRAM_ARCHITECTURE, FORBIDDEN_IMPORT, SGD_TRAINING
from prism_ray.access.auth import sign_request
from prism_ray.cli.client import PrismClient
from prism_ray.config import ApiSettings, Settings
from prism_ray.store import TERMINAL_STATUSES
from serve_app.deployment import build_ingress
from serve_app.service import ReplicaBackend, start_service

pytestmark = [pytest.mark.cluster, pytest.mark.sandbox]

TOKEN = "t0ken-for-tests"
BURST = 5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def trainable_zip(tag: str) -> bytes:
    """The tiny bigram learner on bytes; `tag` keeps its code distinct."""
    return zip_files({"architecture.py": f"# {tag}\n{BIGRAM_ARCHITECTURE}", "training.py": SGD_TRAINING,
                      "prism.yaml": f"name: {tag}\ntokenizer: bytes\n"})


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    settings = Settings(byte_budget=10_000, runner_threads=1, cache_dir=tmp_path_factory.mktemp("state"))
    settings.gate.mode = "off"
    settings.replicas.mode = "off"  # seed replicas would re-run the top scores beside the work under test
    settings.cluster.dashboard = True  # the banner test reads it (conftest turns it off for the other clusters)
    settings.scoring.heldout_byte_budget = 10_000
    # Open registry and no practical per-address limit: every miner here is a fresh key on 127.0.0.1.
    api = ApiSettings(internal_token=TOKEN, rate_limit_burst=BURST, address_rate_limit_burst=10_000,
                      registry={"mode": "open"})
    running = start_service(None, settings, api, "127.0.0.1", free_port())
    yield running
    running.close()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service.url, timeout=120) as client:
        yield client


def post(http: httpx.Client, keypair, zipped: bytes) -> httpx.Response:
    body, headers = signed_json(keypair, zipped)
    return http.post("/v1/submissions", content=body, headers=headers)


def settle(http: httpx.Client, ids: list[str], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        states = [http.get(f"/v1/submissions/{submission_id}").json() for submission_id in ids]
        if all(state["status"] in TERMINAL_STATUSES for state in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def audited_weights(http: httpx.Client, timeout: float) -> httpx.Response:
    """get_weights once no board entry waits for its audit any more."""
    deadline = time.monotonic() + timeout
    while True:
        weights = http.get("/internal/v1/get_weights", headers={"Authorization": f"Bearer {TOKEN}"})
        if not weights.json()["pending_audits"] or time.monotonic() > deadline:
            return weights
        time.sleep(0.5)


def test_a_signed_post_is_scored_ranked_and_weighted(service, http):
    miner = new_keypair()
    with PrismClient(service.url, keypair=miner) as client:
        accepted = client.submit(trainable_zip("full-path"), filename="bigram.zip")
        assert (accepted["status"], accepted["hotkey"]) == ("pending", miner.ss58_address)
        final = client.wait(accepted["id"], poll_s=0.5, timeout_s=240)
        assert final["status"] == "completed", final
        assert final["scores"]["bpb"] > 0 and final["scores"]["heldout_delta"] is not None
        assert [event["kind"] for event in final["events"]][-1] == "completed"
        curve = client.curve(accepted["id"])
        assert 2 <= len(curve["points"]) <= 500 and curve["points"][-1]["bytes"] >= 10_000
        board = client.leaderboard()
    assert [entry["submission_id"] for entry in board["entries"]] == [accepted["id"]]
    weights = audited_weights(http, timeout=240)  # the top entry is re-run before it earns
    after = http.get(f"/v1/submissions/{accepted['id']}").json()
    assert weights.status_code == 200 and weights.json()["weights"] == {miner.ss58_address: 1.0}, \
        (weights.json(), after["status"], after["reasons"], http.get("/v1/leaderboard").json())
    assert http.get("/internal/v1/get_weights").status_code == 401
    wrong = http.get("/internal/v1/get_weights", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    page = http.get(f"/submissions/{accepted['id']}")
    assert page.status_code == 200 and "full-path" in page.text
    node_id = ray.get(service.cluster.store.runs.remote(accepted["id"]))[-1].node
    [node] = [node for node in ray.nodes() if node["NodeID"] == node_id]
    assert node["NodeManagerAddress"] in page.text and node_id not in page.text  # where it ran, as a person reads it

    again = post(http, miner, trainable_zip("full-path"))  # identical code, fresh nonce: the same submission back
    assert again.status_code == 200 and again.json()["reused"] is True and again.json()["id"] == accepted["id"]


def test_forged_stale_replayed_and_wrong_body_signatures_are_refused(http):
    miner = new_keypair()
    body, headers = signed_json(miner, bundle_zip("replay", training="def train(ctx):\n    import os\n"))
    first = http.post("/v1/submissions", content=body, headers=headers)
    assert first.status_code == 200, first.text
    replayed = http.post("/v1/submissions", content=body, headers=headers)
    assert replayed.status_code == 409 and replayed.json()["error"] == "auth:replayed_nonce"

    forged = {**sign_request(new_keypair(), body), "X-Hotkey": miner.ss58_address}
    response = http.post("/v1/submissions", content=body, headers={"Content-Type": "application/json", **forged})
    assert response.status_code == 401 and response.json()["error"] == "auth:bad_signature"
    other_body, _ = signed_json(miner, bundle_zip("other-body"))
    signed_for_other = sign_request(miner, other_body)
    response = http.post("/v1/submissions", content=body,
                         headers={"Content-Type": "application/json", **signed_for_other})
    assert response.status_code == 401 and response.json()["error"] == "auth:bad_signature"
    stale = sign_request(miner, body, timestamp=int(time.time()) - 600)
    response = http.post("/v1/submissions", content=body, headers={"Content-Type": "application/json", **stale})
    assert response.status_code == 401 and response.json()["error"] == "auth:stale_timestamp"
    unsigned = http.post("/v1/submissions", content=body, headers={"Content-Type": "application/json"})
    assert unsigned.status_code == 401 and unsigned.json()["error"] == "auth:missing_headers"
    [state] = settle(http, [first.json()["id"]], timeout=120)  # the one accepted: the check stage refuses `os`
    assert (state["hotkey"], state["status"], state["reasons"][0]["rule"]) == (miner.ss58_address, "rejected",
                                                                               "sandbox:import")


def test_oversized_broken_and_too_frequent_posts_get_413_422_and_429(http):
    miner = new_keypair()
    huge = b"\0" * (ApiSettings().max_body_bytes + 1)
    too_large = http.post("/v1/submissions", content=huge,
                          headers={"Content-Type": "application/zip", **sign_request(miner, huge)})
    assert too_large.status_code == 413 and too_large.json()["error"] == "request:too_large"

    broken = [post(http, miner, bundle_zip(f"broken-{n}", training="def not_train(ctx):\n    pass\n"))
              for n in range(BURST)]
    assert [response.status_code for response in broken] == [422] * BURST
    body = broken[0].json()
    assert [(reason["rule"], reason["file"]) for reason in body["reasons"]] == [("contract:missing_symbol",
                                                                                  "training.py")]
    stored = http.get(f"/v1/submissions/{body['id']}").json()
    assert (stored["status"], stored["hotkey"], stored["reasons"]) == ("rejected", miner.ss58_address,
                                                                       body["reasons"])
    limited = post(http, miner, bundle_zip("one-too-many"))
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert post(http, new_keypair(), bundle_zip("rate-other", training=FORBIDDEN_IMPORT)).status_code == 200


def test_the_serve_proxy_refuses_oversized_heads(service):
    """The connection guard runs in Ray Serve's proxy too (the proxy callback `start_service` sets)."""
    host, port = service.url.removeprefix("http://").split(":")
    for head, error in ((b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
                         b"request:headers_too_large"),
                        (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500))
                         + b"\r\n", b"request:too_many_headers")):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            try:
                sock.sendall(head)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 431 ") and error in answer, answer[:300]


def test_the_banner_says_the_dashboard_asks_for_a_token(service):
    """Ray turns on token auth for the clusters it starts: the dashboard's data answers 401, and the banner says
    why."""
    dashboard = re.search(r"Ray dashboard at (http://\S+)", service.cluster.notice)
    assert dashboard and "`ray get-auth-token` prints it" in service.cluster.notice, service.cluster.notice
    assert httpx.get(f"{dashboard.group(1)}/api/cluster_status", timeout=30).status_code == 401


def test_a_server_with_public_submissions_off_answers_404(service, http):
    closed = ApiSettings(internal_token=TOKEN, public_submissions=False)
    serve.run(build_ingress(ReplicaBackend(service.cluster.settings), closed), name="closed", route_prefix="/closed")
    try:
        body, headers = signed_json(new_keypair(), bundle_zip("closed"))
        answer = http.post("/closed/v1/submissions", content=body, headers=headers)
        assert answer.status_code == 404 and answer.json()["error"] == "submissions_disabled"
        assert http.get("/closed/v1/leaderboard").status_code == 200
        assert http.get("/closed/v1/submissions/sub_missing").status_code == 404
    finally:
        serve.delete("closed")


TRAINS_EVERY = 100  # of the 200 posts, these train for real


def test_200_concurrent_posts_are_all_stored_once_and_all_reach_a_terminal_state(service, http):
    """200 miners post at once through the real Serve ingress: every hundredth bundle trains for real, the others
    break a static-sandbox rule (rejected by the check task on the cluster) or the bundle contract (422 at intake).
    (Trainings are a few CPU-seconds each on the suite's 2-core machine: two keep its budget.)"""
    miners = [new_keypair() for _ in range(200)]

    def bundle(n: int) -> bytes:
        if n % TRAINS_EVERY == 0:
            return trainable_zip(f"crowd-{n}")
        if n % 10 == 1:
            return bundle_zip(f"crowd-{n}", training="def not_train(ctx):\n    pass\n")
        return bundle_zip(f"crowd-{n}", training=f"# crowd-{n}\n{FORBIDDEN_IMPORT}")

    requests = [signed_json(miner, bundle(n)) for n, miner in enumerate(miners)]
    with httpx.Client(base_url=service.url, timeout=300, limits=httpx.Limits(max_connections=32)) as client, \
            ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda request: client.post("/v1/submissions", content=request[0],
                                                              headers=request[1]), requests))
    expected = [422 if n % 10 == 1 else 200 for n in range(200)]
    assert [response.status_code for response in responses] == expected, [r.text for r in responses if
                                                                          r.status_code >= 500][:3]
    ids = [response.json()["id"] for response in responses]
    assert len(set(ids)) == 200
    accepted = [(response, miner) for response, miner in zip(responses, miners, strict=True)
                if response.status_code == 200]
    assert all(response.json()["hotkey"] == miner.ss58_address for response, miner in accepted)

    states = settle(http, ids, timeout=600)
    outcome = {"completed" if n % TRAINS_EVERY == 0 else "rejected" for n in range(200)}
    assert {state["status"] for state in states} == outcome
    assert [state["status"] for state in states] == ["completed" if n % TRAINS_EVERY == 0 else "rejected" for n in range(200)]
    for n, state in enumerate(states):
        rule = state["reasons"][0]["rule"] if state["reasons"] else None
        expected_rule = None if n % TRAINS_EVERY == 0 else "contract:missing_symbol" if n % 10 == 1 else "sandbox:import"
        assert rule == expected_rule, state
        if n % TRAINS_EVERY == 0:
            runs = ray.get(service.cluster.store.runs.remote(state["id"]))
            assert [run.attempt for run in runs] == [1] and runs[0].status == "completed"
    store = service.cluster.store
    stored = ray.get([store.list_submissions.remote(None, miner.ss58_address, 10) for miner in miners])
    assert [[record.id for record in records] for records in stored] == [[submission_id] for submission_id in ids]
    ranked = {entry["hotkey"] for entry in http.get("/v1/leaderboard").json()["entries"]}
    assert {miners[n].ss58_address for n in range(0, 200, TRAINS_EVERY)} <= ranked
    stats = ray.get(service.cluster.scheduler.stats.remote())
    assert stats["max_in_flight"] <= stats["capacity"] == 1

