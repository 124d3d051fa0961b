"""`GET /v1/queue`: what runs and what waits, with each one's place in line and an ETA."""

from __future__ import annotations

from fastapi import APIRouter

from prism_ray.backend.store_backend import Backend
from serve_app import views
from serve_app.models import Queue


def router(backend: Backend) -> APIRouter:
    queue = APIRouter(tags=["results"])

    @queue.get("/v1/queue", response_model=Queue)
    def get_queue() -> Queue:
        """Running submissions, then waiting ones in the order they will run, each with an estimated start and
        finish (from the median duration of the latest completed runs)."""
        return views.queue(backend)

    return queue
