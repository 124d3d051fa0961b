"""`prism-ray serve` and `prism-ray demo`: a cluster (joined or local) plus the HTTP API on Ray Serve."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ray import serve

from prism_ray.cluster.client import ClusterBackend
from prism_ray.cluster.runtime import ClusterHandle, connect, start_cluster
from prism_ray.config import ApiSettings, Settings
from serve_app.connection_guard import PROXY_CALLBACK, PROXY_CALLBACK_VARIABLE
from serve_app.deployment import build_ingress


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


# Serve's replicas would log every request, and Ray forwards workers' logs to this process: the CLI's own output
# would drown in access lines. serve.start configures only the controller and proxies; serve.run the deployments.
_QUIET = {"enable_access_log": False, "log_level": "WARNING"}


def start_service(address: str | None, settings: Settings, api: ApiSettings, host: str, port: int) -> Service:
    # The Serve proxy takes its HTTP protocol from this callback, read from the environment Ray's processes inherit:
    # a cluster started here gets the connection guard; a joined one needs it set where `ray start` ran.
    os.environ.setdefault(PROXY_CALLBACK_VARIABLE, PROXY_CALLBACK)
    cluster = start_cluster(address, settings)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Started Serve", "Application is ready", ...
    serve.start(http_options={"host": host, "port": port}, logging_config=_QUIET)
    serve.run(build_ingress(ReplicaBackend(cluster.settings), api), name="prism", route_prefix="/",
              logging_config=_QUIET)
    return Service(cluster, f"http://{host}:{port}")
