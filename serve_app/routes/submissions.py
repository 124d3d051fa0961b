"""`POST /v1/submissions`, `GET /v1/submissions/{id}` and its `/curve`.

Before anything is stored, a POST passes, in this order: the rate limit of its client address (before any
parsing), the auth headers (timestamp window), the registry (the hotkey must be registered: 403 otherwise, and
nothing is stored), the body (read as a stream, refused the moment it passes the size limit), the signature and the
one-time nonce, and the hotkey's rate limit. Then the backend runs intake: a broken bundle is answered 422 with its
typed reasons and stored as a rejection, up to a bound per hotkey and in all.

`POST /internal/v1/bridge/submissions` is the BASE platform's way in: it verified the miner's signature and nonce
itself, so this route checks the internal token, the challenge slug and that X-Base-Request-Hash is the body's
sha256, then treats the verified hotkey as a signed one (the registry, its nonce, its rate limit, the same intake).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Annotated, Any

from bittensor_wallet import Keypair
from fastapi import APIRouter, Header, Path, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from prism_ray.access.auth import (
    HOTKEY_HEADER,
    NONCE_HEADER,
    NONCE_PATTERN,
    SIGNATURE_HEADER,
    SIGNATURE_PATTERN,
    TIMESTAMP_HEADER,
    TIMESTAMP_PATTERN,
    AuthError,
    SignedHeaders,
)
from prism_ray.access.registry import Registry
from prism_ray.backend.read_model import SubmissionDetail
from prism_ray.backend.store_backend import Backend, NotStored
from prism_ray.config import ApiSettings
from prism_ray.errors import BundleError
from prism_ray.intake.bundle import decode_base64
from serve_app import views, wire
from serve_app.errors import ApiError, responses, validation_reasons
from serve_app.internal import BEARER, SlugHeader, check_internal
from serve_app.limits import TokenBuckets
from serve_app.models import Curve, SubmissionAccepted, SubmissionRequest, SubmissionStatus

FILENAME_HEADER = "X-Submission-Filename"
DEV_HOTKEY = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FILENAME = re.compile(r"[^\x00-\x1f\x7f]{1,255}")
_HEADER_PATTERNS = {HOTKEY_HEADER: DEV_HOTKEY.pattern, SIGNATURE_HEADER: SIGNATURE_PATTERN,
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
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }},
}
_BRIDGE_OPENAPI: dict[str, Any] = {"requestBody": _SUBMISSION_OPENAPI["requestBody"]}
SubmissionId = Annotated[str, Path(min_length=1, max_length=128)]
_HASH = re.compile(r"[0-9a-fA-F]{64}")
_BRIDGE_NONCE = re.compile(NONCE_PATTERN)


def router(backend: Backend, settings: ApiSettings, registry: Registry) -> APIRouter:
    submissions = APIRouter(tags=["submissions"])
    buckets = TokenBuckets(settings.rate_limit_burst, settings.rate_limit_per_minute)
    addresses = TokenBuckets(settings.address_rate_limit_burst, settings.address_rate_limit_per_minute)
    cap = settings.rejection_cap()

    def remember_nonce(hotkey: str, nonce: str) -> bool:
        return backend.check_nonce(hotkey, nonce, settings.nonce_ttl_s)

    async def intake(request: Request, hotkey: str, body: bytes) -> SubmissionAccepted:
        """An authenticated hotkey's body: its rate limit, then intake (a broken bundle: 422, stored up to the cap)."""
        _limit(buckets, hotkey, f"hotkey {hotkey}", settings.rate_limit_burst, settings.rate_limit_per_minute,
               "rate_limited")
        filename, zipped, metadata = _parse_submission(request, body)
        if isinstance(zipped, BundleError):
            record = await run_in_threadpool(backend.reject, hotkey, filename, zipped.reasons, metadata, cap)
        else:
            record = await run_in_threadpool(backend.submit, hotkey, filename, zipped, metadata, cap)
        if isinstance(record, NotStored):
            raise ApiError(422, "intake:rejected", f"the bundle was rejected at intake; {record.why}",
                           reasons=record.reasons)
        if record.status == "rejected" and not record.reused:
            raise ApiError(422, "intake:rejected", "the bundle was rejected at intake; the rejection is stored",
                           reasons=record.reasons, record=record)
        return SubmissionAccepted(**wire.identity(record, backend.settings.scoring), id=record.id, stage=record.stage,
                                  hotkey=record.hotkey, filename=record.filename, name=record.name,
                                  reused=record.reused, duplicate_of=record.duplicate_of, reasons=record.reasons,
                                  status_url=f"/v1/submissions/{record.id}")

    @submissions.post(
        "/v1/submissions", response_model=SubmissionAccepted, openapi_extra=_SUBMISSION_OPENAPI,
        responses=responses(400, 401, 403, 404, 409, 413, 422, 429, 503, texts={
            404: "public submissions are disabled on this server",
            422: "the request is malformed, or the bundle broke an intake/contract rule (the rejection is stored, up "
                 "to a bound per hotkey)",
            503: "the registry cannot be read (no metagraph snapshot yet, a malformed file)"}))
    async def submit(request: Request) -> SubmissionAccepted:
        """Submit a bundle: JSON `{filename, code (base64 zip), metadata}` or the raw zip (any other content type).
        200 for a new submission and for one with nothing new to score (`reused`, or `state: duplicate`)."""
        if not settings.public_submissions:
            raise ApiError(404, "submissions_disabled", "public submissions are disabled on this server")
        address = request.client.host if request.client else "unknown"
        _limit(addresses, address, f"client address {address}", settings.address_rate_limit_burst,
               settings.address_rate_limit_per_minute, "rate_limited:address")
        signed = _signed_headers(request, settings)  # before reading: a stale request costs no bandwidth
        registry.admit(signed.hotkey if isinstance(signed, SignedHeaders) else signed)  # the claimed hotkey
        body = await read_body(request, settings.max_body_bytes)
        if isinstance(signed, SignedHeaders):
            hotkey = await run_in_threadpool(signed.authenticate, body, remember_nonce)
        else:
            hotkey = signed
        return await intake(request, hotkey, body)

    @submissions.post(
        "/internal/v1/bridge/submissions", response_model=SubmissionAccepted, tags=["internal"],
        openapi_extra=_BRIDGE_OPENAPI, responses=responses(400, 401, 403, 409, 413, 422, 429, 503, texts={
            400: "X-Base-Challenge-Slug names another challenge, or X-Base-Request-Hash is not the body's sha256",
            401: "missing or wrong bearer token",
            409: "X-Base-Verified-Nonce was already used by this hotkey",
            422: "a malformed header or body, or the bundle broke an intake/contract rule (stored as for /v1)",
            503: "the internal token is not configured, or the registry cannot be read"}))
    async def bridge_submit(
            request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
            challenge_slug: SlugHeader = None,
            verified_hotkey: Annotated[str | None, Header(alias="X-Base-Verified-Hotkey", description="the miner's "
                                                          "hotkey, its signature verified by BASE")] = None,
            verified_nonce: Annotated[str | None, Header(alias="X-Base-Verified-Nonce", description="the nonce it "
                                                         "signed; recorded, so a replay is 409")] = None,
            request_hash: Annotated[str | None, Header(alias="X-Base-Request-Hash", description="sha256 hex of the "
                                                       "body")] = None) -> SubmissionAccepted:
        """A miner's upload forwarded by the BASE platform (its signature already verified there): the raw zip (with
        X-Submission-Filename) or PRISM's JSON. The verified hotkey must still be registered here."""
        check_internal(settings.bearer_token(), settings.challenge_slug, credentials, challenge_slug,
                       slug_required=True)
        hotkey = _verified_hotkey(verified_hotkey, settings)
        if verified_nonce is not None and not _BRIDGE_NONCE.fullmatch(verified_nonce):
            raise ApiError(422, "request:invalid", "X-Base-Verified-Nonce must be 1-128 printable characters")
        registry.admit(hotkey)
        body = await read_body(request, settings.max_body_bytes)
        if not (request_hash and _HASH.fullmatch(request_hash)
                and request_hash.lower() == hashlib.sha256(body).hexdigest()):
            raise ApiError(400, "request:hash_mismatch", "X-Base-Request-Hash must be the sha256 hex of the body")
        if verified_nonce is not None and not await run_in_threadpool(remember_nonce, hotkey, verified_nonce):
            raise ApiError(409, "auth:replayed_nonce", "this nonce was already used by this hotkey")
        return await intake(request, hotkey, body)

    @submissions.get("/v1/submissions/{submission_id}", response_model=SubmissionStatus, tags=["results"],
                     responses=responses(404, 422))
    def get_submission(submission_id: SubmissionId) -> SubmissionStatus:
        """Status, stage, typed reasons, attempt, scores, live progress and the event timeline."""
        return views.submission_status(backend, _detail_or_404(backend, submission_id))

    @submissions.get("/v1/submissions/{submission_id}/curve", response_model=Curve, tags=["results"],
                     responses=responses(404, 422))
    def get_curve(submission_id: SubmissionId) -> Curve:
        """Cumulative bytes vs. running bpb (at most 500 points) and the run's compute profile."""
        return views.curve(backend, _detail_or_404(backend, submission_id))

    return submissions


def _limit(buckets: TokenBuckets, key: str, who: str, burst: int, per_minute: float, error: str) -> None:
    wait = buckets.take(key)
    if wait:
        raise ApiError(429, error, f"{who} is over {burst} submissions per burst / {per_minute:g} per minute; "
                       f"retry in {wait:.0f} s", headers={"Retry-After": str(math.ceil(wait))})


def _detail_or_404(backend: Backend, submission_id: str) -> SubmissionDetail:
    detail = backend.detail(submission_id)
    if detail is None:
        raise ApiError(404, "not_found", f"no submission {submission_id}")
    return detail


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


def _signed_headers(request: Request, settings: ApiSettings) -> SignedHeaders | str:
    """Signed mode: the parsed, in-window auth headers. Dev mode: the unsigned hotkey itself."""
    if settings.auth_mode == "signed":
        return SignedHeaders.parse(request.headers, settings.timestamp_window_s)
    hotkey = request.headers.get(HOTKEY_HEADER, "")
    if not DEV_HOTKEY.fullmatch(hotkey):
        raise AuthError("auth:missing_headers", "dev auth mode: X-Hotkey must be 1-64 characters of [A-Za-z0-9._-]")
    return hotkey


def _verified_hotkey(hotkey: str | None, settings: ApiSettings) -> str:
    """The bridge's X-Base-Verified-Hotkey: an ss58 address (a dev-mode server: a dev hotkey)."""
    if hotkey and settings.auth_mode == "dev" and DEV_HOTKEY.fullmatch(hotkey):
        return hotkey
    try:
        Keypair(ss58_address=hotkey or "")
    except ValueError:
        raise ApiError(422, "request:invalid", "X-Base-Verified-Hotkey must be the miner's ss58 address") from None
    return hotkey or ""


def _parse_submission(request: Request, body: bytes) -> tuple[str, bytes | BundleError, dict[str, Any] | None]:
    """(filename, the zip bytes or why they cannot be had, metadata). As PRISM reads a body: JSON when the content
    type says so, else the zip itself, whatever the type."""
    if "application/json" not in request.headers.get("content-type", "").lower():
        filename = request.headers.get(FILENAME_HEADER) or "bundle.zip"
        if not _FILENAME.fullmatch(filename):
            raise ApiError(422, "request:invalid", f"{FILENAME_HEADER} must be 1-255 printable characters")
        return filename, body, None
    try:
        parsed = SubmissionRequest.model_validate_json(body)
    except ValidationError as error:
        raise ApiError(422, "request:invalid", "the JSON body is malformed",
                       reasons=validation_reasons(error.errors())) from None
    try:
        zipped: bytes | BundleError = decode_base64(parsed.code)
    except BundleError as error:
        zipped = error
    return parsed.filename, zipped, parsed.metadata
