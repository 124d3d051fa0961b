"""`GET /internal/v1/get_weights`: dry-run weights behind the internal bearer token."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Security
from fastapi.security import HTTPAuthorizationCredentials

from prism_ray.backend.store_backend import Backend
from prism_ray.ranking.leaderboard import epoch_of
from serve_app import wire
from serve_app.errors import responses
from serve_app.internal import BEARER, SlugHeader, check_internal
from serve_app.models import Weights
from serve_app.routes.leaderboard import EpochQuery


def router(backend: Backend, token: str | None, slug: str) -> APIRouter:
    internal = APIRouter(tags=["internal"])

    @internal.get("/internal/v1/get_weights", response_model=Weights, responses=responses(400, 401, 422, 503, texts={
        503: "the internal token is not configured, or the store does not answer"}))
    def get_weights(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
                    challenge_slug: SlugHeader = None, epoch: EpochQuery = None) -> Weights:
        """Dry-run weights per hotkey (never set on chain), for validators and the BASE platform to compare."""
        check_internal(token, slug, credentials, challenge_slug)
        now = time.time()
        # Pending audits first: weights read after them are as new, so an empty list means settled weights.
        board = backend.leaderboard(epoch)
        pending = [entry.submission_id for entry in board if entry.audit == "pending"]
        replicating = [entry.submission_id for entry in board if entry.replicas == "pending"]
        return Weights(weights=backend.weights(epoch), epoch=epoch_of(now, backend.settings.scoring)
                       if epoch is None else epoch, all_epochs=epoch is None,
                       mode=backend.settings.scoring.weights_mode, computed_at=now, pending_audits=pending,
                       pending_replicas=replicating,
                       challenge_slug=slug, metadata={"computed_at": wire.iso(now).isoformat()})

    return internal
