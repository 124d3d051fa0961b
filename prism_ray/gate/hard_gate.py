"""The LLM hard gate (docs/gate.md): an OpenAI-compatible model reviews the whole bundle before any GPU work.

It fails closed: only a well-formed verdict from the model allows or rejects; every error, refusal or malformed reply
ends `held`. Final verdicts are cached by the sha256 of what was reviewed, so a re-run never asks twice.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prism_ray.config import GateSettings
from prism_ray.errors import Reason
from prism_ray.gate.prompt import (
    GATE_PROMPT_VERSION,
    VERDICT_SCHEMA,
    VERDICT_SCHEMA_NAME,
    ReviewedFile,
    RuleId,
    review_files,
    system_prompt,
    user_prompt,
)
from prism_ray.intake.bundle import Bundle

if TYPE_CHECKING:
    import openai

GateStatus = Literal["allowed", "rejected", "held", "skipped"]
_RETRYABLE_STATUS = frozenset({408, 409, 429})
_KEY_PATTERN = re.compile(r"[0-9a-f]{64}")


class GateReport(BaseModel):
    """The gate's verdict as a report shows it (the full exchange with the model is in the store's audits)."""

    status: Literal["allowed", "rejected", "held", "skipped"]
    message: str
    model: str | None = None
    prompt_version: str | None = None
    cached: bool = False
    confidence: float | None = None
    reasons: list[Reason] = Field(default_factory=list)


class GateAudit(BaseModel):
    """One call to the model, kept so the store can show exactly what was asked and answered."""

    model: str
    prompt_version: str
    request_sha256: str
    raw_reply: str | None = None
    latency_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attempt: int
    outcome: Literal["allow", "reject", "bad_reply", "unavailable"]
    error: str | None = None


class GateResult(BaseModel):
    status: GateStatus
    reasons: list[Reason] = Field(default_factory=list)
    model: str
    prompt_version: str = GATE_PROMPT_VERSION
    request_sha256: str
    cached: bool = False
    confidence: float | None = None
    message: str
    audits: list[GateAudit] = Field(default_factory=list)

    def to_report(self) -> GateReport:
        """The compact block a run report shows."""
        return GateReport(status=self.status, message=self.message, model=self.model,
                          prompt_version=self.prompt_version, cached=self.cached, confidence=self.confidence,
                          reasons=self.reasons)


class CachedVerdict(BaseModel):
    """A final verdict (never a hold) as a cache keeps it."""

    status: Literal["allowed", "rejected"]
    reasons: list[Reason]
    confidence: float | None
    model: str
    prompt_version: str
    request_sha256: str


class VerdictCache(Protocol):
    def get(self, key: str) -> CachedVerdict | None: ...

    def put(self, key: str, verdict: CachedVerdict) -> None: ...


class MemoryVerdictCache:
    def __init__(self) -> None:
        self._verdicts: dict[str, CachedVerdict] = {}

    def get(self, key: str) -> CachedVerdict | None:
        return self._verdicts.get(key)

    def put(self, key: str, verdict: CachedVerdict) -> None:
        self._verdicts[key] = verdict


class FileVerdictCache:
    """One `<sha256>.json` per verdict, written atomically so a crash never leaves half a verdict."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        if not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"verdict cache key must be a sha256 hex digest, got {key!r}")
        return self.directory / f"{key}.json"

    def get(self, key: str) -> CachedVerdict | None:
        try:
            verdict = CachedVerdict.model_validate_json(self._path(key).read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError:
            return None  # a damaged entry is a miss: the bundle is simply reviewed again
        return verdict if verdict.request_sha256 == key else None

    def put(self, key: str, verdict: CachedVerdict) -> None:
        target = self._path(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(verdict.model_dump_json(indent=2).encode())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


class _ReplyReason(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rule: RuleId
    message: str = Field(min_length=1)
    file: str | None = None
    line: int | None = None


class _ReplyVerdict(BaseModel):
    """The model's answer; anything that does not parse as exactly this is a bad reply."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["allow", "reject"]
    reasons: list[_ReplyReason]
    confidence: float = Field(ge=0, le=1)


@dataclass(frozen=True)
class _Attempt:
    audit: GateAudit
    verdict: _ReplyVerdict | None = None
    failure: Reason | None = None
    retry: bool = False
    retry_after_s: float | None = None


def review(bundle: Bundle, settings: GateSettings | None = None, cache: VerdictCache | None = None) -> GateResult:
    """Review `bundle` with the configured model: allowed, rejected, held (fail closed) or skipped."""
    settings = settings or GateSettings()
    files = review_files(bundle)
    key = request_sha256(files, settings.model)
    identity = {"model": settings.model, "prompt_version": GATE_PROMPT_VERSION, "request_sha256": key}
    if settings.mode == "off":
        return GateResult(status="skipped", message="gate: off", **identity)
    size = sum(len(file.text) for file in files)
    if size > settings.max_review_chars:
        reason = Reason(rule="gate:too_large", message=f"the bundle has {size:,} characters to review, over the "
                        f"gate's limit of {settings.max_review_chars:,}; the gate never truncates, so shrink it")
        return GateResult(status="rejected", reasons=[reason], message=f"gate: rejected ({reason.message})", **identity)
    if cache is not None and (hit := cache.get(key)) is not None:
        return GateResult(status=hit.status, reasons=hit.reasons, confidence=hit.confidence, cached=True,
                          message=_verdict_message(hit.status, hit.reasons, settings.model, hit.confidence) +
                          " (cached)", **identity)
    api_key, missing = _api_key(settings)
    if api_key is None:
        if settings.mode == "optional":
            return GateResult(status="skipped", message="gate: skipped (no API key)", **identity)
        reason = Reason(rule="gate:no_api_key", message=f"the gate is required but has no API key: {missing}")
        return GateResult(status="held", reasons=[reason], message=f"gate: held ({reason.message})", **identity)
    result = _call_model(bundle, files, settings, api_key, identity)
    if cache is not None and result.status in ("allowed", "rejected"):
        cache.put(key, CachedVerdict(status=result.status, reasons=result.reasons, confidence=result.confidence,
                                     **identity))
    return result


def request_sha256(files: list[ReviewedFile], model: str) -> str:
    """The cache key: what was reviewed, by which model, under which prompt (the per-request nonce excluded)."""
    material = {"prompt_version": GATE_PROMPT_VERSION, "model": model,
                "files": [[file.path, file.role, file.text] for file in files]}
    return hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _api_key(settings: GateSettings) -> tuple[str | None, str]:
    """The key and, when there is none, where it was looked for. A configured key file wins over the variable."""
    if settings.api_key_file is not None:
        try:
            key = settings.api_key_file.read_text().strip()
        except OSError:
            key = ""
        return key or None, f"the key file {settings.api_key_file} is missing or empty"
    key = os.environ.get(settings.api_key_env, "").strip()
    return key or None, f"set {settings.api_key_env} or PRISM_GATE_API_KEY_FILE"


def _call_model(bundle: Bundle, files: list[ReviewedFile], settings: GateSettings, api_key: str,
                identity: dict[str, str]) -> GateResult:
    nonce = _nonce(files)
    request: dict[str, Any] = {
        "model": settings.model,
        "temperature": 0,
        "messages": [{"role": "system", "content": system_prompt(nonce)},
                     {"role": "user", "content": user_prompt(bundle, files, nonce)}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": VERDICT_SCHEMA_NAME, "strict": True, "schema": VERDICT_SCHEMA}},
    }
    if extra_body := _provider_options(settings):
        request["extra_body"] = extra_body
    audits: list[GateAudit] = []
    import openai  # here, not at the top: every Ray stage worker imports this module, few ever call a model

    with openai.OpenAI(base_url=settings.base_url, api_key=api_key, timeout=settings.timeout_s,
                       max_retries=0) as client:
        for attempt in range(1, settings.max_attempts + 1):
            outcome = _attempt(client, request, settings, attempt, identity)
            audits.append(outcome.audit)
            if outcome.verdict is not None:
                return _final(outcome.verdict, settings.model, identity, audits)
            if not outcome.retry or attempt == settings.max_attempts:
                break
            time.sleep(outcome.retry_after_s if outcome.retry_after_s is not None
                       else settings.backoff_s * 2 ** (attempt - 1))
    assert outcome.failure is not None
    tries = f"{len(audits)} attempt{'s' if len(audits) > 1 else ''}"
    failure = outcome.failure.model_copy(update={"message": f"{outcome.failure.message} (after {tries})"})
    return GateResult(status="held", reasons=[failure], message=f"gate: held ({failure.message})", audits=audits,
                      **identity)


def _nonce(files: list[ReviewedFile]) -> str:
    # Random per request so a submission cannot know, and so cannot forge, the markers that close its block.
    while True:
        nonce = secrets.token_hex(16)
        if not any(nonce in file.text or nonce in file.path for file in files):
            return nonce


def _provider_options(settings: GateSettings) -> dict[str, Any] | None:
    # OpenRouter otherwise may route to a provider that silently ignores response_format.
    host = urlparse(settings.base_url).hostname or ""
    if host == "openrouter.ai" or host.endswith(".openrouter.ai"):
        return {"provider": {"require_parameters": True}}
    return None


def _attempt(client: openai.OpenAI, request: dict[str, Any], settings: GateSettings, attempt: int,
             identity: dict[str, str]) -> _Attempt:
    import openai

    started = time.monotonic()

    def audit(outcome: str, error: str | None = None, raw_reply: str | None = None, usage: Any = None) -> GateAudit:
        return GateAudit(latency_s=time.monotonic() - started, attempt=attempt, outcome=outcome, error=error,
                         raw_reply=raw_reply, prompt_tokens=getattr(usage, "prompt_tokens", None),
                         completion_tokens=getattr(usage, "completion_tokens", None), **identity)

    def unavailable(error: str, retry: bool, retry_after_s: float | None = None) -> _Attempt:
        failure = Reason(rule="gate:unavailable", message=f"the review endpoint failed: {error}")
        return _Attempt(audit=audit("unavailable", error), failure=failure, retry=retry, retry_after_s=retry_after_s)

    try:
        completion = client.chat.completions.create(**request)
    except openai.APITimeoutError:
        return unavailable(f"no answer within {settings.timeout_s:g} s", retry=True)
    except openai.APIConnectionError as error:
        return unavailable(f"connection failed ({error})", retry=True)
    except openai.APIStatusError as error:
        status = error.status_code
        detail = f"HTTP {status} {_one_line(error.response.text)[:300]}".rstrip()
        if status not in _RETRYABLE_STATUS and status < 500:
            return unavailable(detail, retry=False)
        retry_after = _retry_after_s(error.response.headers)
        if retry_after is not None and retry_after > settings.max_retry_after_s:
            return unavailable(f"{detail}; it asked to retry after {retry_after:g} s", retry=False)
        return unavailable(detail, retry=True, retry_after_s=retry_after)
    except openai.OpenAIError as error:
        failure = Reason(rule="gate:bad_reply", message=f"the review model's reply is unusable: {error}")
        return _Attempt(audit=audit("bad_reply", str(error)), failure=failure, retry=True)
    raw_reply, verdict, problem = _read_completion(completion)
    usage = getattr(completion, "usage", None)
    if verdict is None:
        failure = Reason(rule="gate:bad_reply", message=f"the review model's reply is unusable: {problem}")
        return _Attempt(audit=audit("bad_reply", problem, raw_reply, usage), failure=failure, retry=True)
    return _Attempt(audit=audit(verdict.verdict, None, raw_reply, usage), verdict=verdict)


def _read_completion(completion: Any) -> tuple[str | None, _ReplyVerdict | None, str]:
    """(raw reply, verdict or None, the problem when None). Refusals and filtered or cut replies never count."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        return None, None, "the reply has no choices"
    choice = choices[0]
    message = getattr(choice, "message", None)
    raw_reply = getattr(message, "content", None)
    raw_reply = raw_reply if isinstance(raw_reply, str) else None
    refusal = getattr(message, "refusal", None)
    finish_reason = getattr(choice, "finish_reason", None)
    if refusal:
        return raw_reply, None, f"the model refused: {_one_line(str(refusal))}"
    if finish_reason in ("content_filter", "length"):
        return raw_reply, None, f"the reply was cut short (finish_reason {finish_reason})"
    if not raw_reply or not raw_reply.strip():
        return raw_reply, None, "the reply is empty"
    try:
        return raw_reply, _ReplyVerdict.model_validate_json(raw_reply, strict=True), ""
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "reply"
        return raw_reply, None, f"not a valid verdict ({where}: {first['msg']})"


def _retry_after_s(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date; None when absent or unreadable."""
    try:
        if (milliseconds := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(milliseconds) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _final(verdict: _ReplyVerdict, model: str, identity: dict[str, str], audits: list[GateAudit]) -> GateResult:
    status: Literal["allowed", "rejected"] = "allowed" if verdict.verdict == "allow" else "rejected"
    reasons = [Reason(rule=f"gate:{reason.rule}", message=reason.message, file=reason.file, line=reason.line)
               for reason in verdict.reasons] if status == "rejected" else []
    if status == "rejected" and not reasons:
        reasons = [Reason(rule="gate:other", message="the reviewer rejected the bundle without giving a reason")]
    return GateResult(status=status, reasons=reasons, confidence=verdict.confidence, audits=audits,
                      message=_verdict_message(status, reasons, model, verdict.confidence), **identity)


def _verdict_message(status: str, reasons: list[Reason], model: str, confidence: float | None) -> str:
    sure = f", confidence {confidence:.2f}" if confidence is not None else ""
    if status == "allowed":
        return f"gate: allowed by {model}{sure}"
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return f"gate: rejected by {model}{sure}: {_one_line(str(reasons[0]))}{more}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
