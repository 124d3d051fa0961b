"""`GET /internal/v1/get_weights`: dry-run weights behind the internal bearer token."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prism_ray.auth import bearer_token_matches
from prism_ray.backend import Backend
from prism_ray.leaderboard import epoch_of
from serve_app.errors import ApiError, responses
from serve_app.models import Weights
from serve_app.routes.leaderboard import EpochQuery

# Module level: route annotations are strings (PEP 563), resolved against this module's globals.
BEARER = HTTPBearer(auto_error=False, description="the internal token (PRISM_INTERNAL_TOKEN)")


def router(backend: Backend, token: str | None) -> APIRouter:
    internal = APIRouter(tags=["internal"])

    @internal.get("/internal/v1/get_weights", response_model=Weights, responses=responses(401, 422, 503, texts={
        503: "the internal token is not configured, or the store does not answer"}))
    def get_weights(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
                    epoch: EpochQuery = None) -> Weights:
        """Dry-run weights per hotkey (never set on chain), for validators to compare."""
        if token is None:  # never open: no token configured means nobody may read
            raise ApiError(503, "internal_token_not_configured", "set PRISM_INTERNAL_TOKEN or "
                           "PRISM_API_INTERNAL_TOKEN_FILE on the server to enable the internal routes")
        if not bearer_token_matches(credentials and credentials.credentials, token):
            raise ApiError(401, "auth:bad_token", "send Authorization: Bearer <internal token>",
                           headers={"WWW-Authenticate": "Bearer"})
        now = time.time()
        # Pending audits first: weights read after them are as new, so an empty list means settled weights.
        pending = [entry.submission_id for entry in backend.leaderboard(epoch) if entry.audit == "pending"]
        return Weights(weights=backend.weights(epoch), epoch=epoch_of(now, backend.settings.scoring)
                       if epoch is None else epoch, all_epochs=epoch is None,
                       mode=backend.settings.scoring.weights_mode, computed_at=now, pending_audits=pending)

    return internal
