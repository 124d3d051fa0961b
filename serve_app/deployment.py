"""The Ray Serve ingress: the same FastAPI app, built inside each replica over a backend made there."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from prism_ray.backend.store_backend import Backend
from prism_ray.config import ApiSettings
from serve_app.app import create_app


class PrismIngress:
    # The backend (actor handles, a store) must be made in the replica, so the app is built there too.
    def __init__(self, backend_factory: Callable[[], Backend], settings: ApiSettings) -> None:
        self._app = create_app(backend_factory(), settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app


def build_ingress(backend_factory: Callable[[], Backend], settings: ApiSettings | None = None) -> Application:
    """`serve.run(build_ingress(factory, settings))`; num_cpus 0 so the API never takes a scoring CPU."""
    deployment = serve.deployment(ray_actor_options={"num_cpus": 0})(serve.ingress()(PrismIngress))
    return deployment.bind(backend_factory, settings or ApiSettings())
