"""`GET /health` and `GET /version`."""

from __future__ import annotations

from importlib.metadata import version

from fastapi import APIRouter

from prism_ray.backend import Backend
from prism_ray.registry import Registry
from serve_app.errors import ApiError, responses
from serve_app.models import ApiSettings, Health, RegistryStatus, Version


def router(backend: Backend, settings: ApiSettings, registry: Registry) -> APIRouter:
    meta = APIRouter(tags=["meta"])

    @meta.get("/health", response_model=Health, responses=responses(503))
    def health() -> Health:
        """Liveness: the auth mode, whether submissions are open, who may submit, the queue depth and submissions in
        flight."""
        try:
            stats = backend.stats()
        except Exception as error:  # any backend failure (a dead actor, a closed file) means unhealthy
            raise ApiError(503, "store_unavailable", f"the store does not answer: {type(error).__name__}") from None
        return Health(status="ok", auth_mode=settings.auth_mode, public_submissions=settings.public_submissions,
                      queue_depth=stats["queue_depth"], in_flight=stats["in_flight"],
                      registry=RegistryStatus(**registry.describe()))

    @meta.get("/version", response_model=Version)
    def get_version() -> Version:
        """The server's name, package version and API version."""
        return Version(name="prism-ray", version=version("prism-ray"), api="v1")

    return meta
