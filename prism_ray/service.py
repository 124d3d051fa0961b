"""`prism-ray serve` and `prism-ray demo`: a cluster (joined or local) plus the HTTP API on Ray Serve."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from prism_ray.client import PrismClient
from prism_ray.cluster.client import ClusterBackend
from prism_ray.cluster.runtime import ClusterHandle, connect, start_cluster
from prism_ray.config import Settings
from serve_app.deployment import build_ingress
from serve_app.models import ApiSettings

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


@dataclass(frozen=True)
class ReplicaBackend:
    """Picklable backend factory: each Serve replica attaches to the running store and scheduler actors."""

    settings: Settings

    def __call__(self) -> ClusterBackend:
        return ClusterBackend(connect(self.settings))


@dataclass
class Service:
    cluster: ClusterHandle
    url: str

    def close(self) -> list[str]:
        """Stop gracefully. A cluster this process started drains first, while the API still answers (its running
        attempts go back to the queue without costing an attempt), then it stops, API included, and this returns
        once every process of that cluster has exited. Returns the ids handed back to the queue."""
        if not self.cluster.owns_ray:  # the cluster stays: take the API off it
            serve.shutdown()
            self.cluster.close()
            return []
        try:
            return self.cluster.drain()
        finally:  # Serve goes with the cluster (serve.shutdown would only add Ray's retry warnings)
            self.cluster.close()


def start_service(address: str | None, settings: Settings, api: ApiSettings, host: str, port: int) -> Service:
    cluster = start_cluster(address, settings)
    # Access logs of every poll would drown the CLI's own output; the Ray dashboard still has the metrics.
    serve.start(http_options={"host": host, "port": port},
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    serve.run(build_ingress(ReplicaBackend(cluster.settings), api), name="prism", route_prefix="/")
    return Service(cluster, f"http://{host}:{port}")


def submit_examples(url: str, examples: list[Path], on_update=None, timeout: float = 3600.0) -> list[dict]:
    """Submit each example over HTTP as its own dev hotkey, follow them all to the end, return their states."""
    submitted = []
    for example in examples:
        client = PrismClient(url, dev_hotkey=f"demo-{example.name}")
        submitted.append((client, client.submit(example)["id"]))
    deadline = time.monotonic() + timeout
    finals = []
    for client, submission_id in submitted:
        with client:
            finals.append(client.wait(submission_id, timeout_s=max(1.0, deadline - time.monotonic()),
                                      on_update=on_update))
    return finals
