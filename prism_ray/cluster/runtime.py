"""Deployment: join or start a Ray cluster and bring up the store and scheduler actors (docs/operator.md).

`start_cluster("auto", settings)` joins a cluster started with `ray start --head`; `start_cluster(None, settings)`
starts a local one on this machine's GPUs, or on ONE LOGICAL GPU when it has none, so the whole system runs on a
laptop (training then runs on the CPU). Both actors are detached and named in one namespace: a second caller
(another CLI, the HTTP layer) gets the running ones, and they outlive the process that created them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.actor import ActorHandle

from prism_ray.cluster import orphans
from prism_ray.cluster.scheduler import SCHEDULER_NAME, scheduler_actor
from prism_ray.cluster.store_actor import STORE_NAME, store_actor
from prism_ray.config import Settings
from prism_ray.errors import PrismError
from prism_ray.harness.isolation import sandbox_available

_STOP_TIMEOUT_SECONDS = 120.0  # for the scheduler to drain (its cancelled tasks get 30 s), or the store to close
_EXIT_WAIT_SECONDS = 15.0  # for the processes of a stopped local cluster to exit
log = logging.getLogger(__name__)
NO_GPU_NOTICE = "no GPU found: training runs on the CPU under one simulated GPU slot"


@dataclass
class ClusterHandle:
    """What callers hold: the settings the cluster runs with and the two actors (picklable, so Serve replicas
    can receive it). `notice` says what kind of cluster this is, for the CLI to print."""

    settings: Settings
    store: ActorHandle
    scheduler: ActorHandle
    notice: str
    owns_ray: bool = False  # this process started Ray, so closing the handle ends the cluster
    drained: list[str] | None = None  # once drained: the ids its scheduler handed back to the queue
    not_ray: frozenset[int] = frozenset()  # this process's children from before it started Ray

    def drain(self) -> list[str]:
        """Stop the scheduler: no new claims, and its running attempts go back to the queue without costing an
        attempt (their stages are cancelled). Returns their ids; the store keeps answering until `stop`."""
        if self.drained is None:
            self.drained = []  # asked once, even if that fails: a dead or stuck scheduler is not asked again
            self.drained = ray.get(self.scheduler.stop.remote(), timeout=_STOP_TIMEOUT_SECONDS)
            ray.kill(self.scheduler)
        return self.drained

    def stop(self) -> list[str]:
        """Drain, then close the store; the DuckDB file stays where it is, and the next start carries on."""
        handed_back = self.drain()
        ray.get(self.store.close.remote(), timeout=_STOP_TIMEOUT_SECONDS)
        ray.kill(self.store)
        return handed_back

    def close(self) -> None:
        """Leave the cluster: a cluster this process started is stopped with it, and this returns once its
        processes have exited; a joined one keeps running (its scheduler too: nothing to drain)."""
        if not self.owns_ray:
            ray.shutdown()
            return
        # Ray waits for the processes it started itself, not for theirs (the dashboard's module processes, the
        # raylet's agents), which notice their parent is gone a moment later.
        started = _descendants(os.getpid()) - self.not_ray
        try:
            self.stop()
        finally:
            ray.shutdown(wait_for_processes=True)
            _wait_until_gone(started, _EXIT_WAIT_SECONDS)


def cluster_settings(settings: Settings) -> Settings:
    """The cluster never runs miner code unsandboxed: sandbox mode is `required`, whatever was configured. Nor
    unreviewed by accident: the gate's default `optional` (no key: skipped) runs as `required` (no key: held);
    only an explicit `off` turns it off (docs/gate.md)."""
    gate = settings.gate.model_copy(update={"mode": "required"}) if settings.gate.mode == "optional" else settings.gate
    return settings.model_copy(update={"sandbox": settings.sandbox.model_copy(update={"mode": "required"}),
                                       "gate": gate})


def start_cluster(address: str | None, settings: Settings | None = None) -> ClusterHandle:
    """Join (`address`, e.g. "auto") or start (None) a Ray cluster and make sure the store and scheduler run."""
    settings = cluster_settings(settings or Settings())
    namespace = settings.cluster.namespace
    owns_ray, dashboard, not_ray = False, "", frozenset()
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
        orphans.reap(settings.cache_dir)  # agents a hard-killed predecessor on this state dir left holding ports
        not_ray = frozenset(_descendants(os.getpid()))
        # address="local": never attach to some other cluster that happens to run on this machine. Ray's
        # start-up chatter stays in its logs; the notice says what matters.
        context = ray.init(address="local", namespace=namespace, num_gpus=gpus or 1, resources={"head": 1},
                           include_dashboard=settings.cluster.dashboard, logging_level=logging.WARNING)
        owns_ray = True
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        orphans.remember_session(settings.cache_dir, context.address_info["session_dir"])
        notice = f"local Ray cluster with {gpus} GPU(s)" if gpus else NO_GPU_NOTICE
        dashboard = f"; Ray dashboard at http://{context.dashboard_url}" if context.dashboard_url else ""
        if dashboard and os.environ.get("RAY_AUTH_MODE") == "token":  # Ray turned on token auth: the page says 401
            dashboard += " (it asks for this cluster's token: `ray get-auth-token` prints it)"
    resources = ray.cluster_resources()
    gpus_seen = "" if notice.startswith(NO_GPU_NOTICE) else f"{int(resources.get('GPU', 0))} GPU(s), "
    notice += f"; {gpus_seen}{int(resources.get('CPU', 0))} CPU(s){dashboard}"
    has_head = "head" in resources
    store = store_actor(settings, has_head)
    scheduler = scheduler_actor(settings, store, has_head)
    ray.get(scheduler.stats.remote())  # created and recovered before anyone submits
    return ClusterHandle(settings, store, scheduler, notice, owns_ray, not_ray=not_ray)


def connect(settings: Settings | None = None) -> ClusterHandle:
    """The running actors, from a process already connected to the cluster (e.g. a Serve replica)."""
    settings = cluster_settings(settings or Settings())
    namespace = settings.cluster.namespace
    return ClusterHandle(settings, ray.get_actor(STORE_NAME, namespace=namespace),
                         ray.get_actor(SCHEDULER_NAME, namespace=namespace), "connected to the running cluster")


def _local_gpus() -> int:
    import torch  # only here: joining a cluster should not pay for importing torch

    return torch.cuda.device_count()


def _descendants(root: int) -> set[int]:
    """Every live process below `root`, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # the command name, in parentheses, may hold spaces: the fields after it are fixed
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = set(), [root]
    while frontier:
        below = children.get(frontier.pop(), [])
        found.update(below)
        frontier.extend(below)
    return found


def _wait_until_gone(pids: set[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (left := {pid for pid in pids if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        log.warning("processes %s of the stopped Ray cluster are still running", sorted(left))


def _alive(pid: int) -> bool:
    try:  # a zombie has exited; only its parent's wait (or init's) is missing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
