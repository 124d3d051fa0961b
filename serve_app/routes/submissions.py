"""`POST /v1/submissions`, `GET /v1/submissions/{id}` and its `/curve`.

Before anything is stored, a POST passes, in this order: the rate limit of its client address (before any
parsing), the auth headers (timestamp window), the registry (the hotkey must be registered: 403 otherwise, and
nothing is stored), the body (read as a stream, refused the moment it passes the size limit), the signature and the
one-time nonce, and the hotkey's rate limit. Then the backend runs intake: a broken bundle is answered 422 with its
typed reasons and stored as a rejection, up to a bound per hotkey and in all.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

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
)
from prism_ray.backend import Backend, NotStored
from prism_ray.bundle import decode_base64
from prism_ray.errors import BundleError
from prism_ray.read_model import SubmissionDetail
from prism_ray.registry import Registry
from serve_app import views
from serve_app.errors import ApiError, responses, validation_reasons
from serve_app.limits import TokenBuckets
from serve_app.models import ApiSettings, Curve, SubmissionAccepted, SubmissionRequest, SubmissionStatus

FILENAME_HEADER = "X-Submission-Filename"
ZIP_MEDIA_TYPES = ("application/zip", "application/x-zip-compressed")
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
    }},
}
SubmissionId = Annotated[str, Path(min_length=1, max_length=128)]


def router(backend: Backend, settings: ApiSettings, registry: Registry) -> APIRouter:
    submissions = APIRouter(tags=["submissions"])
    buckets = TokenBuckets(settings.rate_limit_burst, settings.rate_limit_per_minute)
    addresses = TokenBuckets(settings.address_rate_limit_burst, settings.address_rate_limit_per_minute)
    cap = settings.rejection_cap()

    def remember_nonce(hotkey: str, nonce: str) -> bool:
        return backend.check_nonce(hotkey, nonce, settings.nonce_ttl_s)

    @submissions.post(
        "/v1/submissions", status_code=202, response_model=SubmissionAccepted, openapi_extra=_SUBMISSION_OPENAPI,
        responses={200: {"model": SubmissionAccepted, "description": "nothing new to score: this hotkey's earlier "
                         "identical submission (`reused`), or a duplicate of another's"},
                   **responses(401, 403, 404, 409, 413, 415, 422, 429, 503, texts={
                       404: "public submissions are disabled on this server",
                       422: "the request is malformed, or the bundle broke an intake/contract rule (the rejection "
                            "is stored, up to a bound per hotkey)",
                       503: "the registry cannot be read (no metagraph snapshot yet, a malformed file)"})})
    async def submit(request: Request, response: Response) -> SubmissionAccepted:
        """Submit a bundle: JSON `{filename, code (base64 zip), metadata}` or a raw zip body."""
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
        if record.reused or record.status != "pending":
            response.status_code = 200
        return SubmissionAccepted(id=record.id, status=record.status, stage=record.stage, hotkey=record.hotkey,
                                  filename=record.filename, name=record.name, created_at=record.created_at,
                                  reused=record.reused, duplicate_of=record.duplicate_of, reasons=record.reasons,
                                  status_url=f"/v1/submissions/{record.id}")

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
                       reasons=validation_reasons(error.errors())) from None
    try:
        zipped: bytes | BundleError = decode_base64(parsed.code)
    except BundleError as error:
        zipped = error
    return parsed.filename, zipped, parsed.metadata
