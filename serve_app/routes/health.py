"""`GET /health` and `GET /version`."""

from __future__ import annotations

from importlib.metadata import version

from fastapi import APIRouter

from prism_ray.access.registry import Registry
from prism_ray.backend.store_backend import Backend
from prism_ray.config import ApiSettings
from serve_app.errors import STORE_RETRY_AFTER_S, ApiError, responses
from serve_app.models import Health, RegistryStatus, Version

BASE_API_VERSION = "1.0"  # the BASE platform's challenge API: /health, /version, /internal/v1/* (docs/api.md)


def router(backend: Backend, settings: ApiSettings, registry: Registry) -> APIRouter:
    meta = APIRouter(tags=["meta"])

    @meta.get("/health", response_model=Health, responses=responses(503))
    def health() -> Health:
        """Liveness: the store probed for real (a read, a write, free disk above its floor; 503 with the reason when
        not), the auth mode, whether submissions are open, who may submit, the queue depth and submissions in
        flight."""
        health = backend.health()  # a real read and write, and the free disk, at most every few seconds
        if not health.ok:
            raise ApiError(503, health.error or "store_unavailable", health.message,
                           headers={"Retry-After": str(STORE_RETRY_AFTER_S)})
        stats = backend.stats()
        return Health(status="ok", auth_mode=settings.auth_mode, public_submissions=settings.public_submissions,
                      queue_depth=stats["queue_depth"], in_flight=stats["in_flight"],
                      registry=RegistryStatus(**registry.describe()))

    @meta.get("/version", response_model=Version)
    def get_version() -> Version:
        """The server's name, package version and API version; `api_version` and `capabilities` are what the BASE
        platform checks before it marks the challenge ready."""
        return Version(name="prism-ray", version=version("prism-ray"), api="v1", api_version=BASE_API_VERSION,
                       challenge_version=version("prism-ray"), capabilities=["get_weights", "proxy_routes"])

    return meta
