"""A real `prism-ray serve` driven the way PRISM's own clients and the BASE platform master drive PRISM's service
(docs/api.md, "PRISM compatibility"): the readiness check, a signed upload as PRISM's clients make it, polling to one
of PRISM's terminal statuses, the board, epoch, curve and weights read under PRISM's names, and an upload forwarded
through the BASE bridge. The models below are this suite's own reading of that contract: a change that breaks a real
client fails here. One server for the module, a tiny byte budget."""

from __future__ import annotations

import hashlib
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Literal

import httpx
import pytest
from bittensor_wallet import Keypair
from pydantic import BaseModel

from api_helpers import bundle_zip, new_keypair, zip_files
from cluster_helpers import warm_token_cache
from conftest import EXAMPLES
from miners import QUICKSTART_YAML
from prism_ray.config import Settings
from prism_ray.data.dataset import open_dataset
from prism_ray.data.token_cache import load_token_stream
from serve_helpers import Server, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.sandbox]

TOKEN = "conformance-token"
SLUG = "prism"
TERMINAL = {"completed", "failed", "rejected", "held"}  # what PRISM's pollers stop on


# --- the contract, as the clients read it -------------------------------------------------------------------------

class PrismSubmission(BaseModel):
    id: str
    hotkey: str
    epoch_id: int
    status: Literal["pending", "running", "completed", "failed", "rejected", "held"]
    code_hash: str
    created_at: datetime


class PrismSubmissionStatus(PrismSubmission):
    error: str | None = None
    final_score: float | None = None
    penalty: float | None = None


class PrismBoardEntry(BaseModel):
    rank: int
    hotkey: str
    score: float
    submission_id: str


class PrismBoard(BaseModel):
    epoch_id: int
    entries: list[PrismBoardEntry]


class PrismLossCurve(BaseModel):
    online_loss: list[float]
    covered_bytes_cumulative: list[float]
    step0_loss: float | None
    baseline_nats: float | None
    points: int
    downsampled: bool


class PrismCurve(BaseModel):
    submission_id: str
    loss_curve: PrismLossCurve
    bpb: dict[str, float | None]
    compute: dict[str, float | int | str | None]


class BaseWeights(BaseModel):
    """What the platform's challenge client validates a get_weights answer against."""

    challenge_slug: str
    epoch: int | None = None
    weights: dict[str, float]
    metadata: dict[str, object]


# --- the server -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    warm_token_cache(root / "state")  # bytes, for the signed upload
    load_token_stream(open_dataset(Settings().data_dir), "train", "gpt2", root / "state")  # the quickstart's
    allowlist = root / "allowed-hotkeys.txt"
    allowlist.write_text("")
    server = Server(root, free_port(), "conformance", auth="signed",
                    env={"PRISM_INTERNAL_TOKEN": TOKEN, "PRISM_REGISTRY_MODE": "allowlist",
                         "PRISM_REGISTRY_FILE": str(allowlist)})
    try:
        with server.running() as process:
            yield server, allowlist
            server.stop(process, signal.SIGTERM)
    finally:
        shutil.rmtree(server.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[0].url, timeout=60) as client:
        yield client


def registered(allowlist: Path) -> Keypair:
    keypair = new_keypair()
    with allowlist.open("a") as allowed:
        allowed.write(f"{keypair.ss58_address}\n")
    return keypair


def prism_signed(keypair: Keypair, body: bytes, nonce: str) -> dict[str, str]:
    """The four headers as PRISM's clients sign: an integer timestamp, plain hex, the caller's nonce."""
    timestamp = str(int(time.time()))
    message = f"prism:{keypair.ss58_address}:{nonce}:{timestamp}:{hashlib.sha256(body).hexdigest()}"
    return {"X-Hotkey": keypair.ss58_address, "X-Nonce": nonce, "X-Timestamp": timestamp,
            "X-Signature": keypair.sign(message.encode()).hex()}


def poll_to_terminal(http: httpx.Client, submission_id: str, timeout: float = 300) -> PrismSubmissionStatus:
    deadline = time.monotonic() + timeout
    while True:
        answer = http.get(f"/v1/submissions/{submission_id}")
        assert answer.status_code == 200, answer.text
        status = PrismSubmissionStatus.model_validate(answer.json())
        if status.status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def quickstart_zip() -> bytes:
    """PRISM's quickstart bundle: its prism.yaml verbatim, its TinyModel, a plain loop."""
    return zip_files({"prism.yaml": QUICKSTART_YAML,
                      **{name: (EXAMPLES / "seed-tiny" / name).read_text() for name in ("architecture.py",
                                                                                         "training.py")}})


# --- the checks ------------------------------------------------------------------------------------------------------

def test_the_base_readiness_check_passes(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health.get("slug", SLUG) == SLUG
    version = http.get("/version").json()
    assert version["api_version"] == "1.0"
    assert {"get_weights", "proxy_routes"} <= set(version["capabilities"])


def test_a_prism_client_submits_polls_and_reads_board_epoch_curve(served, http):
    miner, zipped = registered(served[1]), bundle_zip("conformance-signed")
    headers = {"Content-Type": "application/octet-stream", **prism_signed(miner, zipped, "val-n1")}  # no filename
    answer = http.post("/v1/submissions", content=zipped, headers=headers)
    assert answer.status_code == 200, answer.text
    accepted = PrismSubmission.model_validate(answer.json())
    assert (accepted.status, accepted.hotkey) == ("pending", miner.ss58_address)
    assert accepted.code_hash == hashlib.sha256(zipped).hexdigest()
    assert isinstance(answer.json()["created_at"], str) and accepted.created_at.tzinfo is not None  # ISO 8601

    final = poll_to_terminal(http, accepted.id)
    assert final.status == "completed" and final.error is None, final
    assert 0 < final.final_score < 1 and final.epoch_id == accepted.epoch_id

    epoch_id = http.get("/v1/epochs/current").json()["epoch_id"]
    assert epoch_id == accepted.epoch_id
    for params in ({}, {"epoch_id": epoch_id}):
        board = PrismBoard.model_validate(http.get("/v1/leaderboard", params=params).json())
        assert board.epoch_id == epoch_id
        [entry] = [entry for entry in board.entries if entry.submission_id == accepted.id]
        assert (entry.rank, entry.hotkey, entry.score) == (1, miner.ss58_address, pytest.approx(final.final_score))
    assert PrismBoard.model_validate(http.get("/v1/leaderboard", params={"epoch_id": epoch_id - 1}).json()).entries \
        == []

    curve = PrismCurve.model_validate(http.get(f"/v1/submissions/{accepted.id}/curve").json())
    series = curve.loss_curve
    assert curve.submission_id == accepted.id and series.points == len(series.online_loss) >= 2
    assert series.covered_bytes_cumulative[-1] >= 3000 and all(loss > 0 for loss in series.online_loss)
    assert curve.bpb["prequential_bpb"] == http.get(f"/v1/submissions/{accepted.id}").json()["scores"]["bpb"] > 0
    assert curve.compute["model_params"] > 0 and curve.compute["tokens_consumed"] > 0

    replay = http.post("/v1/submissions", content=zipped, headers=headers)
    assert replay.status_code == 409 and replay.json()["detail"]


def test_the_platform_reads_weights(http):
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Base-Challenge-Slug": SLUG, "Accept": "application/json"}
    answer = http.get("/internal/v1/get_weights", headers=headers)
    assert answer.status_code == 200, answer.text
    weights = BaseWeights.model_validate(answer.json())
    assert weights.challenge_slug == SLUG and sum(weights.weights.values()) == pytest.approx(1.0)
    wrong = http.get("/internal/v1/get_weights", headers={**headers, "X-Base-Challenge-Slug": "agent-challenge"})
    assert wrong.status_code == 400


def test_the_quickstart_bundle_scores_through_the_base_bridge(served, http):
    miner, zipped = registered(served[1]), quickstart_zip()
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Base-Challenge-Slug": SLUG,
               "X-Base-Verified-Hotkey": miner.ss58_address, "X-Base-Verified-Nonce": "base-n1",
               "X-Base-Request-Hash": hashlib.sha256(zipped).hexdigest(), "Content-Type": "application/octet-stream",
               "Accept": "application/json", "X-Submission-Filename": "quickstart.zip"}
    answer = http.post("/internal/v1/bridge/submissions", content=zipped, headers=headers)
    assert answer.status_code == 200, answer.text
    accepted = PrismSubmission.model_validate(answer.json())
    assert accepted.hotkey == miner.ss58_address
    final = poll_to_terminal(http, accepted.id)
    assert final.status == "completed" and 0 < final.final_score < 1, final
    assert http.get(f"/v1/submissions/{accepted.id}").json()["tokenizer"] == "gpt2"
