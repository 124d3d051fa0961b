"""Deployment: join or start a Ray cluster and bring up the store and scheduler actors (docs/operator.md).

`start_cluster("auto", settings)` joins a cluster started with `ray start --head`; `start_cluster(None, settings)`
starts a local one on this machine's GPUs, or on ONE LOGICAL GPU when it has none, so the whole system runs on a
laptop (training then runs on the CPU). Both actors are detached and named in one namespace: a second caller
(another CLI, the HTTP layer) gets the running ones, and they outlive the process that created them.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.actor import ActorHandle

from prism_ray.cluster.scheduler import SCHEDULER_NAME, scheduler_actor
from prism_ray.cluster.store_actor import STORE_NAME, store_actor
from prism_ray.config import Settings
from prism_ray.errors import PrismError
from prism_ray.harness.isolation import sandbox_available

NO_GPU_NOTICE = "no GPU found: 1 logical GPU, training runs on CPU"


@dataclass
class ClusterHandle:
    """What callers hold: the settings the cluster runs with and the two actors (picklable, so Serve replicas
    can receive it). `notice` says what kind of cluster this is, for the CLI to print."""

    settings: Settings
    store: ActorHandle
    scheduler: ActorHandle
    notice: str
    owns_ray: bool = False  # this process started Ray, so closing the handle ends the cluster

    def stop(self) -> None:
        """Stop the scheduler (its running stages are cancelled and recovered by the next start) and close the
        store; the DuckDB file stays where it is."""
        ray.get(self.scheduler.stop.remote())
        ray.kill(self.scheduler)
        ray.get(self.store.close.remote())
        ray.kill(self.store)

    def close(self) -> None:
        """Leave the cluster: a cluster this process started is stopped with it; a joined one keeps running."""
        if self.owns_ray:
            self.stop()
        ray.shutdown()


def cluster_settings(settings: Settings) -> Settings:
    """The cluster never runs miner code unsandboxed: sandbox mode is `required`, whatever was configured."""
    return settings.model_copy(update={"sandbox": settings.sandbox.model_copy(update={"mode": "required"})})


def start_cluster(address: str | None, settings: Settings | None = None) -> ClusterHandle:
    """Join (`address`, e.g. "auto") or start (None) a Ray cluster and make sure the store and scheduler run."""
    settings = cluster_settings(settings or Settings())
    namespace = settings.cluster.namespace
    owns_ray = False
    if ray.is_initialized():
        notice = "using the Ray cluster this process is connected to"
    elif address is not None:
        ray.init(address=address, namespace=namespace)
        notice = f"joined the Ray cluster at {address}"
    else:
        if not sandbox_available():
            raise PrismError("sandbox:unavailable", "bubblewrap (bwrap) is not installed; the cluster refuses to run "
                             "miner code without the sandbox (apt-get install bubblewrap)")
        gpus = _local_gpus()
        # address="local": never attach to some other cluster that happens to run on this machine.
        ray.init(address="local", namespace=namespace, num_gpus=gpus or 1, resources={"head": 1})
        owns_ray = True
        notice = f"local Ray cluster with {gpus} GPU(s)" if gpus else NO_GPU_NOTICE
    resources = ray.cluster_resources()
    notice += f"; {int(resources.get('GPU', 0))} GPU(s), {int(resources.get('CPU', 0))} CPU(s)"
    has_head = "head" in resources
    store = store_actor(settings, has_head)
    scheduler = scheduler_actor(settings, store, has_head)
    ray.get(scheduler.stats.remote())  # created and recovered before anyone submits
    return ClusterHandle(settings, store, scheduler, notice, owns_ray)


def connect(settings: Settings | None = None) -> ClusterHandle:
    """The running actors, from a process already connected to the cluster (e.g. a Serve replica)."""
    settings = cluster_settings(settings or Settings())
    namespace = settings.cluster.namespace
    return ClusterHandle(settings, ray.get_actor(STORE_NAME, namespace=namespace),
                         ray.get_actor(SCHEDULER_NAME, namespace=namespace), "connected to the running cluster")


def _local_gpus() -> int:
    import torch  # only here: joining a cluster should not pay for importing torch

    return torch.cuda.device_count()
