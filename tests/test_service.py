"""The real service: a local Ray cluster, the API on Ray Serve, a bundle posted over HTTP, trained in the
sandbox, scored, ranked and weighted — the path `prism-ray serve` and `prism-ray demo` run."""

from __future__ import annotations

import socket

import httpx
import pytest
import ray

from conftest import bigram_architecture, learner_loop, write_bundle
from prism_ray.client import PrismClient
from prism_ray.config import Settings
from prism_ray.service import start_service
from serve_app.models import ApiSettings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    settings = Settings(byte_budget=10_000, cache_dir=tmp_path_factory.mktemp("state"))
    settings.gate.mode = "off"
    settings.scoring.heldout_byte_budget = 10_000
    running = start_service(None, settings, ApiSettings(auth_mode="dev", internal_token="t0ken-for-tests"),
                            "127.0.0.1", free_port())
    yield running
    running.close()
    assert not ray.is_initialized()


def test_post_scored_leaderboard_weights(service, tmp_path):
    bundle = write_bundle(tmp_path / "bigram", bigram_architecture(), learner_loop(), "name: bigram\ntokenizer: bytes\n")
    with PrismClient(service.url, dev_hotkey="miner-one") as client:
        accepted = client.submit(bundle)
        assert accepted["status"] == "pending"
        final = client.wait(accepted["id"], poll_s=0.5, timeout_s=240)
        assert final["status"] == "completed", final
        assert final["scores"]["bpb"] > 0 and final["scores"]["heldout_delta"] is not None
        board = client.leaderboard()
    assert [entry["submission_id"] for entry in board["entries"]] == [accepted["id"]]
    weights = httpx.get(f"{service.url}/internal/v1/get_weights", headers={"Authorization": "Bearer t0ken-for-tests"})
    assert weights.status_code == 200 and weights.json()["weights"] == {"miner-one": 1.0}
    assert httpx.get(f"{service.url}/internal/v1/get_weights").status_code == 401
    page = httpx.get(f"{service.url}/submissions/{accepted['id']}")
    assert page.status_code == 200 and "bigram" in page.text


def test_broken_bundle_is_answered_422_without_training(service, tmp_path):
    bundle = write_bundle(tmp_path / "broken", "def build_model(ctx)\n", learner_loop())
    with PrismClient(service.url, dev_hotkey="miner-two") as client:
        response = httpx.post(f"{service.url}/v1/submissions", content=_zip(bundle),
                              headers={"Content-Type": "application/zip", "X-Submission-Filename": "broken.zip",
                                       "X-Hotkey": "miner-two"})
        assert response.status_code == 422
        body = response.json()
        assert body["reasons"][0]["rule"] == "contract:syntax" and body["reasons"][0]["file"] == "architecture.py"
        assert client.status(body["id"])["status"] == "rejected"


def _zip(directory):
    from prism_ray.client import bundle_bytes

    return bundle_bytes(directory)
