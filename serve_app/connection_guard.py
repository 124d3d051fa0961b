"""The connection guard: uvicorn's httptools protocol with the limits a hostile client must not get past
(docs/operator.md, "HTTP limits"). The app only sees a request once its headers are complete, so the header size,
the header count, the header and body read deadlines and the per-address connection cap live here, below it.

Every refusal is the API's JSON error shape with `Connection: close`. Under Ray Serve, `install()` is the proxy
callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): it makes this protocol the proxy's HTTP protocol.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from prism_ray.config import ConnectionLimits

PROXY_CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serve_app.connection_guard:install"
_HEAD_END = b"\r\n\r\n"
_LINGER_S = 1.0  # how long a refused connection's further bytes are read and dropped before it closes


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection. Limits come from `limits` (PRISM_API_* variables, read once per process)."""

    limits: ClassVar[ConnectionLimits | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if type(self).limits is None:
            type(self).limits = ConnectionLimits()
        self._address: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False
        self._new_head()

    def _new_head(self) -> None:
        self._in_head, self._head_bytes, self._head_tail, self._header_count = True, 0, b"", 0

    # --- connections --------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._address = self.client[0] if self.client else "unknown"
        open_now = _open_by_address(self.server_state)
        open_now[self._address] += 1
        limit = self.limits.max_connections_per_address
        if open_now[self._address] > limit:
            self._refuse(503, "request:too_many_connections", f"client address {self._address} already has "
                         f"{limit} open connections; close some or retry later", retry_after=5)
            return
        self._arm(self.limits.header_timeout_s, "request:header_timeout", "the request's headers did not arrive "
                  f"within {self.limits.header_timeout_s:g} s")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._address is not None:
            open_now = _open_by_address(self.server_state)
            open_now[self._address] -= 1
            if open_now[self._address] <= 0:
                del open_now[self._address]
            self._address = None
        super().connection_lost(exc)

    # --- reading ------------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:  # count raw bytes up to the blank line: the parser would buffer any amount
            window = self._head_tail + data
            end = window.find(_HEAD_END)
            self._head_bytes += end + len(_HEAD_END) - len(self._head_tail) if end >= 0 else len(data)
            self._head_tail = window[-(len(_HEAD_END) - 1):]
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, "request:headers_too_large", f"the request line and headers are over "
                             f"{self.limits.max_header_bytes:,} bytes")
                return
        super().data_received(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count <= self.limits.max_headers:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        if self._header_count > self.limits.max_headers:
            self._refuse(431, "request:too_many_headers", f"the request has {self._header_count} header fields, "
                         f"over {self.limits.max_headers}")
            return
        super().on_headers_complete()
        self._arm(self.limits.body_timeout_s, "request:body_timeout", "the request's body did not arrive within "
                  f"{self.limits.body_timeout_s:g} s")

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._new_head()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request's headers get their own deadline
            self._arm(self.limits.header_timeout_s, "request:header_timeout", "the request's headers did not "
                      f"arrive within {self.limits.header_timeout_s:g} s")

    # --- refusals -----------------------------------------------------------------------------------------------

    def _arm(self, seconds: float, error: str, message: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._refuse, 408, error, message)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, status: int, error: str, message: str, retry_after: int | None = None) -> None:
        """Answer with the API's error shape (unless a response already started) and close the connection."""
        if self._refused:
            return
        self._refused = True
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            # ErrorBody's shape (serve_app/models.py), `detail` included for PRISM's clients; not imported: the
            # proxy that runs this guard does not load the app.
            body = json.dumps({"error": error, "message": message, "reasons": [], "id": None, "status": None,
                               "detail": message}).encode()
            head = [STATUS_LINE[status], b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
            if retry_after is not None:
                head.append(b"retry-after: %d\r\n" % retry_after)
            self.transport.write(b"".join([*head, b"\r\n", body]))
        if self.cycle is not None:  # the app, if it runs, sees a disconnect and writes nothing more
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        # Closing with unread bytes pending would reset the connection and could destroy the answer on its way:
        # stop writing, discard what still comes for a moment, then close.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            self.loop.call_later(_LINGER_S, self.transport.close)
        else:
            self.transport.close()


def guarded(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol with these limits, for `uvicorn.Config(http=...)` (tests, benches, a server run by hand)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


def _open_by_address(server_state: Any) -> Counter[str]:
    """Open connections per client address, per server (one event loop: no lock)."""
    counts = getattr(server_state, "prism_open_by_address", None)
    if counts is None:
        counts = server_state.prism_open_by_address = Counter()
    return counts


def install() -> list:
    """Ray Serve's proxy callback: make the guarded protocol the one uvicorn picks for `http="auto"` (the proxy
    passes no `http`), before the proxy starts its server. Returns no middlewares."""
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedHttpToolsProtocol"
    return []
