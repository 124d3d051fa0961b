"""The connection guard on a real socket: a real uvicorn server on loopback over a real DuckDB store, raw TCP clients
that send slowly, send too much, or open too many connections. Each gets the typed JSON refusal and a closed
connection within the limit; a well-behaved client on the same server is served meanwhile."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from api_helpers import new_allowlist, scored_backend, serve, server_settings
from prism_ray.config import ConnectionLimits
from serve_app import create_app

LIMITS = ConnectionLimits(header_timeout_s=1.5, body_timeout_s=1.5, max_header_bytes=8192, max_headers=32,
                          max_connections_per_address=6)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with scored_backend(tmp_path_factory.mktemp("limits") / "prism.duckdb") as backend:
        settings = server_settings(new_allowlist(tmp_path_factory.mktemp("registry")), auth_mode="dev",
                                   registry={"mode": "open"})
        app = create_app(backend, settings)
        with serve(app, LIMITS) as url:
            yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Read until the server closes: the status, headers and JSON body of its one answer."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server refused mid-send, as it should; its answer is still readable


def test_headers_sent_slowly_are_cut_at_the_header_deadline(url):
    sock = connect(url)
    started = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    for i in range(10):  # one header every 0.5 s: the whole head would take 5 s
        time.sleep(0.5)
        try:
            sock.sendall(b"X-Slow-%d: y\r\n" % i)
        except (BrokenPipeError, ConnectionResetError):
            break
    status, headers, body = answer(sock)
    assert (status, body["error"]) == (408, "request:header_timeout") and headers["connection"] == "close"
    assert time.monotonic() - started < LIMITS.header_timeout_s + 3


def test_a_connection_that_says_nothing_is_closed(url):
    sock = connect(url)
    started = time.monotonic()
    status, _, body = answer(sock)
    assert (status, body["error"]) == (408, "request:header_timeout")
    assert time.monotonic() - started < LIMITS.header_timeout_s + 2


def test_a_body_sent_slowly_is_cut_at_the_body_deadline(url):
    """A dev-auth submission (so the app gets as far as reading the body) whose body comes a byte every 0.3 s."""
    sock = connect(url)
    started = time.monotonic()
    sock.sendall(b"POST /v1/submissions HTTP/1.1\r\nHost: x\r\nX-Hotkey: slow-miner\r\n"
                 b"Content-Type: application/zip\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(20):
        time.sleep(0.3)
        try:
            sock.sendall(b"x")
        except (BrokenPipeError, ConnectionResetError):
            break
    status, _, body = answer(sock)
    assert (status, body["error"]) == (408, "request:body_timeout")
    assert time.monotonic() - started < LIMITS.body_timeout_s + 3


@pytest.mark.parametrize("head,error", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n", "request:headers_too_large"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
     "request:too_many_headers"),
])
def test_oversized_heads_get_431(url, head, error):
    sock = connect(url)
    send_quietly(sock, head)
    status, headers, body = answer(sock)
    assert (status, body["error"]) == (431, error) and headers["connection"] == "close"


def test_connections_per_address_are_capped(url):
    idle = [connect(url) for _ in range(LIMITS.max_connections_per_address)]
    time.sleep(0.2)
    extra = connect(url)
    status, headers, body = answer(extra)
    assert (status, body["error"]) == (503, "request:too_many_connections") and headers["retry-after"] == "5"
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 5
    while True:  # the server notices the closes a moment later
        response = httpx.get(f"{url}/health", timeout=5)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 200


def test_well_behaved_clients_are_served_on_a_kept_alive_connection(url):
    with httpx.Client(base_url=url, timeout=5) as http:
        for _ in range(5):
            assert http.get("/health").status_code == 200
        response = http.get("/health", headers={f"X-Ok-{i}": "v" for i in range(20)})
        assert response.status_code == 200
