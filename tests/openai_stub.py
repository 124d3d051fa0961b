"""A scripted OpenAI-compatible chat server on loopback, for tests that drive a real `openai` client.

Each test queues the behaviour of the next requests with `stub.script([...])`; an item is a verdict dict (sent as
JSON content), a string (sent as raw content) or a `StubReply` (HTTP errors, refusals, delays, raw bodies).
Use it through the `openai_stub` fixture: `pytest_plugins = ["openai_stub"]` in conftest.py, or import
`openai_stub_fixture` and `openai_stub_server_fixture` into the test module (the fixture names stay the same).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


@dataclass(frozen=True)
class StubReply:
    """One scripted answer: a chat completion by default, or `status`/`body` for anything else."""

    content: str | None = None
    refusal: str | None = None
    finish_reason: str = "stop"
    status: int = 200
    body: dict[str, Any] | str | None = None  # replaces the whole response body when set
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0

    @classmethod
    def error(cls, status: int, body: dict[str, Any] | str | None = None,
              headers: dict[str, str] | None = None) -> StubReply:
        body = body if body is not None else {"error": {"message": f"stub HTTP {status}", "code": status}}
        return cls(status=status, body=body, headers=headers or {})

    @classmethod
    def refused(cls, text: str = "I can't help with that.") -> StubReply:
        return cls(content=None, refusal=text)

    @classmethod
    def slow(cls, delay_s: float, then: dict[str, Any] | str | None = None) -> StubReply:
        return replace(_as_reply(then or ""), delay_s=delay_s)


def _as_reply(item: dict[str, Any] | str | StubReply) -> StubReply:
    if isinstance(item, StubReply):
        return item
    if isinstance(item, dict):
        return StubReply(content=json.dumps(item))
    return StubReply(content=item)


class OpenAIStub:
    """The running server: `base_url`, `script(...)`, and `requests` (every JSON body received, in order)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[StubReply] = deque()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.received_at: list[float] = []  # time.monotonic() of each request's arrival
        self.base_url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def script(self, items: list[dict[str, Any] | str | StubReply]) -> None:
        with self._lock:
            self._queue.extend(_as_reply(item) for item in items)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.headers.clear()
            self.received_at.clear()

    @property
    def pending(self) -> int:
        """Scripted replies not consumed yet."""
        with self._lock:
            return len(self._queue)

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Response:
            body = await request.json()
            with self._lock:
                self.requests.append(body)
                self.headers.append(dict(request.headers))
                self.received_at.append(time.monotonic())
                reply = self._queue.popleft() if self._queue else StubReply.error(500, "openai_stub: nothing scripted")
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            return _respond(reply, body, len(self.requests))

        return app

    def start(self) -> None:
        # Binding the socket ourselves gives a free port that is known before the server runs.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", timeout_graceful_shutdown=1, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="openai-stub")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("openai_stub: the server did not start")
            time.sleep(0.01)
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)


def _respond(reply: StubReply, request: dict[str, Any], number: int) -> Response:
    if reply.body is not None:
        if isinstance(reply.body, str):
            return Response(reply.body, status_code=reply.status, headers=reply.headers, media_type="text/plain")
        return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
    prompt_chars = sum(len(str(message.get("content", ""))) for message in request.get("messages", []))
    completion = {
        "id": f"chatcmpl-stub-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "stub"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.content, "refusal": reply.refusal},
            "finish_reason": reply.finish_reason,
        }],
        "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(reply.content or "") // 4,
                  "total_tokens": prompt_chars // 4 + len(reply.content or "") // 4},
    }
    return JSONResponse(completion, status_code=reply.status, headers=reply.headers)


@pytest.fixture(scope="session", name="openai_stub_server")
def openai_stub_server_fixture() -> Iterator[OpenAIStub]:
    stub = OpenAIStub()
    stub.start()
    yield stub
    stub.stop()


@pytest.fixture(name="openai_stub")
def openai_stub_fixture(openai_stub_server: OpenAIStub) -> Iterator[OpenAIStub]:
    """The shared stub with an empty script and no recorded requests."""
    openai_stub_server.reset()
    yield openai_stub_server
    openai_stub_server.reset()
