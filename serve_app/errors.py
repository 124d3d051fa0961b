"""Every answer other than success: ApiError, the handlers that render each error type as an ErrorBody, and the
error responses each route declares in the OpenAPI schema."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from prism_ray.access.auth import AuthError
from prism_ray.access.registry import RegistryError
from prism_ray.backend.store_backend import describe, store_failure_types
from prism_ray.errors import Reason
from prism_ray.store import StoreUnavailable, SubmissionRecord
from serve_app.models import ErrorBody

logger = logging.getLogger("prism_ray.api")
STORE_RETRY_AFTER_S = 10  # a store that failed is probed again within seconds; the client should not hammer it
ERROR_TEXT = {
    400: "X-Timestamp is not Unix seconds, or (internal routes) X-Base-Challenge-Slug names another challenge",
    401: "missing, malformed, forged or stale signature / bearer token",
    403: "the hotkey is not registered on the subnet (or not on this server's allow-list); nothing is stored",
    404: "no such submission",
    409: "the nonce was already used by this hotkey (a replay)",
    413: "the body is over max_body_bytes (refused while reading)",
    422: "malformed path or query parameters",
    429: "this hotkey, or this client address, is over its submission rate; see Retry-After",
    503: "the store does not answer (`store_unavailable`), or its disk is below the floor (`infra:disk_full`); see "
         "Retry-After",
}


class ApiError(Exception):
    """An answer other than success, rendered as an ErrorBody."""

    def __init__(self, status: int, error: str, message: str, reasons: list[Reason] | None = None,
                 headers: dict[str, str] | None = None, record: SubmissionRecord | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=error, message=message, reasons=reasons or [], id=record and record.id,
                              status=record and record.status)
        self.headers = headers


def responses(*codes: int, texts: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """Error responses for the OpenAPI schema (docs/api.md); `texts`: what a code means on this route."""
    return {code: {"model": ErrorBody, "description": (texts or {}).get(code, ERROR_TEXT[code])} for code in codes}


def validation_reasons(errors: Any) -> list[Reason]:
    return [Reason(rule="request:invalid", message=f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}")
            for e in errors]


def install_error_handlers(app: FastAPI) -> None:
    def render(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return render(error.status, error.body, error.headers)

    @app.exception_handler(AuthError)
    async def auth_error(_: Request, error: AuthError) -> JSONResponse:
        return render(error.status, ErrorBody(error=error.rule, message=error.message))

    @app.exception_handler(RegistryError)
    async def registry_error(_: Request, error: RegistryError) -> JSONResponse:
        return render(error.status, ErrorBody(error=error.rule, message=error.reasons[0].message,
                                              reasons=error.reasons))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return render(error.status_code, ErrorBody(error=f"http:{error.status_code}", message=str(error.detail)),
                      error.headers)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, error: StoreUnavailable) -> JSONResponse:
        return render(503, ErrorBody(error=error.error, message=error.message),
                      {"Retry-After": str(STORE_RETRY_AFTER_S)})

    async def store_failed(request: Request, error: Exception) -> JSONResponse:
        logger.warning("store failure on %s %s: %s", request.method, request.url.path, describe(error))
        return render(503, ErrorBody(error="store_unavailable", message=f"the store does not answer "
                                     f"({describe(error)}); retry later"), {"Retry-After": str(STORE_RETRY_AFTER_S)})

    for failure in store_failure_types():  # retry later: a store transaction that failed stored nothing
        app.add_exception_handler(failure, store_failed)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        """A bug of this server still gets the JSON shape (its traceback goes to the log)."""
        return render(500, ErrorBody(error="internal", message=f"the server failed: {type(error).__name__}"))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return render(422, ErrorBody(error="request:invalid", message="the request is malformed",
                                     reasons=validation_reasons(error.errors())))
