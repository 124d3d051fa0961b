"""The HTTP API (docs/api.md) and the pages (docs/web.md): this module only assembles them. One router per resource
(serve_app/routes/), errors in serve_app/errors.py, every read and write through a `Backend`
(prism_ray/backend/store_backend.py), so the same app runs under uvicorn in tests and behind Ray Serve on a cluster."""

from __future__ import annotations

import logging
from importlib.metadata import version

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prism_ray.access.registry import Registry
from prism_ray.backend.store_backend import Backend
from prism_ray.config import ApiSettings, Settings
from serve_app.errors import install_error_handlers
from serve_app.routes import health, leaderboard, pages, queue, submissions, weights

logger = logging.getLogger("prism_ray.api")


def create_app(backend: Backend, settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    # fastapi-offline serves Swagger UI and ReDoc from the package, not a CDN: /docs works on a closed network.
    app = FastAPIOffline(title="prism-ray", version=version("prism-ray"), static_url="/static-docs",
                         description="Submit PRISM bundles, follow their scoring, read the leaderboard (docs/api.md).")
    install_error_handlers(app)
    if settings.auth_mode == "dev":
        logger.warning("PRISM API AUTH MODE IS DEV: X-Hotkey is trusted WITHOUT a signature. Local demo only; "
                       "never expose this server.")
        app.add_middleware(_DevAuthHeader)
    # The backend's settings say where the state lives; the OpenAPI export builds the app without a backend.
    cache_dir = (backend.settings if backend is not None else Settings()).cache_dir
    registry = Registry.from_settings(settings.registry, settings.auth_mode, cache_dir)
    app.include_router(submissions.router(backend, settings, registry))
    app.include_router(leaderboard.router(backend))
    app.include_router(queue.router(backend))
    app.include_router(weights.router(backend, settings.bearer_token(), settings.challenge_slug))
    app.include_router(health.router(backend, settings, registry))
    app.include_router(pages.router(backend))
    app.mount("/static", pages.static_files(), name="static")
    return app


class _DevAuthHeader:
    """Stamps `X-Prism-Auth: dev` on every response, so nobody mistakes a dev server for a real one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-prism-auth", b"dev")]
            await send(message)

        await self.app(scope, receive, stamped if scope["type"] == "http" else send)
