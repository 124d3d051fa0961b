"""The stages as Ray tasks: resources per stage, Ray's own retries off, heartbeats while a GPU stage runs.

Miner code never runs here: the train stage calls run.train, which runs the miner's loop in the sandboxed trainer
and scorer processes launched by harness/supervise.py. A force-cancelled or crashed task takes them with it
(bubblewrap's --die-with-parent).
"""

from __future__ import annotations

import threading
from typing import Any

import ray
from ray import ObjectRef
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from prism_ray.cluster.store_actor import Beat
from prism_ray.config import Settings
from prism_ray.evaluation.pipeline import STAGES_BY_NAME, Job, Outcome, Stage, StageContext, StageResult, run_stage
from prism_ray.gate.hard_gate import CachedVerdict
from prism_ray.harness.records import Progress
from prism_ray.intake.bundle import Bundle


class StoreVerdicts:
    """The gate's verdict cache (gate.VerdictCache) kept in the store, so every node shares it."""

    def __init__(self, store: ActorHandle) -> None:
        self.store = store

    def get(self, key: str) -> CachedVerdict | None:
        return ray.get(self.store.cached_verdict.remote(key))

    def put(self, key: str, verdict: CachedVerdict) -> None:
        ray.get(self.store.keep_verdict.remote(key, verdict))


class Heartbeat:
    """Renews a GPU stage's lease every `interval` seconds with the latest progress, from a side thread, so a
    slow batch never looks dead; the store coalesces beats, so this is cheap however fast batches come."""

    def __init__(self, store: ActorHandle, job: Job, interval: float) -> None:
        self.store = store
        self.job = job
        self.interval = interval
        self._latest: Progress | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prism-heartbeat", daemon=True)

    def progress(self, progress: Progress) -> None:
        self._latest = progress  # called per batch by the harness; only the latest is ever sent

    def beat(self) -> Beat:
        latest = self._latest
        if latest is None:
            return Beat(self.job.submission_id, self.job.owner, self.job.attempt)
        return Beat(self.job.submission_id, self.job.owner, self.job.attempt, latest.bytes_scored,
                    latest.running_bpb, latest.tokens_per_second)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        ray.get(self.store.stage_finished.remote(self.beat()))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.store.heartbeat.remote(self.beat())


def stage_task(name: str, job: Job, store: ActorHandle, settings: Settings, timings: dict[str, float],
               bundle: Bundle, *needs: Any) -> StageResult:
    """The body of every stage task (Ray resolves the refs among the arguments before it runs)."""
    stage = STAGES_BY_NAME[name]
    ctx = StageContext(job, settings, verdicts=StoreVerdicts(store), timings=timings)
    node = ray.get_runtime_context().get_node_id()
    if not stage.gpu:
        outcome, payload = run_stage(stage, ctx, bundle, *needs)
    elif not ray.get(store.stage_started.remote(job.submission_id, name, node, job.owner, job.attempt)):
        return Outcome("lost"), None  # requeued or finished meanwhile: never train for a stale attempt
    else:
        with Heartbeat(store, job, settings.cluster.heartbeat_seconds) as heartbeat:
            ctx.progress = heartbeat.progress
            outcome, payload = run_stage(stage, ctx, bundle, *needs)
    outcome.node = node
    return outcome, payload


class StageTasks:
    """Launches stages as Ray tasks: GPU stages with num_gpus=PRISM_GPUS_PER_RUN (Ray sets CUDA_VISIBLE_DEVICES), CPU
    stages with a
    fraction of a CPU, every one with max_retries=0 (requeueing is the scheduler's, explicit and recorded)."""

    def __init__(self, settings: Settings, has_head: bool) -> None:
        self._task = ray.remote(stage_task)
        self._options: dict[str, dict[str, Any]] = {}
        cluster = settings.cluster
        for stage in STAGES_BY_NAME.values():
            options: dict[str, Any] = {"num_returns": 2, "max_retries": 0, "name": f"prism-{stage.name}"}
            if stage.gpu:  # N ranks, one GPU each, on one node (docs/operator.md, "Several GPUs per run")
                options.update(num_gpus=settings.gpus_per_run, num_cpus=cluster.cpus_per_gpu_stage)
            else:
                options.update(num_cpus=cluster.cpus_per_cpu_stage)
            if stage.on_head and has_head:
                options["resources"] = {"head": 0.001}
            self._options[stage.name] = options

    def launch(self, stage: Stage, job: Job, store: ActorHandle, settings: ObjectRef, timings: dict[str, float],
               bundle: ObjectRef, needs: list[ObjectRef], node: str | None = None) -> tuple[ObjectRef, ObjectRef]:
        """(outcome ref, payload ref) of the stage's task; `node` pins it there (if that node is gone, the task
        fails unschedulable, a system failure, and the submission is requeued)."""
        options = self._options[stage.name]
        if node is not None:
            options = {**options, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
        outcome, payload = self._task.options(**options).remote(stage.name, job, store, settings, timings, bundle,
                                                                *needs)
        return outcome, payload


def run_slots(nodes: list[dict[str, Any]], gpus_per_run: int) -> int:
    """How many scored runs fit at once: a run's N GPUs must be on one node (its ranks share one sandbox)."""
    return sum(int(node.get("Resources", {}).get("GPU", 0)) // gpus_per_run for node in nodes if node.get("Alive"))


def placement_notice(nodes: list[dict[str, Any]], gpus_per_run: int) -> str | None:
    """What /queue says when no alive node can take a scored run of `gpus_per_run` GPUs."""
    if gpus_per_run <= 1 or run_slots(nodes, gpus_per_run):
        return None
    largest = max((int(node.get("Resources", {}).get("GPU", 0)) for node in nodes if node.get("Alive")), default=0)
    return (f"no node has {gpus_per_run} GPUs (PRISM_GPUS_PER_RUN; the largest has {largest}): scored runs wait "
            "until such a node joins")

