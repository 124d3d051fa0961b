"""The HTTP API (docs/api.md): FastAPI routes over a `Backend`, so the same app runs under uvicorn in tests and
behind Ray Serve on a cluster.

Submissions are read as a stream and refused the moment they pass the size limit, authenticated (sr25519 signature,
timestamp window, one-time nonce), rate-limited per hotkey, then handed to the backend for intake; a broken bundle is
stored as a rejection and answered 422 with its typed reasons.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prism_ray.auth import (
    HOTKEY_HEADER,
    NONCE_HEADER,
    NONCE_PATTERN,
    SIGNATURE_HEADER,
    SIGNATURE_PATTERN,
    TIMESTAMP_HEADER,
    TIMESTAMP_PATTERN,
    AuthError,
    SignedHeaders,
    bearer_token_matches,
)
from prism_ray.bundle import decode_base64
from prism_ray.errors import BundleError, Reason
from prism_ray.leaderboard import epoch_of, epoch_seconds_of
from prism_ray.store import SubmissionRecord
from serve_app import pages
from serve_app.backend import Backend
from serve_app.models import (
    ApiSettings,
    ComputeProfile,
    Curve,
    CurvePoint,
    Epoch,
    ErrorBody,
    Event,
    Health,
    Leaderboard,
    LeaderboardRow,
    Progress,
    Scores,
    SubmissionAccepted,
    SubmissionRequest,
    SubmissionStatus,
    Version,
    Weights,
)

logger = logging.getLogger("prism_ray.api")

FILENAME_HEADER = "X-Submission-Filename"
ZIP_MEDIA_TYPES = ("application/zip", "application/x-zip-compressed")
MAX_CURVE_POINTS = 500
_DEV_HOTKEY = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FILENAME = re.compile(r"[^\x00-\x1f\x7f]{1,255}")

_ERROR_TEXT = {
    401: "missing, malformed, forged or stale signature / bearer token",
    404: "no such submission",
    409: "the nonce was already used by this hotkey (a replay)",
    413: "the body is over max_body_bytes (refused while reading)",
    415: "the body is neither application/json nor application/zip",
    422: "malformed path or query parameters",
    429: "this hotkey is over its submission rate; see Retry-After",
    503: "the store does not answer",
}
_HEADER_PATTERNS = {HOTKEY_HEADER: _DEV_HOTKEY.pattern, SIGNATURE_HEADER: SIGNATURE_PATTERN,
                    NONCE_HEADER: NONCE_PATTERN, TIMESTAMP_HEADER: TIMESTAMP_PATTERN,
                    FILENAME_HEADER: _FILENAME.pattern}
_SUBMISSION_OPENAPI: dict[str, Any] = {
    "parameters": [
        {"name": name, "in": "header", "required": name == HOTKEY_HEADER,
         "schema": {"type": "string", "pattern": f"^{pattern}$"},
         "description": "the bundle's file name, for a raw application/zip body" if name == FILENAME_HEADER else
         "signed auth (docs/api.md); in dev auth mode only X-Hotkey, unsigned"}
        for name, pattern in _HEADER_PATTERNS.items()],
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": SubmissionRequest.model_json_schema()},
        "application/zip": {"schema": {"type": "string", "format": "binary"}},
    }},
}


def _errors(*codes: int, texts: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """Error responses for the OpenAPI schema (docs/api.md); `texts`: what a code means on this route."""
    return {code: {"model": ErrorBody, "description": (texts or {}).get(code, _ERROR_TEXT[code])} for code in codes}


class ApiError(Exception):
    """An answer other than success, rendered as an ErrorBody."""

    def __init__(self, status: int, error: str, message: str, reasons: list[Reason] | None = None,
                 headers: dict[str, str] | None = None, record: SubmissionRecord | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=error, message=message, reasons=reasons or [], id=record and record.id,
                              status=record and record.status)
        self.headers = headers


class TokenBuckets:
    """Per-hotkey token buckets, in this process: each API replica limits on its own.

    Only touched from the event loop, so no lock. Full (idle) buckets are dropped once there are many, so memory
    follows the hotkeys active in the last few minutes, not every hotkey ever seen."""

    def __init__(self, burst: int, per_minute: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        self.burst = float(burst)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        now = self._clock()
        level = self._level(key, now)
        if level < 1.0:
            self._buckets[key] = (level, now)
            return (1.0 - level) / self.rate
        self._buckets[key] = (level - 1.0, now)
        if len(self._buckets) > self._max_keys:
            self._buckets = {k: v for k, v in self._buckets.items() if self._level(k, now) < self.burst}
        return 0.0

    def _level(self, key: str, now: float) -> float:
        level, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, level + (now - at) * self.rate)


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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused the moment it passes `limit`: never more than `limit` bytes are kept in memory."""
    too_large = ApiError(413, "request:too_large", f"the body is over {limit:,} bytes",
                         headers={"Connection": "close"})  # stop the client sending the rest
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer; end the request quietly
        raise ApiError(400, "request:disconnected", "the client went away mid-body") from None
    return b"".join(chunks)


def create_app(backend: Backend, settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    # fastapi-offline serves Swagger UI and ReDoc from the package, not a CDN: /docs works on a closed network.
    app = FastAPIOffline(title="prism-ray", version=version("prism-ray"), static_url="/static-docs",
                         description="Submit PRISM bundles, follow their scoring, read the leaderboard (docs/api.md).")
    _install_error_handlers(app)
    if settings.auth_mode == "dev":
        logger.warning("PRISM API AUTH MODE IS DEV: X-Hotkey is trusted WITHOUT a signature. Local demo only; "
                       "never expose this server.")
        app.add_middleware(_DevAuthHeader)
    app.include_router(_submission_router(backend, settings))
    app.include_router(_read_router(backend))
    app.include_router(_internal_router(backend, settings.bearer_token()))
    app.include_router(_meta_router(backend, settings))
    app.include_router(pages.router(backend))
    app.mount("/static", pages.static_files(), name="static")
    return app


def _install_error_handlers(app: FastAPI) -> None:
    def render(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return render(error.status, error.body, error.headers)

    @app.exception_handler(AuthError)
    async def auth_error(_: Request, error: AuthError) -> JSONResponse:
        return render(error.status, ErrorBody(error=error.rule, message=error.message))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return render(error.status_code, ErrorBody(error=f"http:{error.status_code}", message=str(error.detail)),
                      error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return render(422, ErrorBody(error="request:invalid", message="the request is malformed",
                                     reasons=_validation_reasons(error.errors())))


def _validation_reasons(errors: Any) -> list[Reason]:
    return [Reason(rule="request:invalid", message=f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}")
            for e in errors]


# --- POST /v1/submissions -----------------------------------------------------------------------------------------

def _submission_router(backend: Backend, settings: ApiSettings) -> APIRouter:
    router = APIRouter(tags=["submissions"])
    buckets = TokenBuckets(settings.rate_limit_burst, settings.rate_limit_per_minute)

    def remember_nonce(hotkey: str, nonce: str) -> bool:
        return backend.check_nonce(hotkey, nonce, settings.nonce_ttl_s)

    @router.post("/v1/submissions", status_code=202, response_model=SubmissionAccepted,
                 openapi_extra=_SUBMISSION_OPENAPI,
                 responses={200: {"model": SubmissionAccepted, "description": "nothing new to score: this hotkey's "
                                  "earlier identical submission (`reused`), or a duplicate of another's"},
                            **_errors(401, 404, 409, 413, 415, 422, 429, texts={
                                404: "public submissions are disabled on this server",
                                422: "the request is malformed, or the bundle broke an intake/contract rule (the "
                                     "rejection is stored)"})})
    async def submit(request: Request, response: Response) -> SubmissionAccepted:
        """Submit a bundle: JSON `{filename, code (base64 zip), metadata}` or a raw zip body."""
        if not settings.public_submissions:
            raise ApiError(404, "submissions_disabled", "public submissions are disabled on this server")
        signed = _signed_headers(request, settings)  # before reading: a stale request costs no bandwidth
        body = await read_body(request, settings.max_body_bytes)
        if isinstance(signed, SignedHeaders):
            hotkey = await run_in_threadpool(signed.authenticate, body, remember_nonce)
        else:
            hotkey = signed
        wait = buckets.take(hotkey)
        if wait:
            raise ApiError(429, "rate_limited", f"hotkey {hotkey} is over {settings.rate_limit_burst} submissions "
                           f"per burst / {settings.rate_limit_per_minute:g} per minute; retry in {wait:.0f} s",
                           headers={"Retry-After": str(math.ceil(wait))})
        filename, zipped, metadata = _parse_submission(request, body)
        if isinstance(zipped, BundleError):
            record = await run_in_threadpool(backend.reject, hotkey, filename, zipped.reasons, metadata)
        else:
            record = await run_in_threadpool(backend.submit, hotkey, filename, zipped, metadata)
        if record.status == "rejected" and not record.reused:
            raise ApiError(422, "intake:rejected", "the bundle was rejected at intake; the rejection is stored",
                           reasons=record.reasons, record=record)
        if record.reused or record.status != "pending":
            response.status_code = 200
        return SubmissionAccepted(id=record.id, status=record.status, stage=record.stage, hotkey=record.hotkey,
                                  filename=record.filename, name=record.name, created_at=record.created_at,
                                  reused=record.reused, duplicate_of=record.duplicate_of, reasons=record.reasons,
                                  status_url=f"/v1/submissions/{record.id}")

    return router


def _signed_headers(request: Request, settings: ApiSettings) -> SignedHeaders | str:
    """Signed mode: the parsed, in-window auth headers. Dev mode: the unsigned hotkey itself."""
    if settings.auth_mode == "signed":
        return SignedHeaders.parse(request.headers, settings.timestamp_window_s)
    hotkey = request.headers.get(HOTKEY_HEADER, "")
    if not _DEV_HOTKEY.fullmatch(hotkey):
        raise AuthError("auth:missing_headers", "dev auth mode: X-Hotkey must be 1-64 characters of [A-Za-z0-9._-]")
    return hotkey


def _parse_submission(request: Request, body: bytes) -> tuple[str, bytes | BundleError, dict[str, Any] | None]:
    """(filename, the zip bytes or why they cannot be had, metadata)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type in ZIP_MEDIA_TYPES:
        filename = request.headers.get(FILENAME_HEADER) or "bundle.zip"
        if not _FILENAME.fullmatch(filename):
            raise ApiError(422, "request:invalid", f"{FILENAME_HEADER} must be 1-255 printable characters")
        return filename, body, None
    if media_type != "application/json":
        raise ApiError(415, "request:media_type", f"send application/json or application/zip, not {media_type!r}")
    try:
        parsed = SubmissionRequest.model_validate_json(body)
    except ValidationError as error:
        raise ApiError(422, "request:invalid", "the JSON body is malformed",
                       reasons=_validation_reasons(error.errors())) from None
    try:
        zipped: bytes | BundleError = decode_base64(parsed.code)
    except BundleError as error:
        zipped = error
    return parsed.filename, zipped, parsed.metadata


# --- reads --------------------------------------------------------------------------------------------------------

SubmissionId = Annotated[str, Path(min_length=1, max_length=128)]
EpochQuery = Annotated[int | None, Query(ge=0, le=2**53, description="only submissions of this epoch")]


def _read_router(backend: Backend) -> APIRouter:
    router = APIRouter(tags=["results"])

    @router.get("/v1/submissions/{submission_id}", response_model=SubmissionStatus, responses=_errors(404, 422))
    def get_submission(submission_id: SubmissionId) -> SubmissionStatus:
        """Status, stage, typed reasons, attempt, scores, live progress and the event timeline."""
        record = _record_or_404(backend, submission_id)
        runs, events = backend.runs(submission_id), backend.events(submission_id)
        run = runs[-1] if runs else None
        report = (run or {}).get("report") or {}
        return SubmissionStatus(
            **record.model_dump(include=set(SubmissionStatus.model_fields) - {"scores", "progress", "events"}),
            scores=_scores(report) if record.status == "completed" else None,
            progress=_progress(run, report, backend.settings.byte_budget) if run else None,
            events=[Event(seq=e["seq"], at=e["created_at"], kind=e["kind"], stage=e["stage"], detail=e["detail"])
                    for e in events])

    @router.get("/v1/submissions/{submission_id}/curve", response_model=Curve, responses=_errors(404, 422))
    def get_curve(submission_id: SubmissionId) -> Curve:
        """Cumulative bytes vs. running bpb (at most 500 points) and the run's compute profile."""
        record = _record_or_404(backend, submission_id)
        runs = backend.runs(submission_id)
        reported = [run for run in runs if run.get("report")]
        run = reported[-1] if reported else (runs[-1] if runs else {})
        points = _thin(backend.curve(submission_id), MAX_CURVE_POINTS)
        return Curve(id=record.id, status=record.status, points=[CurvePoint(**point) for point in points],
                     profile=_profile(run))

    @router.get("/v1/leaderboard", response_model=Leaderboard, responses=_errors(422))
    def get_leaderboard(epoch: EpochQuery = None) -> Leaderboard:
        """Best completed submission per hotkey, by final_score; ties → earliest submission."""
        entries = [LeaderboardRow(**entry.model_dump(include=set(LeaderboardRow.model_fields) - {"submitted_at"}),
                                  submitted_at=epoch_seconds_of(entry.submitted_at))
                   for entry in backend.leaderboard(epoch)]
        return Leaderboard(epoch=epoch, computed_at=time.time(), entries=entries)

    @router.get("/v1/epochs/current", response_model=Epoch)
    def current_epoch() -> Epoch:
        """The current scoring epoch: its number and bounds in Unix seconds."""
        now = time.time()
        seconds = backend.settings.scoring.epoch_seconds
        number = epoch_of(now, backend.settings.scoring)
        return Epoch(epoch=number, starts_at=number * seconds, ends_at=(number + 1) * seconds, epoch_seconds=seconds,
                     now=now)

    return router


def _record_or_404(backend: Backend, submission_id: str) -> SubmissionRecord:
    record = backend.get_submission(submission_id)
    if record is None:
        raise ApiError(404, "not_found", f"no submission {submission_id}")
    return record


def _scores(report: dict[str, Any]) -> Scores:
    breakdown, heldout = report.get("score") or {}, report.get("heldout") or {}
    return Scores(bpb=report.get("bpb"), final_score=report.get("final_score"),
                  heldout_delta=heldout.get("heldout_delta"), gap=heldout.get("gap"),
                  penalty=breakdown.get("penalty"), anomaly=breakdown.get("anomaly"),
                  tie_break=breakdown.get("tie_break"), val_bpb_trained=heldout.get("val_bpb_trained"),
                  val_bpb_twin=heldout.get("val_bpb_twin"), flags=breakdown.get("flags") or [])


def _progress(run: dict[str, Any], report: dict[str, Any], byte_budget: int) -> Progress:
    """The report's final numbers once the run ended with one, else the live heartbeat numbers."""
    return Progress(bytes_scored=_first(report.get("bytes_scored"), run.get("progress_bytes")),
                    running_bpb=_first(report.get("bpb"), run.get("progress_bpb")),
                    tokens_per_second=_first(report.get("tokens_per_second"), run.get("tokens_per_second")),
                    byte_budget=_first(report.get("byte_budget"), byte_budget or None),
                    updated_at=_first(run.get("finished_at"), run.get("progress_at")), node=run.get("node"))


def _profile(run: dict[str, Any]) -> ComputeProfile:
    report = run.get("report") or {}
    fields = set(ComputeProfile.model_fields) - {"node", "tokens_per_second"}
    return ComputeProfile(**{name: report.get(name) for name in fields}, node=run.get("node"),
                          tokens_per_second=_first(report.get("tokens_per_second"), run.get("tokens_per_second")))


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _thin(points: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` evenly spaced points, the first and the last always kept."""
    if len(points) <= limit:
        return points
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


# --- internal -----------------------------------------------------------------------------------------------------

# Module level: route annotations are strings (PEP 563), resolved against this module's globals.
_BEARER = HTTPBearer(auto_error=False, description="the internal token (PRISM_INTERNAL_TOKEN)")


def _internal_router(backend: Backend, token: str | None) -> APIRouter:
    router = APIRouter(tags=["internal"])

    @router.get("/internal/v1/get_weights", response_model=Weights, responses=_errors(401, 422, 503, texts={
        503: "the internal token is not configured, or the store does not answer"}))
    def get_weights(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
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

    return router


# --- meta ---------------------------------------------------------------------------------------------------------

def _meta_router(backend: Backend, settings: ApiSettings) -> APIRouter:
    router = APIRouter(tags=["meta"])

    @router.get("/health", response_model=Health, responses=_errors(503))
    def health() -> Health:
        """Liveness: the auth mode, whether submissions are open, the queue depth and submissions in flight."""
        try:
            stats = backend.stats()
        except Exception as error:  # any backend failure (a dead actor, a closed file) means unhealthy
            raise ApiError(503, "store_unavailable", f"the store does not answer: {type(error).__name__}") from None
        return Health(status="ok", auth_mode=settings.auth_mode, public_submissions=settings.public_submissions,
                      queue_depth=stats["queue_depth"], in_flight=stats["in_flight"])

    @router.get("/version", response_model=Version)
    def get_version() -> Version:
        """The server's name, package version and API version."""
        return Version(name="prism-ray", version=version("prism-ray"), api="v1")

    return router
