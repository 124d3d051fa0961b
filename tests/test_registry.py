"""Who may submit, and what a client can make the server store: the registry of hotkeys (metagraph snapshot,
allow-list, open), the per-address limit in front of authentication, and the bound on stored rejections — through
the real app on loopback with real signatures, and `prism-ray registry sync` without the bittensor SDK."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api_helpers import api_server, bundle_zip, new_allowlist, new_keypair, scored_backend, signed_json
from prism_ray.access.auth import sign_request
from prism_ray.access.registry import SNAPSHOT_FORMAT, Registry, RegistryError, parse_allowlist, sync
from prism_ray.backend.store_backend import NotStored, StoreBackend
from prism_ray.cli.command import app as cli
from prism_ray.config import RegistrySettings, RejectionCap, Settings
from prism_ray.errors import Reason
from prism_ray.store import Store

BROKEN = "def not_train(ctx):\n    pass\n"


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with scored_backend(tmp_path_factory.mktemp("registry-api") / "prism.duckdb") as backend:
        yield backend


@pytest.fixture(scope="module")
def api(backend, tmp_path_factory):
    with api_server(backend, new_allowlist(tmp_path_factory.mktemp("registry"))) as api:
        yield api


def stored_for(backend: StoreBackend, hotkey: str) -> list:
    with backend.use() as store:
        return store.list_submissions(hotkey=hotkey)


def snapshot_file(path: Path, *hotkeys: str, block: int = 4_200_000) -> Path:
    """A metagraph snapshot in the documented format (docs/operator.md)."""
    path.write_text(json.dumps({"format": SNAPSHOT_FORMAT, "network": "finney", "netuid": 100, "block": block,
                                "synced_at": time.time(), "neurons": [
                                    {"uid": uid, "hotkey": hotkey, "coldkey": new_keypair().ss58_address}
                                    for uid, hotkey in enumerate(hotkeys)]}))
    return path


# --- the registry at the door ------------------------------------------------------------------------------------

def test_an_unregistered_hotkey_is_refused_403_and_nothing_is_stored(api):
    stranger = new_keypair()
    body, headers = signed_json(stranger, bundle_zip("stranger"))
    refused = api.http.post("/v1/submissions", content=body, headers=headers)
    assert refused.status_code == 403, refused.text
    answer = refused.json()
    assert answer["error"] == "registry:unregistered" and answer["id"] is None
    assert [reason["rule"] for reason in answer["reasons"]] == ["registry:unregistered"]
    assert stranger.ss58_address in answer["message"] and "allow-list" in answer["message"]
    broken_body, broken_headers = signed_json(stranger, bundle_zip("stranger-broken", training=BROKEN))
    assert api.http.post("/v1/submissions", content=broken_body, headers=broken_headers).status_code == 403
    assert stored_for(api.backend, stranger.ss58_address) == []  # no submission, no rejection
    assert api.backend.check_nonce(stranger.ss58_address, headers["X-Nonce"], 600)  # its nonce was never stored

    with api.allowlist.open("a") as allowed:  # registered now: the server reads the changed file
        allowed.write(f"{stranger.ss58_address}  # registered later\n")
    accepted = api.submit(stranger, bundle_zip("stranger"))
    assert accepted.status_code == 200 and accepted.json()["hotkey"] == stranger.ss58_address
    assert api.wait_settled(accepted.json()["id"])["status"] == "completed"


def test_a_metagraph_snapshot_admits_its_hotkeys_and_a_missing_one_admits_nobody(backend, api, tmp_path):
    registered, other = new_keypair(), new_keypair()
    snapshot = tmp_path / "metagraph-100.json"
    with api_server(backend, api.allowlist, registry={"mode": "metagraph", "file": snapshot}) as chain:
        missing = chain.submit(registered, bundle_zip("before-sync"))
        assert missing.status_code == 503 and missing.json()["error"] == "registry:unavailable"
        assert "prism-ray registry sync" in missing.json()["message"]
        health = chain.http.get("/health").json()["registry"]
        assert health["mode"] == "metagraph" and health["hotkeys"] is None and "cannot be read" in health["problem"]

        snapshot_file(snapshot, registered.ss58_address)
        accepted = chain.submit(registered, bundle_zip("on-chain"))
        assert accepted.status_code == 200, accepted.text
        refused = chain.submit(other, bundle_zip("off-chain"))
        assert refused.status_code == 403 and "subnet 100 on finney" in refused.json()["message"]
        assert "block 4200000" in refused.json()["message"]
        assert stored_for(backend, other.ss58_address) == []
        health = chain.http.get("/health").json()["registry"]
        assert (health["hotkeys"], health["problem"], health["source"]) == (1, None, str(snapshot))

        snapshot.write_text("{not json")
        broken = chain.submit(registered, bundle_zip("snapshot-broken"))
        assert broken.status_code == 503 and "not a valid metagraph file" in broken.json()["message"]


def test_open_is_only_what_an_operator_sets():
    assert RegistrySettings().mode_for("signed") == "metagraph"
    assert RegistrySettings().mode_for("dev") == "open"  # unsigned names: a list could not hold them to anything
    assert RegistrySettings(mode="allowlist").mode_for("dev") == "allowlist"
    assert Registry.from_settings(RegistrySettings(), "signed", Path("/state")).path == \
        Path("/state/registry/metagraph-100.json")
    Registry("open").admit("anyone")


def test_an_allowlist_names_the_line_of_a_typo():
    good = new_keypair().ss58_address
    assert parse_allowlist(f"# miners\n\n{good}   # alice\n") == {good}
    with pytest.raises(ValueError, match=r"line 3: '5Typo' is not an ss58 address"):
        parse_allowlist(f"{good}\n\n5Typo\n")


# --- the per-address limit, before authentication -----------------------------------------------------------------

def test_one_address_is_limited_before_any_signature_is_checked(backend, api):
    with api_server(backend, api.allowlist, address_rate_limit_burst=3, address_rate_limit_per_minute=1) as door:
        forged = {**sign_request(new_keypair(), b"{}"), "Content-Type": "application/json"}
        stale = sign_request(api.miner(), b"{}", timestamp=int(time.time()) - 3600)
        answers = [door.http.post("/v1/submissions", content=b"{}", headers=headers).status_code
                   for headers in (forged, stale, {})]
        assert answers == [403, 401, 401]  # unregistered, stale, unsigned: each still took a token
        limited = door.submit(door.miner(), bundle_zip("behind-the-crowd"))  # signed and registered, but too late
        assert limited.status_code == 429 and limited.json()["error"] == "rate_limited:address"
        assert "127.0.0.1" in limited.json()["message"] and 1 <= int(limited.headers["Retry-After"]) <= 60


# --- the bound on stored rejections -------------------------------------------------------------------------------

def test_rejections_past_a_hotkeys_bound_are_answered_but_not_stored(backend, api):
    with api_server(backend, api.allowlist, stored_rejections_per_hotkey=2) as bounded:
        miner = bounded.miner()
        answers = [bounded.submit(miner, bundle_zip(f"broken-{n}", training=BROKEN)) for n in range(3)]
        assert [answer.status_code for answer in answers] == [422, 422, 422]
        assert [answer.json()["reasons"][0]["rule"] for answer in answers] == ["contract:missing_symbol"] * 3
        assert [answer.json()["id"] is not None for answer in answers] == [True, True, False]
        assert "not stored: this hotkey has 2 stored rejections" in answers[2].json()["message"]
        assert [record.status for record in stored_for(backend, miner.ss58_address)] == ["rejected", "rejected"]
        assert bounded.submit(miner, bundle_zip("fixed")).status_code == 200  # a valid bundle is still welcome


def test_rejections_past_the_servers_bound_are_not_stored(tmp_path):
    cap = RejectionCap(per_hotkey=10, total=2, window_s=3600)
    reasons = [Reason(rule="intake:not_a_zip", message="not a zip")]
    with Store(tmp_path / "prism.duckdb") as store:
        backend = StoreBackend(store, Settings())
        outcomes = [backend.reject(f"fresh-key-{n}", "x.zip", reasons, None, cap) for n in range(3)]
        assert [type(outcome).__name__ for outcome in outcomes] == ["SubmissionRecord", "SubmissionRecord",
                                                                    "NotStored"]
        assert isinstance(outcomes[2], NotStored) and "the server has 2" in outcomes[2].why
        assert store.stats()["by_status"]["rejected"] == 2


# --- prism-ray registry sync --------------------------------------------------------------------------------------

def test_registry_sync_without_the_sdk_is_a_typed_error_and_writes_nothing(tmp_path):
    assert importlib.util.find_spec("bittensor") is None, "this checks the answer where the SDK is not installed"
    out = tmp_path / "metagraph-100.json"
    result = CliRunner().invoke(cli, ["registry", "sync", "--out", str(out)])
    assert result.exit_code == 1
    assert "[registry:sdk_missing]" in result.stderr and "pip install bittensor" in result.stderr
    assert not out.exists()
    with pytest.raises(RegistryError) as caught:
        sync(RegistrySettings(), out)
    assert caught.value.rule == "registry:sdk_missing"
