"""The guard of the internal routes (the BASE platform's side, docs/api.md): the bearer token, then the challenge
slug, in the order and with the answers of PRISM's own service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from prism_ray.access.auth import bearer_token_matches
from serve_app.errors import ApiError

# Module level: route annotations are strings (PEP 563), resolved against the route module's globals.
BEARER = HTTPBearer(auto_error=False, description="the internal token (PRISM_INTERNAL_TOKEN)")
SLUG_HEADER = "X-Base-Challenge-Slug"
SlugHeader = Annotated[str | None, Header(alias=SLUG_HEADER, description="the BASE platform's challenge slug; when "
                                          "sent it must be this server's (PRISM_API_CHALLENGE_SLUG)")]


def check_internal(token: str | None, slug: str, credentials: HTTPAuthorizationCredentials | None,
                   presented_slug: str | None, slug_required: bool = False) -> None:
    """503 without a configured token (never open), 401 without the right one, 400 for another challenge's slug
    (or none, where the route needs it: prism-ray's own callers of get_weights send none)."""
    if token is None:
        raise ApiError(503, "internal_token_not_configured", "set PRISM_INTERNAL_TOKEN or "
                       "PRISM_API_INTERNAL_TOKEN_FILE on the server to enable the internal routes")
    if not bearer_token_matches(credentials and credentials.credentials, token):
        raise ApiError(401, "auth:bad_token", "send Authorization: Bearer <internal token>",
                       headers={"WWW-Authenticate": "Bearer"})
    if presented_slug != slug and (presented_slug is not None or slug_required):
        raise ApiError(400, "request:challenge_slug", f"{SLUG_HEADER} must be {slug!r}, this server's challenge "
                       f"(got {presented_slug!r})")
