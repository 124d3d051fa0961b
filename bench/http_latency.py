"""HTTP latency of the API under concurrency, before and after the read model and group commit: the app under
uvicorn in its own process, over a StoreBackend on a DuckDB file seeded with scored submissions; C concurrent clients
on loopback.

Each mode gets a fresh copy of the seeded file and its own server. `before` is the old per-request path, kept here
only: every read goes to the store and is built and serialised again, every intake and nonce is its own store
transaction. `after` is the app as it ships: reads come from the read model the server keeps, concurrent intakes
share transactions (prism_ray/backend/group_commit.py), behind the connection guard
(serve_app/connection_guard.py) with its default limits; `unguarded` is `after` on uvicorn's plain protocol, to show
what the guard costs. For each mode:
p50/p99 of GET /health (the baseline: routing and JSON only), GET /v1/leaderboard, GET /v1/submissions/{id} and
signed POST /v1/submissions, each p50 as a ratio of that mode's /health, measured the same minute; then bursts of B
signed posts sent at once (B connections), as when a subnet's miners all submit at an epoch boundary; then the
targets.

    python bench/http_latency.py [--concurrency 16] [--requests 400] [--scored 1000] [--burst 100] [--bursts 3]
                                 [--modes before,after,unguarded]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import shutil
import socket
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from bittensor_wallet import Keypair

from prism_ray.access.auth import sign_request
from prism_ray.evaluation.report import RunReport
from prism_ray.intake.bundle import load_bundle
from prism_ray.store import Store

TARGETS = ("targets: GET /v1/leaderboard p50 ≤ 10 ms and ≤ 2× /health; signed POST p50 ≤ 60 ms; "
           "POST p99 ≤ 1 s in a burst of 100")


def bundle_zip(tag: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("architecture.py", f"import torch\n\ndef build_model(ctx):\n    # {tag}\n"
                                            "    return torch.nn.Embedding(ctx.vocab_size, ctx.vocab_size)\n")
        archive.writestr("training.py", "def train(ctx):\n    for _ in ctx.iter_train_batches(ctx.build_model()):\n"
                                        "        pass\n")
        archive.writestr("prism.yaml", "tokenizer: bytes\n")
    return buffer.getvalue()


def seed(path: Path, scored: int) -> list[str]:
    """`scored` completed submissions from as many hotkeys, so the leaderboard has rows to rank; their ids."""
    with Store(path) as store:
        for i in range(scored):
            store.create_submission(f"hotkey-{i}", "seed.zip", load_bundle(bundle_zip(f"seed-{i}")))
        ids = []
        for record in store.claim_next("bench", lease_seconds=600, limit=scored):
            bpb = 1.0 + record.seq / scored
            final = 1 / (1 + bpb)
            report = RunReport(status="completed", stage="score", bpb=bpb, final_score=final, bytes_scored=100_000,
                               tokens_scored=100_000, batches=25, batch_size=4, seq_len=1001, tokenizer="bytes",
                               model_params=66_049, device="cpu", wall_seconds=5.0, train_seconds=4.0,
                               byte_budget=100_000, score={"final_score": final, "base": final, "penalty": 1.0,
                                                           "anomaly": 1, "tie_break": 0.0, "flags": []})
            report.curve = [{"bytes": 4000 * (k + 1), "bpb": bpb + 1 / (k + 1)} for k in range(25)]
            store.complete(record.id, "bench", report)
            ids.append(record.id)
        return ids


def serve(path: str, mode: str, ports: multiprocessing.Queue) -> None:
    """The server process: signed auth; the registry open and the rate limits out of reach on purpose (the bench
    measures latency, not the limiters)."""
    import uvicorn

    from prism_ray.backend.group_commit import GroupCommit
    from prism_ray.backend.read_model import ReadModel
    from prism_ray.config import ApiSettings, ConnectionLimits
    from serve_app import StoreBackend, create_app
    from serve_app.connection_guard import guarded

    class PerRequest(ReadModel):
        """The old path: nothing kept between requests."""

        def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
            return build()

    backend = StoreBackend(Store(path))
    if mode == "before":
        backend.reads = PerRequest(backend.local, backend.settings)
        # one store transaction per intake and per nonce, as before group commit
        backend._creates = GroupCommit(backend.local.create_submissions, max_batch=1)
        backend._nonces = GroupCommit(backend.local.check_nonces, max_batch=1)
    settings = ApiSettings(rate_limit_burst=1_000_000, address_rate_limit_burst=1_000_000,
                           registry={"mode": "open"})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    ports.put(sock.getsockname()[1])
    protocol = "httptools" if mode == "unguarded" else guarded(ConnectionLimits())
    uvicorn.Server(uvicorn.Config(create_app(backend, settings), log_level="warning", access_log=False,
                                  http=protocol)).run(sockets=[sock])


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


def submissions(count: int, tag: str) -> list[dict]:
    """Distinct bundles from distinct hotkeys, signed ahead of time so the clock only sees the server."""
    requests = []
    for i in range(count):
        keypair = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
        body = json.dumps({"filename": "bench.zip", "code": base64.b64encode(bundle_zip(f"{tag}-{i}")).decode()})
        headers = {"Content-Type": "application/json", **sign_request(keypair, body.encode())}
        requests.append({"method": "POST", "url": "/v1/submissions", "content": body.encode(), "headers": headers})
    return requests


def quantiles(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100)
    return cuts[49] * 1000, cuts[98] * 1000


def run_mode(mode: str, path: Path, args: argparse.Namespace, ids: list[str]) -> dict[str, tuple[float, float]]:
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=serve, args=(str(path), mode, ports), daemon=True)
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
        gets = {"method": "GET"}
        runs = [("GET /health", [{**gets, "url": "/health"}] * args.requests),
                ("GET /v1/leaderboard", [{**gets, "url": "/v1/leaderboard"}] * args.requests),
                ("GET /v1/submissions/{id}", [{**gets, "url": f"/v1/submissions/{ids[i % 50]}"}
                                              for i in range(args.requests)]),
                ("POST /v1/submissions", submissions(args.requests, mode))]
        results = {}
        for name, requests in runs:
            asyncio.run(measure(url, args.concurrency, requests[: args.concurrency]))  # warm connections
            started = time.perf_counter()
            latencies = asyncio.run(measure(url, args.concurrency, requests[args.concurrency:]))
            wall = time.perf_counter() - started
            p50, p99 = results[name] = quantiles(latencies)
            ratio = p50 / results["GET /health"][0]
            print(f"{mode:<7}{name:<26} n={len(latencies):<4} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
                  f"{len(latencies) / wall:6.0f} req/s  p50 {ratio:5.1f}× /health")
        latencies = []
        for burst in range(args.bursts):  # each burst all at once, from fresh hotkeys
            latencies += asyncio.run(measure(url, args.burst, submissions(args.burst, f"{mode}-burst-{burst}")))
        name = f"POST ×{args.burst} at once"
        p50, p99 = results[name] = quantiles(latencies)
        print(f"{mode:<7}{name:<26} n={len(latencies):<4} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
              f"max {max(latencies) * 1000:7.2f} ms")
        return results
    finally:
        server.terminate()
        server.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--scored", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=100, help="posts sent at once in each burst")
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--modes", default="before,after",
                        help="before (per-request reads and transactions), after (read model, group commit, "
                        "connection guard), unguarded (after without the connection guard)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seeded = Path(tmp) / "seeded.duckdb"
        ids = seed(seeded, args.scored)
        print(f"{args.concurrency} concurrent clients, {args.scored} scored submissions on the board")
        results = {}
        for mode in args.modes.split(","):
            copy = Path(tmp) / f"{mode}.duckdb"
            shutil.copy(seeded, copy)
            results[mode] = run_mode(mode, copy, args, ids)
    print(TARGETS)
    for mode, result in results.items():
        board, health, post = (result[name][0] for name in ("GET /v1/leaderboard", "GET /health",
                                                            "POST /v1/submissions"))
        burst = result[f"POST ×{args.burst} at once"][1]
        print(f"{mode:<7}leaderboard p50 {board:.2f} ms ({'met' if board <= 10 else 'missed'}), "
              f"{board / health:.1f}× /health ({'met' if board <= 2 * health else 'missed'}); "
              f"POST p50 {post:.2f} ms ({'met' if post <= 60 else 'missed'}); "
              f"burst of {args.burst} POST p99 {burst:.0f} ms ({'met' if burst <= 1000 else 'missed'})")


if __name__ == "__main__":
    main()
