"""The HTTP client of the prism-ray API (docs/api.md): zips a bundle, signs and posts it, polls its status.

`prism-ray submit/status/leaderboard` use it; so can any script. Responses are returned as the API's JSON.
"""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from bittensor_wallet import Keypair

from prism_ray.access.auth import HOTKEY_HEADER, sign_request

SETTLED_STATUSES = ("completed", "rejected", "failed", "held")  # held waits for an operator; a duplicate is rejected
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


class ClientError(Exception):
    """A request that could not be made or was refused; `status_code` and `body` when the server answered."""

    def __init__(self, message: str, status_code: int | None = None, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body or {}


def bundle_bytes(path: Path) -> bytes:
    """A .zip file as is, or a directory zipped deterministically: the same files give the same bytes."""
    if path.is_file():
        return path.read_bytes()
    if not path.is_dir():
        raise ClientError(f"bundle {path} does not exist")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(path.rglob("*")):
            rel = file.relative_to(path).as_posix()
            if any(part == "__pycache__" or part.startswith(".") for part in PurePosixPath(rel).parts):
                continue
            if file.is_symlink():
                raise ClientError(f"{rel} is a symbolic link; bundles hold plain files only")
            if file.is_file():
                info = zipfile.ZipInfo(rel, date_time=_FIXED_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, file.read_bytes())
    return buffer.getvalue()


class PrismClient:
    """Signed with `keypair`, or (a dev-mode server only) identified by the unsigned `dev_hotkey`."""

    def __init__(self, url: str, keypair: Keypair | None = None, dev_hotkey: str | None = None,
                 timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.keypair = keypair
        self.dev_hotkey = dev_hotkey
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrismClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, source: Path | bytes, filename: str | None = None,
               metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST the bundle (JSON with base64 code); the answer (200) carries `id`, `status`, `state` and `reused`."""
        if isinstance(source, bytes):
            zipped, default_name = source, "bundle.zip"
        else:
            name = source.resolve().name
            zipped, default_name = bundle_bytes(source), name if name.endswith(".zip") else f"{name}.zip"
        body = json.dumps({"filename": filename or default_name, "code": base64.b64encode(zipped).decode(),
                           "metadata": metadata}).encode()
        headers = {"Content-Type": "application/json", **self._auth_headers(body)}
        return self._request("POST", "/v1/submissions", content=body, headers=headers)

    def status(self, submission_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/submissions/{submission_id}")

    def curve(self, submission_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/submissions/{submission_id}/curve")

    def leaderboard(self, epoch: int | None = None) -> dict[str, Any]:
        """One epoch's board, or (no `epoch`) every epoch's: the server's default is the current epoch only."""
        params = {"all_epochs": "true"} if epoch is None else {"epoch": epoch}
        return self._request("GET", "/v1/leaderboard", params=params)

    def wait(self, submission_id: str, poll_s: float = 1.0, timeout_s: float | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the submission settles (or `timeout_s` passes); `on_update` sees every answer."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(submission_id)
            if on_update is not None:
                on_update(status)
            if status["status"] in SETTLED_STATUSES or (deadline is not None and time.monotonic() >= deadline):
                return status
            time.sleep(poll_s)

    def _auth_headers(self, body: bytes) -> dict[str, str]:
        if self.keypair is not None:
            return sign_request(self.keypair, body)
        if self.dev_hotkey:
            return {HOTKEY_HEADER: self.dev_hotkey}
        raise ClientError("submitting needs a key (--wallet/--hotkey or --key-file) or, on a dev server, "
                          "--dev-hotkey")

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ClientError(f"cannot reach {self.url}: {error}") from None
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:500]}
        if response.is_error:
            message = body.get("message") or response.reason_phrase
            retry = response.headers.get("Retry-After")
            raise ClientError(f"{response.status_code} {body.get('error', '')}: {message}"
                              + (f" (retry after {retry} s)" if retry else ""), response.status_code, body)
        return body
