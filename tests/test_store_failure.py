"""A store that fails, for real: a DuckDB file with a damaged block, or the connection closed under a running server.
Every route of the app (under uvicorn, on loopback) answers the documented JSON 503 `store_unavailable` with
Retry-After, never a text 500; /health says so; a post made meanwhile stores nothing."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from api_helpers import TOKEN, bundle_zip, new_allowlist, serve, server_settings
from damage import damaged, seeded
from prism_ray.config import ClusterSettings, Settings
from prism_ray.store import Store
from serve_app import StoreBackend, create_app

NO_STORE = {"/version", "/v1/epochs/current", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def api_routes(routes) -> list[APIRoute]:
    """Every APIRoute, through included routers (newer FastAPI keeps them nested; no prefixes here)."""
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):
            found += api_routes(route.original_router.routes)
    return found


def requests_for_every_route(app, submission_id: str) -> list[tuple[str, str, dict]]:
    requests = []
    for route in api_routes(app.routes):
        if route.path in NO_STORE:
            continue
        path = route.path.replace("{submission_id}", submission_id)
        for method in route.methods:
            options: dict = {"headers": {"Authorization": f"Bearer {TOKEN}"}}
            if method == "POST":
                zipped = bundle_zip("during-failure")
                headers = {"Content-Type": "application/zip", "X-Hotkey": "miner-during-failure"}
                if path.startswith("/internal/"):  # the BASE bridge: what BASE sends with a verified upload
                    headers |= {"Authorization": f"Bearer {TOKEN}", "X-Base-Challenge-Slug": "prism",
                                "X-Base-Verified-Hotkey": "miner-during-failure", "X-Base-Verified-Nonce": path,
                                "X-Base-Request-Hash": hashlib.sha256(zipped).hexdigest()}
                options = {"content": zipped, "headers": headers}
            requests.append((method, path, options))
    return requests


def settings() -> Settings:
    return Settings(cluster=ClusterSettings(health_probe_seconds=0.05))


def assert_503_everywhere(url: str, app, submission_id: str) -> None:
    routes = requests_for_every_route(app, submission_id)
    assert {path for _, path, _ in routes} >= {"/health", "/v1/leaderboard", "/v1/submissions", "/", "/queue",
                                               "/v1/submissions/{id}/curve".replace("{id}", submission_id)}
    with httpx.Client(base_url=url, timeout=30) as http:
        for method, path, options in routes:
            response = http.request(method, path, **options)
            assert response.status_code == 503, (method, path, response.status_code, response.text[:300])
            assert response.headers["content-type"] == "application/json", (method, path)
            body = response.json()
            assert body["error"] == "store_unavailable" and body["message"], (method, path, body)
            assert int(response.headers["retry-after"]) > 0, (method, path)
        assert http.get("/version").status_code == 200  # what needs no store still answers


def api(tmp_path: Path):
    return server_settings(new_allowlist(tmp_path), auth_mode="dev", registry={"mode": "open"})


def test_every_route_answers_a_damaged_store_with_json_503(tmp_path):
    original = tmp_path / "prism.duckdb"
    ids = seeded(original)
    path = damaged(original, tmp_path, lambda store: store.probe())
    store = Store(path)  # opens: DuckDB checks a block only when it reads it
    try:
        app = create_app(StoreBackend(store, settings()), api(tmp_path))
        with serve(app) as url:
            assert_503_everywhere(url, app, ids[0])
    finally:
        store.close()


def test_every_route_answers_a_store_closed_under_it_with_json_503_and_stores_nothing(tmp_path):
    path = tmp_path / "prism.duckdb"
    ids = seeded(path)
    store = Store(path)
    app = create_app(StoreBackend(store, settings()), api(tmp_path))
    with serve(app) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            assert http.get(f"/v1/submissions/{ids[0]}").status_code == 200
        store.close()  # the DuckDB connection is gone under the running server
        # reads come from the in-memory read model, which looks at the store again within its refresh interval
        with httpx.Client(base_url=url, timeout=30) as http:
            deadline = time.monotonic() + 15
            while http.get(f"/v1/submissions/{ids[0]}").status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.2)
        assert_503_everywhere(url, app, ids[0])
    with Store(path) as reopened:
        assert len(reopened.list_submissions(limit=100)) == 5  # the posts made meanwhile left nothing behind


def test_the_integrity_check_finds_damage_the_probe_does_not_reach(tmp_path):
    original = tmp_path / "prism.duckdb"
    seeded(original)
    path = damaged(original, tmp_path, lambda store: store.check_integrity())
    with Store(path) as store:
        with pytest.raises(Exception, match="(?i)checksum|corrupt"):
            store.check_integrity()
