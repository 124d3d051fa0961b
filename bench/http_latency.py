"""HTTP latency of the API under concurrency: the app under uvicorn in its own process, over a StoreBackend on a
DuckDB file seeded with scored submissions; C concurrent clients on loopback. Prints p50/p99 of GET /health (the
baseline: routing and JSON only), GET /v1/leaderboard and signed POST /v1/submissions, and each p50 as a ratio
of the baseline's, measured the same minute.

    python bench/http_latency.py [--concurrency 16] [--requests 400] [--scored 200]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import socket
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
from bittensor_wallet import Keypair

from prism_ray.auth import sign_request
from prism_ray.bundle import load_bundle
from prism_ray.store import Store


def bundle_zip(tag: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("architecture.py", f"import torch\n\ndef build_model(ctx):\n    # {tag}\n"
                                            "    return torch.nn.Embedding(ctx.vocab_size, ctx.vocab_size)\n")
        archive.writestr("training.py", "def train(ctx):\n    for _ in ctx.iter_train_batches(ctx.build_model()):\n"
                                        "        pass\n")
        archive.writestr("prism.yaml", "tokenizer: bytes\n")
    return buffer.getvalue()


def seed(path: Path, scored: int) -> None:
    """`scored` completed submissions from as many hotkeys, so the leaderboard has rows to rank."""
    with Store(path) as store:
        for i in range(scored):
            store.create_submission(f"hotkey-{i}", "seed.zip", load_bundle(bundle_zip(f"seed-{i}")))
        for record in store.claim_next("bench", lease_seconds=600, limit=scored):
            bpb = 1.0 + record.seq / scored
            store.complete(record.id, "bench", {"stage": "score", "bpb": bpb},
                           {"bpb": bpb, "final_score": 1 / (1 + bpb)}, [{"bytes": 1000, "bpb": bpb}])


def serve(path: str, ports: multiprocessing.Queue) -> None:
    """The server process: signed auth, no practical rate limit (the bench measures latency, not the limiter)."""
    import uvicorn

    from serve_app import ApiSettings, StoreBackend, create_app

    app = create_app(StoreBackend(Store(path)), ApiSettings(rate_limit_burst=1_000_000))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    ports.put(sock.getsockname()[1])
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


async def measure(url: str, concurrency: int, requests: list[dict]) -> list[float]:
    """Latency of each request, `concurrency` of them in flight at a time; every request is sent exactly once."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            request = queue.get_nowait()
            started = time.perf_counter()
            response = await http.request(**request)
            latencies.append(time.perf_counter() - started)
            assert response.status_code < 300, (response.status_code, response.text[:300])

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies


def submissions(count: int) -> list[dict]:
    """Distinct bundles from distinct hotkeys, signed ahead of time so the clock only sees the server."""
    requests = []
    for i in range(count):
        keypair = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
        body = json.dumps({"filename": "bench.zip", "code": base64.b64encode(bundle_zip(f"post-{i}")).decode()})
        headers = {"Content-Type": "application/json", **sign_request(keypair, body.encode())}
        requests.append({"method": "POST", "url": "/v1/submissions", "content": body.encode(), "headers": headers})
    return requests


def report(name: str, latencies: list[float], wall: float, baseline: float | None) -> float:
    cuts = statistics.quantiles(latencies, n=100)
    p50, p99 = cuts[49] * 1000, cuts[98] * 1000
    ratio = f"  p50 {p50 / baseline:5.1f}× /health" if baseline else ""
    print(f"{name:<24} n={len(latencies):<4} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  {len(latencies) / wall:7.0f} req/s"
          + ratio)
    return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--scored", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        seed(path, args.scored)
        context = multiprocessing.get_context("spawn")
        ports = context.Queue()
        server = context.Process(target=serve, args=(str(path), ports), daemon=True)
        server.start()
        try:
            url = f"http://127.0.0.1:{ports.get(timeout=60)}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"{url}/health").raise_for_status()
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "the server did not come up"
                    time.sleep(0.1)
            print(f"{args.concurrency} concurrent clients, {args.scored} scored submissions on the board")
            gets = {"method": "GET"}
            runs = [("GET /health", [{**gets, "url": "/health"}] * args.requests),
                    ("GET /v1/leaderboard", [{**gets, "url": "/v1/leaderboard"}] * args.requests),
                    ("POST /v1/submissions", submissions(args.requests))]
            baseline = None
            for name, requests in runs:
                asyncio.run(measure(url, args.concurrency, requests[: args.concurrency]))  # warm connections
                started = time.perf_counter()
                latencies = asyncio.run(measure(url, args.concurrency, requests[args.concurrency:]))
                p50 = report(name, latencies, time.perf_counter() - started, baseline)
                baseline = baseline or p50
        finally:
            server.terminate()
            server.join(10)


if __name__ == "__main__":
    main()
