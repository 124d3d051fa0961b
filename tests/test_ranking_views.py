"""The decided order as served (docs/web.md, docs/api.md): the leaderboard's JSON, page and CLI table show mean ±
spread, seeds, decided groups and cost; get_weights names the entries waiting for replicas; the queue page lists the
replicas; a submission's page shows its verdict against the leader. A real app under uvicorn over a real store."""

from __future__ import annotations

import httpx
import pytest
from rich.console import Console
from test_replicas import Clock, Cluster

from api_helpers import TOKEN, serve
from prism_ray.cli.client_commands import print_leaderboard
from prism_ray.config import ApiSettings, Settings
from serve_app import StoreBackend, create_app


@pytest.fixture
def served(tmp_path):
    cluster = Cluster(tmp_path, Clock(), top_k=2, count=2)
    ids = {"alice": cluster.scored("alice", 0.0), "bob": cluster.scored("bob", -0.015)}
    cluster.run_replicas()
    ids["carol"] = cluster.scored("carol", -0.1)  # replicas pending
    backend = StoreBackend(cluster.store, Settings())
    with serve(create_app(backend, ApiSettings(internal_token=TOKEN, registry={"mode": "open"}))) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        yield http, ids
    cluster.store.close()


def test_the_board_the_weights_the_pages_and_the_cli_show_the_decided_order(served):
    http, ids = served
    board = http.get("/v1/leaderboard", params={"all_epochs": "true"}).json()
    entries = {entry["hotkey"]: entry for entry in board["entries"]}
    assert [entry["hotkey"] for entry in board["entries"]] == ["alice", "bob", "carol"]
    assert entries["bob"]["tied_with"] == 1 and entries["alice"]["tied_with"] is None
    assert (entries["alice"]["seeds"], entries["carol"]["seeds"]) == (3, 1)
    assert entries["alice"]["spread_bpb"] > 0 and entries["carol"]["spread_bpb"] is None
    assert entries["alice"]["gpu_seconds"] == pytest.approx(3 * 12.5) and entries["carol"]["gpu_seconds"] == 12.5
    assert entries["alice"]["est_flops"] == 6 * 1_000_000 * 50_000 and entries["alice"]["tokens_per_second"] == 4000
    assert (entries["carol"]["replicas"], entries["alice"]["replicas"]) == ("pending", "done")
    assert board["sigma_seed_dof"] == 4 and board["sigma_seed"] == board["sigma_seed_measured"] > 0

    weights = http.get("/internal/v1/get_weights", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert weights["pending_replicas"] == [ids["carol"]] and set(weights["weights"]) == {"alice"}

    page = http.get("/").text
    assert "tied with #1" in page and "replicas pending" in page and "σ<sub>seed</sub>" in page
    queue = http.get("/queue").text
    assert "Seed replicas" in queue and queue.count(ids["carol"]) >= 2
    bob = http.get(f"/submissions/{ids['bob']}").text
    assert "Against the leader" in bob and "tied: no decided difference" in bob and "decided chunks" in bob

    console = Console(record=True, width=250)
    print_leaderboard(board, console)
    text = console.export_text()
    assert "tied with #1" in text and "σ_seed" in text and "3.00e+11" in text and "replicas pending" in text
